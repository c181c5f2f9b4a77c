"""Shadow traffic: a route's `shadow` gets its share of the route's calls in the background; the client gets
only the primary's answer and never waits for the shadow (shown by holding the shadow's upstream on a gate
while the client's call completes); the shadow is bounded (per route, in all, by its deployment's slots),
its failures touch nothing else, it is cancelled at shutdown, and it is measured and compared."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import orjson
import pytest
import yaml
from openai import AsyncOpenAI

from proxy.engine.router import Router
from proxy.table.store import init_db
from proxy.types import ModelRef

from ..conftest import make_config, table_doc
from ..pg import Schema, fresh_schema, serve_router
from ..telemetry_support import config_with, parse_metrics, running, value
from ..upstream import Fail, MockUpstream, Ok, Reset

MESSAGES = [{"role": "user", "content": "say something"}]
ROUTE = "general_purpose:standard"
SHADOW_MODEL = "shadow/candidate"
PRICING = {"shadow/candidate": {"input": 1.0, "output": 2.0}, "primary/model-a": {"input": 0.5, "output": 1.0}}


@pytest.fixture
async def candidate() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("candidate").start()
    yield server
    await server.stop()


def shadow_doc(upstream: MockUpstream, candidate: MockUpstream, share: float = 1.0, max_concurrency: int = 4,
               **provider: object) -> dict:
    doc = table_doc(upstream)
    doc["providers"]["shadow"] = {"base_url": candidate.url, "api_key": "sk-shadow-SECRET-5555", **provider}
    doc["routes"][0]["shadow"] = {"model": SHADOW_MODEL, "share": share, "max_concurrency": max_concurrency}
    doc["pricing"] = PRICING
    return doc


def shadow_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tiergate.requests"]
    return [line for line in lines if line.get("msg") == "shadow"]


_CLIENTS: list[AsyncOpenAI] = []


def client(url: str) -> AsyncOpenAI:
    sdk = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    _CLIENTS.append(sdk)
    return sdk


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


async def arrived(server: MockUpstream, n: int) -> None:
    """Until `server` has received `n` calls (they are sent in the background)."""
    async with asyncio.timeout(10):
        while server.calls < n:
            await asyncio.sleep(0.005)


def unretrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    """asyncio's complaints about a shadow task whose exception no one retrieved."""
    return [r.getMessage() for r in caplog.records
            if r.name == "asyncio" and "never retrieved" in r.getMessage() and "Shadow" in str(r.__dict__)]


def metrics_of(router: Router) -> dict:
    return parse_metrics(router.telemetry.render_metrics()[0].decode())


async def test_every_call_is_mirrored_measured_and_compared_and_the_client_gets_the_primarys_answer(
        upstream, candidate, caplog):
    caplog.set_level(logging.INFO)
    async with running(shadow_doc(upstream, candidate), config_with(request_log="logging")) as (url, router):
        sdk = client(url)
        upstream.push(Ok(content="the same words"))  # 1: the same text
        candidate.push(Ok(content="the same words"))
        upstream.push(Ok(content="one two three four"))  # 2: same finish reason, length within 20%
        candidate.push(Ok(content="one two three fuor"))
        upstream.push(Ok(content="short"))  # 3: far longer
        candidate.push(Ok(content="a much much longer answer than the primary gave"))
        answers = [await sdk.chat.completions.create(model="auto", messages=MESSAGES) for _ in range(3)]
        upstream.push(Ok(content="a streamed answer"))  # 4: a stream, mirrored as a stream
        candidate.push(Ok(content="a streamed answer"))
        stream = await sdk.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await router.shadows.settled()
        metrics = metrics_of(router)
    assert [a.choices[0].message.content for a in answers] == ["the same words", "one two three four", "short"]
    assert {a.model for a in answers} == {"model-a"} and streamed == "a streamed answer"
    sent = candidate.requests
    assert [r.json["model"] for r in sent] == ["candidate"] * 4
    assert all(r.json["messages"] == MESSAGES for r in sent) and sent[-1].json["stream"] is True
    assert all(r.headers["Authorization"] == "Bearer sk-shadow-SECRET-5555" for r in sent)
    assert value(metrics, "tiergate_shadow_requests_total", route=ROUTE, model=SHADOW_MODEL, outcome="ok") == 4
    for match, n in (("exact", 2), ("similar", 1), ("different", 1)):
        assert value(metrics, "tiergate_shadow_matches_total", model=SHADOW_MODEL, match=match) == n, match
    assert value(metrics, "tiergate_shadow_duration_seconds_count", model=SHADOW_MODEL) == 4
    assert value(metrics, "tiergate_shadow_time_to_first_token_seconds_count", model=SHADOW_MODEL) == 1
    assert value(metrics, "tiergate_shadow_tokens_total", model=SHADOW_MODEL, type="prompt") == 40
    assert value(metrics, "tiergate_shadow_cost_usd_total", model=SHADOW_MODEL) > 0
    # the shadow is no request of the client's: not counted, not costed as one
    assert value(metrics, "tiergate_requests_total") == 4
    assert value(metrics, "tiergate_requests_total", model=SHADOW_MODEL) == 0
    assert value(metrics, "tiergate_cost_usd_total", model=SHADOW_MODEL) == 0
    lines = shadow_lines(caplog)
    assert [line["match"] for line in lines] == ["exact", "similar", "different", "exact"]
    first, last = lines[0], lines[-1]
    assert first["model"] == SHADOW_MODEL and first["route"] == ROUTE and first["outcome"] == "ok"
    assert first["latency_ms"] > 0 and first["prompt_tokens"] == 10 and first["completion_tokens"] == 3
    assert first["cost_usd"] == pytest.approx((10 * 1.0 + 3 * 2.0) / 1e6) and first["error"] is None
    assert last["stream"] is True and last["ttft_ms"] > 0 and last["completion_tokens"] == 3
    assert "SECRET" not in caplog.text


