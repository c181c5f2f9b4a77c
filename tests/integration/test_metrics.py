"""GET /metrics after known traffic (parsed with prometheus-client's parser), cost, get_metrics(),
ENABLE_MONITORING=false, and multiprocess mode with two worker processes writing one directory."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.observability.metrics import METRIC_NAMES

from ..conftest import PRIMARY_KEY, table_doc
from ..telemetry_support import PRICING, config_with, parse_metrics, running, value
from ..upstream import Fail

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
ROUTE = "general_purpose:standard"
ROOT = Path(__file__).resolve().parents[2]


async def post(http: aiohttp.ClientSession, url: str, body: object) -> tuple[int, dict[str, str], bytes]:
    async with http.post(url, json=body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, list]:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await resp.text())


async def test_metrics_count_known_traffic(upstream, backup, http):
    doc = {**table_doc(upstream, backup), "pricing": PRICING}
    async with running(doc, config_with()) as (url, router):
        for _ in range(3):
            status, headers, _ = await post(http, url + "/v1/chat/completions", CHAT)
            assert status == 200
            # 10 prompt tokens at $1/M + 3 completion tokens at $2/M
            assert float(headers["x-tiergate-cost-usd"]) == pytest.approx(16e-6)
        async with http.post(url + "/v1/chat/completions",
                             json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}) as resp:
            assert resp.status == 200 and "x-tiergate-cost-usd" not in resp.headers
            await resp.read()
        upstream.push(Fail(500))
        status, headers, _ = await post(http, url + "/v1/chat/completions", CHAT)
        assert status == 200 and headers["x-tiergate-model"] == "backup/model-b"
        async with http.post(url + "/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400

        m = await scrape(http, url)

    assert value(m, "tiergate_requests_total", route=ROUTE, model="primary/model-a", provider="primary",
                 status="200") == 4
    assert value(m, "tiergate_requests_total", model="backup/model-b", status="200") == 1
    assert value(m, "tiergate_requests_total", status="400") == 1
    assert value(m, "tiergate_requests_total") == 6
    assert value(m, "tiergate_request_duration_seconds_count", route=ROUTE) == 5
    assert value(m, "tiergate_time_to_first_token_seconds_count", model="primary/model-a") == 1
    assert value(m, "tiergate_upstream_attempts_total", provider="primary", outcome="ok") == 4
    assert value(m, "tiergate_upstream_attempts_total", provider="primary", outcome="http_500") == 1
    assert value(m, "tiergate_upstream_attempts_total", provider="backup", outcome="ok") == 1
    assert value(m, "tiergate_fallbacks_total", route=ROUTE) == 1
    # the stream's usage comes from its last event (include_usage): 4 x (10 prompt, 3 completion)
    assert value(m, "tiergate_tokens_total", model="primary/model-a", type="prompt") == 40
    assert value(m, "tiergate_tokens_total", model="primary/model-a", type="completion") == 12
    assert value(m, "tiergate_tokens_total", model="backup/model-b", type="completion") == 3
    assert value(m, "tiergate_cost_usd_total", model="primary/model-a") == pytest.approx(64e-6)
    assert value(m, "tiergate_cost_usd_total", model="backup/model-b") == pytest.approx((10 * 0.5 + 3 * 1.5) / 1e6)
    assert value(m, "tiergate_cache_requests_total", result="bypass") == 6
    assert value(m, "tiergate_circuit_state", provider="primary") == 0
    assert "tiergate_routing_table_age_seconds" in m and m["tiergate_routing_table_age_seconds"][0].value >= 0
    exported = {name for name in METRIC_NAMES}
    assert {n for n in exported if n in m or n + "_count" in m or n + "_bucket" in m} >= exported - {
        "tiergate_cache_bytes", "tiergate_database_up", "tiergate_database_last_refresh_age_seconds",
        "tiergate_stream_recoveries_total", "tiergate_key_requests_total", "tiergate_key_tokens_total",
        "tiergate_key_cost_usd_total"}  # families of their own settings (a database, inbound keys)


async def test_get_metrics_reports_rates_latency_tokens_and_cost(upstream, backup, http):
    doc = {**table_doc(upstream, backup), "pricing": PRICING}
    async with running(doc, config_with()) as (url, router):
        for _ in range(4):
            await post(http, url + "/v1/chat/completions", CHAT)
        upstream.push(Fail(400))
        status, _, _ = await post(http, url + "/v1/chat/completions", CHAT)
        assert status == 400
        stats = router.get_metrics()
    assert stats["requests"] == 5
    assert stats["success_rate"] == pytest.approx(0.8)
    assert stats["cache_hit_rate"] == 0.0
    assert 0 < stats["latency_p50_ms"] <= stats["latency_p95_ms"] <= stats["latency_p99_ms"]
    assert stats["tokens"] == {"prompt": 40, "completion": 12, "total": 52, "cached_prompt": 16, "reasoning": 4}
    assert stats["cost_usd"] == pytest.approx(64e-6)
    model = stats["models"]["primary/model-a"]
    assert model["requests"] == 5 and model["tokens"]["total"] == 52


async def test_breaker_state_is_exported(upstream, http):
    doc = table_doc(upstream)
    upstream.default = Fail(503)
    async with running(doc, config_with(breaker_failure_threshold=2, max_retries=1)) as (url, _):
        for _ in range(2):
            status, _, _ = await post(http, url + "/v1/chat/completions", CHAT)
            assert status == 503  # the provider's own
        m = await scrape(http, url)
    assert value(m, "tiergate_circuit_state", provider="primary", model="model-a") == 2
    assert value(m, "tiergate_requests_total", status="503", model="") == 2


async def test_no_secret_in_metrics(upstream, backup, http):
    upstream.default = Fail(401, body=b'{"error": {"message": "bad key ' + PRIMARY_KEY.encode() + b'"}}')
    async with running(table_doc(upstream, backup), config_with()) as (url, _):
        await post(http, url + "/v1/chat/completions", CHAT)
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
    assert PRIMARY_KEY not in text and "SECRET" not in text


async def test_monitoring_off_collects_nothing(upstream, http):
    async with running(table_doc(upstream), config_with(enable_monitoring=False)) as (url, router):
        status, headers, _ = await post(http, url + "/v1/chat/completions", CHAT)
        assert status == 200 and "x-tiergate-cost-usd" not in headers
        async with http.get(url + "/metrics") as resp:
            assert resp.status == 404
            assert "ENABLE_MONITORING" in (await resp.json())["error"]["message"]
        stats = router.get_metrics()
    assert router.telemetry.metrics is None and router.telemetry.tracing is None
    assert stats["requests"] == 1 and stats["monitoring"] is False and stats["tokens"]["total"] == 0


WORKER = """
import asyncio, json, sys
from aiohttp import web
from proxy.engine.router import Router
from proxy.table.routing import table_from_dict
from proxy.edge.app import build_app
from proxy.settings import RouterConfig

