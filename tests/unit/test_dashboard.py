"""deploy/grafana/llm_routing.json loads and every panel's query names a metric a running tiergate exports;
deploy/prometheus.yml scrapes the sidecar's port."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ..conftest import table_doc
from ..telemetry_support import config_with, parse_metrics, running

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\b(?:tiergate|gen_ai_client)_[a-z_]+")  # tiergate's own and the GenAI conventions' (not labels)


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


async def test_every_panel_queries_an_exported_metric(upstream, http):
    dashboard = json.loads((DEPLOY / "grafana" / "llm_routing.json").read_text())
    async with running(table_doc(upstream), config_with()) as (url, _):
        async with http.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                  "stream": True}) as resp:
            await resp.read()
        async with http.get(url + "/metrics") as resp:
            exported = set(parse_metrics(await resp.text()))
    titles = []
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            continue
        titles.append(panel["title"].lower())
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = METRIC.findall(target["expr"])
            assert names, f"{panel['title']}: no tiergate or GenAI metric in {target['expr']}"
            for name in names:
                assert name in exported, f"{panel['title']}: {name} is not exported"
    joined = " | ".join(titles)
    for topic in ("request rate", "success rate", "p50 / p95 / p99", "time to first chunk", "cache hit rate",
                  "fallbacks", "circuit breaker", "tokens by model", "cost by model"):
        assert topic in joined, topic


def test_prometheus_config_scrapes_the_sidecar():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "tiergate"]
    assert job["metrics_path"] == "/metrics"
    # the compose stack's tiergate, on the port that serves /metrics without a key
    assert "tiergate:9464" in job["static_configs"][0]["targets"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["tiergate"]["environment"]["TIERGATE_METRICS_PORT"] == "9464"