@pytest.mark.parametrize("stream", [False, True])
async def test_the_client_never_waits_for_its_shadow(upstream, candidate, stream):
    gate = asyncio.Event()
    candidate.default = Ok(gate=gate)  # the shadow cannot answer (a stream: nothing after its first chunk)
    async with running(shadow_doc(upstream, candidate), config_with()) as (url, router):
        sdk = client(url)
        if stream:
            chunks = [c async for c in await sdk.chat.completions.create(model="auto", messages=MESSAGES,
                                                                          stream=True)]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = (await sdk.chat.completions.create(model="auto", messages=MESSAGES)).choices[0].message.content
        await arrived(candidate, 1)
        # the client has its whole answer while the shadow is still held
        assert text == "primary answered model-a"
        assert candidate.completed == 0 and router.shadows.total == 1
        gate.set()
        await router.shadows.settled()
        assert candidate.completed == 1 and router.shadows.total == 0
        metrics = metrics_of(router)
    assert value(metrics, "tiergate_shadow_requests_total", outcome="ok") == 1


async def test_shadows_beyond_the_routes_cap_are_dropped_and_counted(upstream, candidate):
    gate = asyncio.Event()
    candidate.default = Ok(gate=gate)
    async with running(shadow_doc(upstream, candidate, max_concurrency=2), config_with()) as (url, router):
        sdk = client(url)
        for _ in range(5):
            await sdk.chat.completions.create(model="auto", messages=MESSAGES)
        await arrived(candidate, 2)
        assert router.shadows.total == 2 and candidate.calls == 2
        gate.set()
        await router.shadows.settled()
        metrics = metrics_of(router)
    assert upstream.calls == 5
    assert value(metrics, "tiergate_shadow_requests_total", outcome="dropped_cap") == 3
    assert value(metrics, "tiergate_shadow_requests_total", outcome="ok") == 2


async def test_the_process_cap_and_a_busy_deployment_drop_shadows_first(upstream, candidate):
    gate = asyncio.Event()
    candidate.default = Ok(gate=gate)
    # in all, one shadow at a time in this process
    async with running(shadow_doc(upstream, candidate), config_with(shadow_max_concurrency=1)) as (url, router):
        for _ in range(3):
            await client(url).chat.completions.create(model="auto", messages=MESSAGES)
        await arrived(candidate, 1)
        gate.set()
        await router.shadows.settled()
        metrics = metrics_of(router)
    assert value(metrics, "tiergate_shadow_requests_total", outcome="dropped_cap") == 2
    # the shadow deployment has one connection slot: while a shadow holds it, the next is dropped, not queued
    gate.clear()
    doc = shadow_doc(upstream, candidate, max_concurrency=4)
    doc["providers"]["shadow"]["max_concurrency"] = 1
    async with running(doc, config_with()) as (url, router):
        for _ in range(3):
            await client(url).chat.completions.create(model="auto", messages=MESSAGES)
        await arrived(candidate, 2)  # the first router's shadow, and this one's
        gate.set()
        await router.shadows.settled()
        metrics = metrics_of(router)
    assert value(metrics, "tiergate_shadow_requests_total", outcome="dropped_load") == 2
    assert value(metrics, "tiergate_shadow_requests_total", outcome="ok") == 1