async def main():
    config = RouterConfig.load(environ={}, dotenv_path=None, overrides={"timeout": 5.0})
    router = Router(config, table=table_from_dict(json.loads(sys.argv[1]), source="test"))
    runner = web.AppRunner(build_app(router), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()

asyncio.run(main())
"""


async def test_multiprocess_scrape_shows_every_worker(upstream, http, tmp_path):
    """Two worker processes share PROMETHEUS_MULTIPROC_DIR; a scrape of either shows both."""
    doc = json.dumps({**table_doc(upstream), "pricing": PRICING})
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    workers = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, doc, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL) for _ in range(2)]
    try:
        urls = []
        for worker in workers:
            line = await asyncio.wait_for(worker.stdout.readline(), 30)
            urls.append(f"http://127.0.0.1:{int(line)}")
        for i in range(5):
            status, _, _ = await post(http, urls[i % 2] + "/v1/chat/completions", CHAT)
            assert status == 200
        for url in urls:
            m = await scrape(http, url)
            assert value(m, "tiergate_requests_total", model="primary/model-a", status="200") == 5
            assert value(m, "tiergate_tokens_total", model="primary/model-a", type="prompt") == 50
            assert value(m, "tiergate_cost_usd_total", model="primary/model-a") == pytest.approx(80e-6)
            assert value(m, "tiergate_request_duration_seconds_count") == 5
            assert value(m, "tiergate_circuit_state", provider="primary") == 0
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.stdin.close()
        for worker in workers:
            try:
                await asyncio.wait_for(worker.wait(), 10)
            except TimeoutError:
                worker.kill()
                await worker.wait()
    assert all(w.returncode == 0 for w in workers)
    # the workers retired their live gauges on exit; their counters remain in the sum
    assert not list(tmp_path.glob("gauge_live*"))


def test_state_gauges_read_at_scrape_time():
    """The state gauges read what the router pushed with the table, when scraped: breakers, the table's
    age, the cache's `stats()` (read defensively) and the table's database."""
    from proxy.engine.breaker import BreakerBoard
    from proxy.observability.telemetry import GaugeSources, Telemetry
    from proxy.table.routing import table_from_dict

    table = table_from_dict({"providers": {"p": {"base_url": "http://127.0.0.1:1/v1", "api_key": "k"}},
                             "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "p/m"}]},
                            source="test")
    breakers = BreakerBoard(["p", "q"], fail_max=1)
    breakers.get("q").record_failure()
    telemetry = Telemetry(config_with())
    telemetry.table_changed(table, GaugeSources(breakers.items, lambda: {"bytes": 1234}, lambda: (False, 7.5)))
    body, content_type = telemetry.render_metrics()
    m = parse_metrics(body.decode())
    assert content_type.startswith("text/plain")
    assert value(m, "tiergate_cache_bytes") == 1234
    assert value(m, "tiergate_circuit_state", provider="p") == 0
    assert value(m, "tiergate_circuit_state", provider="q") == 2
    assert value(m, "tiergate_routing_table_age_seconds") >= 0
    assert value(m, "tiergate_database_up") == 0 and value(m, "tiergate_database_last_refresh_age_seconds") == 7.5
    broken = Telemetry(config_with())
    broken.table_changed(table, GaugeSources(breakers.items, lambda: None))
    assert b"tiergate_cache_bytes 0.0" in broken.render_metrics()[0]


def test_gathered_counts_render_exactly_as_direct_observations():
    """Counts gather as plain numbers (observations in ms, in batches) and reach prometheus-client on
    read; the exposition must equal what prometheus-client's own calls produce."""
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.observability.metrics import PrometheusMetrics

    values = [0.0004, 0.005, 0.0051, 0.02, 0.3, 7.0, 200.0]
    gathered, direct = PrometheusMetrics(), PrometheusMetrics()
    series = gathered.series("r", "p/m", "p", 200)
    series.duration.observe_ms([v * 1000 for v in values[:3]])
    series.duration.observe_ms([v * 1000 for v in values[3:]])
    series.requests.inc(len(values))
    series.prompt_tokens.inc(3 * len(values))
    gathered.attempt("p", "ok", 2)
    gathered.cache_result("miss")
    for v in values:
        direct.duration.labels("r", "p/m").observe(v)
        direct.requests.labels("r", "p/m", "p", "200").inc()
        direct.tokens.labels("p/m", "prompt").inc(3)
    direct.attempts.labels("p", "ok").inc(2)
    direct.cache.labels("miss").inc()
    for child in (direct.ttft.labels("p/m"), direct.tokens.labels("p/m", "completion"), direct.cost.labels("p/m"),
                  direct.fallbacks.labels("r")):
        assert child is not None  # the children a series creates, at zero

    def samples(metrics):
        return sorted((s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
                      for f in text_string_to_metric_families(metrics.render().decode())
                      for s in f.samples if not s.name.endswith("_created"))

    assert samples(gathered) == samples(direct)
    assert ("tiergate_requests_total", (("model", "p/m"), ("provider", "p"), ("route", "r"), ("status", "200")),
            7.0) in samples(gathered)
