"""Resilience over real HTTP: each failure mode of the upstream, and what the client sees."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import openai
import orjson
import pytest

from proxy.adapters import CHAT as CHAT_API
from proxy.engine.breaker import BreakerBoard
from proxy.engine.dispatch import AttemptLoop, Call
from proxy.engine.providers import make_provider
from proxy.planner.plan import Candidate, Plan
from proxy.table.routing import table_from_dict
from proxy.types import UpstreamError

from ..conftest import BACKUP_KEY, PRIMARY_KEY, make_config, table_doc
from ..upstream import BreakStream, Fail, Hang, InvalidJson, Ok, Reset, StallStream

CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]}


async def post(http, url, body=CHAT, headers=None):
    async with http.post(url, data=orjson.dumps(body), headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


def breaker_state(running, deployment):
    snapshot = running.router.breakers.get(deployment).snapshot()
    return {k: snapshot[k] for k in ("state", "failures", "opened_at")}


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.mark.parametrize("failure,outcome", [
    (Fail(500), "http_500"), (Fail(503), "http_503"), (Fail(429), "http_429"), (Reset(), "connection"),
    (InvalidJson(), "invalid_response"),
])
async def test_each_failure_falls_back_to_the_next_candidate(tiergate, upstream, backup, http, failure, outcome):
    assert breaker_state(tiergate, "primary/model-a")["failures"] == 0
    upstream.push(failure)
    status, headers, data = await post(http, tiergate.v1 + "/chat/completions")
    assert status == 200
    assert headers["x-tiergate-model"] == "backup/model-b" and headers["x-tiergate-attempts"] == "2"
    assert orjson.loads(data)["choices"][0]["message"]["content"] == "backup answered model-b"
    counted = 0 if outcome == "http_429" else 1  # a rate limit cools the deployment down; not a failure
    assert breaker_state(tiergate, "primary/model-a") == {"state": "closed", "failures": counted, "opened_at": None}
    assert breaker_state(tiergate, "backup/model-b")["failures"] == 0
    health = await tiergate.router.get_health_status()
    assert health["providers"]["primary"]["error_rate"] > 0


async def test_accept_then_hang_times_out_the_attempt_and_falls_back(upstream, backup, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, backup), attempt_timeout=0.2, timeout=5)
    upstream.push(Hang())
    status, headers, _ = await post(http, running.v1 + "/chat/completions")
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    assert breaker_state(running, "primary/model-a")["failures"] == 1


async def test_every_candidate_failing_is_one_clear_error(tiergate, upstream, backup, http):
    upstream.default = Fail(500)
    backup.default = Reset()
    status, _, data = await post(http, tiergate.v1 + "/chat/completions")
    assert status == 500  # the deciding (last) failure was the primary's 500
    error = orjson.loads(data)["error"]
    assert error["code"] == "upstream_failed" and error["type"] == "server_error"
    assert "primary/model-a: http_500" in error["message"] and "backup/model-b: connection" in error["message"]
    assert PRIMARY_KEY not in data.decode() and BACKUP_KEY not in data.decode()
    assert upstream.calls + backup.calls == 3  # max_retries=3 attempts in all


async def test_breaker_opens_at_threshold_skips_provider_then_recovers(upstream, backup, start_tiergate, http):
    clock = Clock()
    running = await start_tiergate(table_doc(upstream, backup), breaker_failure_threshold=2,
                                   breaker_recovery_timeout=60, breaker_clock=clock)
    upstream.default = Fail(500)
    for _ in range(2):
        status, _, _ = await post(http, running.v1 + "/chat/completions")
        assert status == 200
    assert breaker_state(running, "primary/model-a")["state"] == "open"
    calls = upstream.calls
    status, headers, _ = await post(http, running.v1 + "/chat/completions")
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    assert headers["x-tiergate-attempts"] == "1" and upstream.calls == calls   # skipped, not tried
    async with http.get(running.url + "/health/details") as resp:
        details = await resp.json()
    assert details["status"] == "degraded"
    assert details["circuit_breakers"]["primary/model-a"]["state"] == "open"
    assert details["providers"]["primary"]["available"] is True  # its other models still answer
    # the primary comes back; after the recovery timeout one trial closes the breaker
    upstream.default = Ok()
    clock.now += timedelta(seconds=61)
    status, headers, _ = await post(http, running.v1 + "/chat/completions")
    assert status == 200 and headers["x-tiergate-provider"] == "primary"
    assert breaker_state(running, "primary/model-a") == {"state": "closed", "failures": 0, "opened_at": None}


async def test_all_breakers_open_is_503(upstream, backup, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, backup), breaker_failure_threshold=1)
    upstream.default = Fail(500)
    backup.default = Fail(500)
    await post(http, running.v1 + "/chat/completions")
    status, _, data = await post(http, running.v1 + "/chat/completions")
    assert status == 503 and orjson.loads(data)["error"]["code"] == "no_provider_available"
    assert "breaker_open" in orjson.loads(data)["error"]["message"]


async def test_client_errors_and_disconnects_are_not_counted(tiergate, upstream, http):
    upstream.push(*[Fail(400) for _ in range(6)])
    for _ in range(6):
        status, _, _ = await post(http, tiergate.v1 + "/chat/completions")
        assert status == 400
    assert breaker_state(tiergate, "primary/model-a")["failures"] == 0
    gate = asyncio.Event()
    upstream.push(Ok(gate=gate))
    resp = await http.post(tiergate.v1 + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True}))
    await resp.content.readuntil(b"\n\n")
    resp.close()
    async with asyncio.timeout(5):
        while upstream.cancelled == 0:
            await asyncio.sleep(0.01)
    assert breaker_state(tiergate, "primary/model-a") == {"state": "closed", "failures": 0, "opened_at": None}


async def test_retry_without_fallback_honours_retry_after(upstream, backup, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, backup), enable_fallback=False)
    upstream.push(Fail(429, retry_after=0.01), Fail(503))
    status, headers, _ = await post(http, running.v1 + "/chat/completions")
    assert status == 200 and headers["x-tiergate-provider"] == "primary"
    assert headers["x-tiergate-attempts"] == "3" and backup.calls == 0
    # a Retry-After longer than tiergate waits within a request is the client's to honour
    upstream.push(Fail(429, retry_after=3600))
    status, headers, _ = await post(http, running.v1 + "/chat/completions", {**CHAT, "model": "fast"})
    assert status == 429 and headers["Retry-After"] == "3600" and headers["x-tiergate-attempts"] == "1"


async def test_backoff_and_retry_after_waits():
    """The dispatcher's waits, seen through an injected sleep (no real waiting)."""
    from ..upstream import MockUpstream

    upstream = await MockUpstream("primary").start()
    try:
        config = make_config(retry_backoff=0.1, retry_after_cap=2.0, max_retries=4, enable_fallback=False)
        table = table_from_dict(table_doc(upstream), source="test")
        providers = {n: make_provider(s, config) for n, s in table.providers.items()}
        for p in providers.values():
            await p.start()
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        loop = AttemptLoop(providers, BreakerBoard(fail_max=10), config, sleep=sleep)
        first = table.default  # enable_fallback=False: its first candidate alone
        plan = Plan(first.name, first.route, (Candidate(first.candidates[0]),))

        def call() -> Call:
            return Call(CHAT_API, dict(CHAT), plan)

        upstream.push(Fail(500), Fail(500), Fail(429, retry_after=1.5), Ok())
        result = await loop.run(call())
        assert result.status == 200 and len(result.attempts) == 4
        assert 0.05 <= waits[0] <= 0.1 and 0.1 <= waits[1] <= 0.2   # exponential, with jitter
        assert waits[2] == 1.5                                       # Retry-After honoured
        loop.breakers.get("primary/model-a").reset()  # the fake sleep lets no cooldown pass
        upstream.push(Fail(429, retry_after=1.9), Ok())
        await loop.run(call())
        assert waits[-1] == 1.9                                      # ... up to the cap
        loop.breakers.get("primary/model-a").reset()
        upstream.push(Fail(429, retry_after=30), Ok())
        with pytest.raises(UpstreamError) as caught:                 # past it: the client's to wait
            await loop.run(call())
        assert caught.value.status == 429 and caught.value.retry_after == 30 and waits[-1] == 1.9
        for p in providers.values():
            await p.close()
    finally:
        await upstream.stop()