async def test_a_failing_shadow_touches_neither_the_client_nor_the_primarys_breaker(upstream, candidate, caplog):
    caplog.set_level(logging.INFO)
    candidate.push(Fail(500), Reset(), Fail(503), Reset())
    async with running(shadow_doc(upstream, candidate), config_with(breaker_failure_threshold=2,
                                                                    request_log="logging")) as (url, router):
        sdk = client(url)
        answers = []
        for _ in range(4):
            answers.append(await sdk.chat.completions.create(model="auto", messages=MESSAGES))
            await router.shadows.settled()  # each shadow fails before the next call
        metrics = metrics_of(router)
        primary_breaker = router.breakers.of(ModelRef("primary", "model-a")).state
    assert [a.choices[0].message.content for a in answers] == ["primary answered model-a"] * 4
    assert upstream.calls == 4 and primary_breaker == "closed"
    assert candidate.calls == 2  # one try each, no second; then its own breaker opened and it is skipped
    assert value(metrics, "tiergate_shadow_requests_total", outcome="error") == 4
    assert value(metrics, "tiergate_shadow_requests_total", outcome="ok") == 0
    assert value(metrics, "tiergate_requests_total", status="200") == 4
    assert value(metrics, "tiergate_fallbacks_total") == 0
    errors = [line["error"] for line in shadow_lines(caplog)]
    assert errors[:2] and all(errors) and all(line["match"] is None for line in shadow_lines(caplog))
    assert not unretrieved(caplog)


async def test_a_shadow_is_not_charged_to_the_limits_and_budgets_of_the_key(upstream, candidate):
    doc = shadow_doc(upstream, candidate)
    doc["limits"] = [{"name": "rpm", "requests_per_minute": 2}, {"name": "budget", "usd_per_day": 1.0}]
    async with running(doc, config_with()) as (url, router):
        sdk = client(url)
        for _ in range(2):
            await sdk.chat.completions.create(model="auto", messages=MESSAGES)
        await router.shadows.settled()
        limits = {row["name"]: row for row in (await router.get_health_status())["limits"]["limits"]}
        with pytest.raises(openai.RateLimitError):  # the key's third call, not the shadows, is over the limit
            await sdk.chat.completions.create(model="auto", messages=MESSAGES)
        metrics = metrics_of(router)
    assert limits["rpm"]["used"] == 2
    assert limits["budget"]["used"] == pytest.approx(2 * (10 * 0.5 + 3 * 1.0) / 1e6)  # the primary's cost alone
    assert candidate.calls == 2 and value(metrics, "tiergate_shadow_cost_usd_total") > 0


async def test_a_primary_that_fails_is_still_mirrored_and_nothing_is_compared(upstream, candidate):
    upstream.push(Fail(400))  # the client's error, passed back at once
    async with running(shadow_doc(upstream, candidate), config_with()) as (url, router):
        with pytest.raises(openai.BadRequestError):
            await client(url).chat.completions.create(model="auto", messages=MESSAGES)
        await router.shadows.settled()
        metrics = metrics_of(router)
    assert candidate.calls == 1
    assert value(metrics, "tiergate_shadow_requests_total", outcome="ok") == 1
    assert value(metrics, "tiergate_shadow_matches_total", match="unknown") == 1


async def test_a_share_mirrors_about_that_share(upstream, candidate):
    doc = shadow_doc(upstream, candidate, share=0.5, max_concurrency=1024)
    async with running(doc, config_with()) as (url, router):
        sdk = client(url)
        for _ in range(120):
            await sdk.chat.completions.create(model="auto", messages=MESSAGES)
        await router.shadows.settled()
        metrics = metrics_of(router)
    mirrored = value(metrics, "tiergate_shadow_requests_total")
    assert 30 <= mirrored <= 90 and candidate.calls == mirrored  # 0.5 of 120, within five standard deviations


