"""Client-chosen names never become metric labels: a model the table does not name is counted as `other`
in every family (GenAI ones included), an over-long `model` is a 400 before anything else, and a scrape of
/metrics is rendered off the event loop, so requests are answered while it runs."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import orjson
import pytest

from ..conftest import table_doc, until
from ..telemetry_support import parse_metrics, value

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def running(upstream, start_tiergate):
    doc = table_doc(upstream)
    doc["passthrough_provider"] = "primary"
    return await start_tiergate(doc, enable_caching=False, request_log="logging")


async def post(http, url: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, resp.headers, orjson.loads(await resp.read())


async def scrape(http, running) -> str:
    async with http.get(running.url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                                  "/v1/images/generations"])
async def test_an_over_long_model_is_a_400_before_anything_else(running, upstream, http, path):
    model = "m" * 257
    status, _, answer = await post(http, running.url + path, {"model": model, "messages": MESSAGES,
                                                              "input": "hi", "prompt": "a cat"})
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert error["code"] == "string_above_max_length" and "256" in error["message"]
    assert model not in error["message"]
    assert upstream.calls == 0
    # 256 characters is still a name (the pass-through provider is asked)
    status, _, _ = await post(http, running.url + "/v1/images/generations", {"model": "m" * 256, "prompt": "x"})
    assert status == 200


async def test_names_the_table_does_not_know_are_counted_as_other(running, upstream, http, caplog):
    caplog.set_level(logging.INFO, logger="tiergate.requests")
    for i in range(3):  # overrides the table does not name, and a pass-through model
        status, headers, _ = await post(http, running.v1 + "/chat/completions",
                                        {"model": f"primary/client-chosen-{i}", "messages": MESSAGES})
        assert status == 200 and headers["x-tiergate-model"] == f"primary/client-chosen-{i}"
    status, _, _ = await post(http, running.v1 + "/images/generations", {"model": "client-chosen-x", "prompt": "x"})
    assert status == 200
    status, _, _ = await post(http, running.v1 + "/chat/completions", {"model": "general_purpose",
                                                                      "messages": MESSAGES})
    assert status == 200
    text = await scrape(http, running)
    assert "client-chosen" not in text  # no family has a series of its own for them
    samples = parse_metrics(text)
    requests: dict[str, float] = {}
    for sample in samples["tiergate_requests_total"]:
        requests[sample.labels["model"]] = requests.get(sample.labels["model"], 0) + sample.value
    assert requests == {"other": 4.0, "primary/model-a": 1.0}
    genai = {s.labels["gen_ai_request_model"]: s.value
             for s in samples["gen_ai_client_inference_duration_seconds_count"]}
    assert genai == {"other": 3.0, "model-a": 1.0}
    circuit = {s.labels["model"] for s in samples["tiergate_circuit_state"]}
    assert circuit <= {"other", "model-a", "model-p", "model-fast", "text-embed"}  # the table's, or other
    # the request log keeps the name each request used
    await until(lambda: sum(r.name == "tiergate.requests" for r in caplog.records) >= 5)
    logged = {orjson.loads(r.getMessage())["model"] for r in caplog.records if r.name == "tiergate.requests"}
    assert {"primary/client-chosen-0", "primary/client-chosen-2", "primary/client-chosen-x"} <= logged


class BlockingCollector:
    """A family computed when scraped that holds the rendering until released: a large registry, made slow
    on purpose. It notes whether it was released while it ran (i.e. /health was answered meanwhile)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.released_while_rendering: bool | None = None

    def collect(self) -> list[Any]:
        self.started.set()
        # the guard only matters when rendering blocks the loop: /health cannot be answered then
        self.released_while_rendering = self.release.wait(10)
        return []


async def test_a_scrape_in_progress_does_not_stall_other_requests(running, http):
    blocker = BlockingCollector()
    running.router.telemetry.metrics.add_collector(blocker)
    scraping = asyncio.ensure_future(scrape(http, running))
    await until(blocker.started.is_set)
    async with http.get(running.url + "/health") as resp:  # answered while the scrape renders
        assert resp.status == 200
    blocker.release.set()
    text = await scraping
    assert "tiergate_requests_total" in text
    assert blocker.released_while_rendering is True


async def test_concurrent_scrapes_render_one_at_a_time(running, http):
    await post(http, running.v1 + "/chat/completions", {"model": "general_purpose", "messages": MESSAGES})
    texts = await asyncio.gather(*(scrape(http, running) for _ in range(4)))
    for text in texts:
        assert parse_metrics(text)["tiergate_requests_total"][0].value == 1.0


async def test_requests_tokens_and_cost_are_counted_by_key_name_never_by_key(upstream, start_tiergate, http):
    doc = table_doc(upstream)
    doc["pricing"] = {"primary/model-a": {"input": 1.0, "output": 2.0}}
    secret_a, secret_b = "sk-team-a-METRICS-111", "sk-plain-METRICS-222"
    running = await start_tiergate(doc, enable_caching=False, api_keys=(f"team-a={secret_a}", secret_b))
    for secret, n in ((secret_a, 2), (secret_b, 1)):
        for _ in range(n):
            async with http.post(running.v1 + "/chat/completions", json={"model": "general_purpose",
                                                                          "messages": MESSAGES},
                                 headers={"Authorization": f"Bearer {secret}"}) as resp:
                assert resp.status == 200
    scraped: dict[str, list[Any]] = {}

    async def scrape_keyed() -> None:
        async with http.get(running.url + "/metrics", headers={"Authorization": f"Bearer {secret_a}"}) as resp:
            text = await resp.text()
        assert "METRICS-" not in text  # no key, nor a fragment of one
        scraped.clear()
        scraped.update(parse_metrics(text))

    async def counted() -> bool:
        await scrape_keyed()
        return value(scraped, "tiergate_key_requests_total") >= 3
    await until(counted)  # the counts reach the metrics a batch at a time
    assert value(scraped, "tiergate_key_requests_total", key="team-a", status="200") == 2
    assert value(scraped, "tiergate_key_requests_total", key="unnamed-1", status="200") == 1
    for key in ("team-a", "unnamed-1"):
        assert value(scraped, "tiergate_key_tokens_total", key=key, type="prompt") > 0
    assert value(scraped, "tiergate_key_cost_usd_total", key="team-a") > \
        value(scraped, "tiergate_key_cost_usd_total", key="unnamed-1") > 0