async def test_client_deadline_header(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), timeout=30)
    upstream.default = Hang()
    status, _, data = await post(http, running.v1 + "/chat/completions", headers={"x-tiergate-timeout": "0.2"})
    assert status == 504
    status, _, data = await post(http, running.v1 + "/chat/completions", headers={"x-tiergate-timeout": "soon"})
    assert status == 400 and orjson.loads(data)["error"]["param"] == "x-tiergate-timeout"


async def test_stream_failing_before_the_first_byte_falls_back(tiergate, upstream, backup):
    upstream.push(Fail(502))
    async with openai.AsyncOpenAI(base_url=tiergate.v1, api_key="x", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(stream=True, **CHAT)
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert raw.headers["x-tiergate-provider"] == "backup"
    assert text == "backup answered model-b"


@pytest.mark.parametrize("failure", [BreakStream(after=2), StallStream(after=2)])
async def test_stream_broken_after_the_first_byte_ends_with_an_error_event(upstream, backup, start_tiergate,
                                                                          failure):
    running = await start_tiergate(table_doc(upstream, backup, stream_recovery="off"), stream_idle_timeout=0.3)
    upstream.push(failure)
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(stream=True, **CHAT)
        received = []
        with pytest.raises(openai.APIError) as err:
            async for chunk in stream:
                received.append(chunk)
    assert len(received) == 2
    assert "broke off" in err.value.message or "ended before its final event" in err.value.message
    assert breaker_state(running, "primary/model-a")["failures"] == 1
    assert backup.calls == 0


async def test_ready_and_health_details(tiergate, upstream, http):
    async with http.get(tiergate.url + "/ready") as resp:
        assert resp.status == 200
    await tiergate.router.health.check_all()
    async with http.get(tiergate.url + "/health/details") as resp:
        details = await resp.json()
    assert details["status"] == "healthy" and details["uptime_s"] >= 0
    assert details["routing_table"]["source"] == "test" and details["routing_table"]["age_s"] >= 0
    primary = details["providers"]["primary"]
    assert primary["models_available"] == 2 and primary["last_check"] is not None
    assert set(primary) >= {"available", "error_rate", "avg_latency_ms", "last_check", "models_available"}
    assert details["circuit_breakers"]["primary/model-a"]["state"] == "closed"
    assert details["circuit_breakers"]["primary/model-a"]["failures"] == 0
    tiergate.router.draining = True
    async with http.get(tiergate.url + "/ready") as resp:
        assert resp.status == 503


async def test_active_health_checks_run_in_the_background(upstream, start_tiergate):
    running = await start_tiergate(table_doc(upstream), health_check_interval=0.05)
    async with asyncio.timeout(5):
        while (await running.router.get_health_status())["providers"]["primary"]["last_check"] is None:
            await asyncio.sleep(0.01)
    await upstream.stop()   # the provider goes away: the next check says so
    async with asyncio.timeout(5):
        while (await running.router.get_health_status())["providers"]["primary"]["available"]:
            await asyncio.sleep(0.01)
    status = await running.router.get_health_status()
    assert status["status"] == "unhealthy"
    assert status["providers"]["primary"]["last_check_error"]


def test_retry_after_forms():
    from email.utils import format_datetime

    from proxy.engine.dispatch import retry_after

    def after(value):
        return retry_after({} if value is None else {"Retry-After": value})

    assert after("2") == 2.0 and after("0.5") == 0.5
    assert after(None) is None and after("soon") is None
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 < after(format_datetime(later, usegmt=True)) <= 30
    assert retry_after({"retry-after-ms": "1500", "Retry-After": "2"}) == 1.5  # OpenAI's, more precise


async def test_a_provider_at_its_concurrency_cap_falls_back(upstream, backup, start_tiergate, http):
    doc = table_doc(upstream, backup)
    doc["providers"]["primary"]["max_concurrency"] = 1
    running = await start_tiergate(doc, max_queue_per_provider=0)
    gate = asyncio.Event()
    upstream.push(Ok(gate=gate))
    held = asyncio.create_task(post(http, running.v1 + "/chat/completions"))
    async with asyncio.timeout(5):
        while upstream.calls == 0:
            await asyncio.sleep(0.01)
    status, headers, _ = await post(http, running.v1 + "/chat/completions")
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    assert headers["x-tiergate-attempts"] == "1"        # the full queue was a skip, not an attempt
    assert breaker_state(running, "primary/model-a")["failures"] == 0
    gate.set()
    status, headers, _ = await held
    assert status == 200 and headers["x-tiergate-provider"] == "primary"