async def test_a_route_without_a_shadow_mirrors_nothing(upstream, candidate):
    doc = shadow_doc(upstream, candidate)
    async with running(doc, config_with()) as (url, router):
        await client(url).chat.completions.create(model="code_generation:premium", messages=MESSAGES)
        await router.shadows.settled()
    assert candidate.calls == 0 and upstream.calls == 1


async def test_an_alias_that_is_a_route_mirrors_to_its_shadow(upstream, candidate):
    doc = shadow_doc(upstream, candidate)
    doc["aliases"]["gpt-4o"] = {"model": "primary/model-a", "shadow": {"model": SHADOW_MODEL, "share": 1}}
    async with running(doc, config_with()) as (url, router):
        answer = await client(url).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        await router.shadows.settled()
        metrics = metrics_of(router)
    assert answer.choices[0].message.content == "primary answered model-a" and candidate.calls == 1
    assert value(metrics, "tiergate_shadow_requests_total", route="alias:gpt-4o", model=SHADOW_MODEL,
                 outcome="ok") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_shadow_that_speaks_only_messages_gets_the_call_translated(upstream, stream):
    from ..anthropic_upstream import AnthropicUpstream

    claude = await AnthropicUpstream().start()
    try:
        doc = table_doc(upstream)
        doc["providers"]["claude"] = {"kind": "anthropic", "base_url": claude.url, "api_key": "sk-ant-SECRET-1"}
        doc["routes"][0]["shadow"] = {"model": "claude/claude-haiku-4-5", "share": 1}
        async with running(doc, config_with()) as (url, router):
            sdk = client(url)
            if stream:
                [c async for c in await sdk.chat.completions.create(model="auto", messages=MESSAGES, stream=True)]
            else:
                await sdk.chat.completions.create(model="auto", messages=MESSAGES)
            await router.shadows.settled()
            metrics = metrics_of(router)
    finally:
        await claude.stop()
    (sent,) = claude.requests
    assert sent.path == "/v1/messages" and sent.json["model"] == "claude-haiku-4-5"
    assert value(metrics, "tiergate_shadow_requests_total", model="claude/claude-haiku-4-5", outcome="ok") == 1
    assert value(metrics, "tiergate_shadow_matches_total", model="claude/claude-haiku-4-5") == 1


async def test_with_monitoring_off_nothing_is_mirrored(upstream, candidate):
    async with running(shadow_doc(upstream, candidate), config_with(enable_monitoring=False)) as (url, router):
        await client(url).chat.completions.create(model="auto", messages=MESSAGES)
        await router.shadows.settled()
    assert candidate.calls == 0 and upstream.calls == 1


async def test_shutdown_cancels_running_shadows_without_waiting_for_them(upstream, candidate, caplog):
    caplog.set_level(logging.INFO)
    candidate.default = Ok(gate=asyncio.Event())  # never opened
    async with running(shadow_doc(upstream, candidate), config_with(request_log="logging")) as (url, router):
        await client(url).chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        await client(url).chat.completions.create(model="auto", messages=MESSAGES)
        await arrived(candidate, 2)
    assert router.shadows.total == 0
    assert sorted(line["outcome"] for line in shadow_lines(caplog)) == ["cancelled", "cancelled"]
    assert not unretrieved(caplog)


@pytest.fixture
async def schema() -> AsyncIterator[Schema]:
    async with fresh_schema() as s:
        yield s


async def test_a_shadow_named_in_postgres_is_mirrored(schema: Schema, upstream, candidate, tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(shadow_doc(upstream, candidate)), encoding="utf-8")
    config = make_config(database_url=schema.url)
    await init_db(config, path)
    router = Router(config, dynamic=True)
    await router.initialize()
    served = await serve_router(router)
    try:
        answer = await client(served.url).chat.completions.create(model="auto", messages=MESSAGES)
        await router.shadows.settled()
        metrics = metrics_of(router)
    finally:
        await served.runner.cleanup()
    assert answer.choices[0].message.content == "primary answered model-a" and candidate.calls == 1
    assert value(metrics, "tiergate_shadow_matches_total", model=SHADOW_MODEL, match="similar") == 1
