"""deploy/alerts.yml: well-formed Prometheus rules whose tiergate_* metrics a running tiergate serves."""

from __future__ import annotations

import re

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.engine.router import Router
from proxy.settings import PACKAGE_ROOT
from proxy.table.routing import table_from_dict
from proxy.table.store import init_db

from ..conftest import make_config, table_doc
from ..pg import fresh_schema, poll, serve_router
from ..upstream import Fail

DEPLOY = PACKAGE_ROOT / "deploy"
RULES = yaml.safe_load((DEPLOY / "alerts.yml").read_text(encoding="utf-8"))
ALERTS = [rule for group in RULES["groups"] for rule in group["rules"]]


def test_rules_are_well_formed_and_loaded_by_prometheus():
    names = [rule["alert"] for rule in ALERTS]
    assert len(names) == len(set(names))
    for rule in ALERTS:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["expr"].count("(") == rule["expr"].count(")")
    subjects = " ".join(rule["expr"] for rule in ALERTS)
    for what in ("tiergate_circuit_state", 'status=~"5.."', "histogram_quantile(0.99",
                 "tiergate_database_last_refresh_age_seconds", "tiergate_database_up"):
        assert what in subjects  # breaker open, error rate, p99 latency, table stale, database
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yml" in prometheus["rule_files"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]


async def test_every_metric_the_rules_use_is_served(upstream, tmp_path):
    """Scrape a tiergate that routes from Postgres and has served traffic: each tiergate_* name in an
    expression must be a sample name of /metrics (so a renamed metric fails here, not in production)."""
    used = {name for rule in ALERTS for name in re.findall(r"\btiergate_[a-z0-9_]+\b", rule["expr"])}
    assert used
    async with fresh_schema() as schema:
        doc = table_doc(upstream)
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump(doc))
        config = make_config(database_url=schema.url, health_check_interval=0, max_retries=1)
        await init_db(config, path)
        served = await serve_router(Router(config, table=table_from_dict(doc, source="file"), dynamic=True))
        try:
            async with aiohttp.ClientSession() as http:
                body = {"messages": [{"role": "user", "content": "hi"}]}
                async with http.post(served.url + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                upstream.push(Fail(500))
                async with http.post(served.url + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 500  # the provider's own

                async def scraped() -> set[str]:
                    async with http.get(served.url + "/metrics") as resp:
                        text = await resp.text()
                    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
                    return names if used <= names else set()

                served_names = await poll(scraped, timeout=5, what="every metric the alert rules use")
        finally:
            await served.runner.cleanup()
    assert used <= served_names
