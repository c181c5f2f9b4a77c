"""Provider health shared through Redis (`fleet.FleetHealth`): one pod's open breaker or cooldown
reaches the others within a second, is read without a network call, expires on its own, and
exactly one pod gets the half-open trial."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from proxy.fleet.state import FleetHealth, RedisLink

from ..conftest import REDIS_URL, until


@pytest.fixture
async def pods(namespace) -> AsyncIterator[list[FleetHealth]]:  # noqa: F811
    made: list[FleetHealth] = []

    async def make() -> FleetHealth:
        health = FleetHealth(RedisLink(REDIS_URL, timeout=1.0), namespace, resync=0.5)
        health.start()
        made.append(health)
        await until(lambda: health.subscribed)
        return health

    yield [await make() for _ in range(3)] + [make]  # type: ignore[list-item]
    for health in made:
        await health.stop()
        await health.link.close()


async def test_an_open_breaker_reaches_the_fleet(pods):
    a, b, c, make = pods
    published = time.monotonic()
    a.publish("primary/model-a", "open", 30, "5 failures")
    assert a.state("primary/model-a") == "open"  # the publisher knows at once
    await until(lambda: b.blocked_until("primary/model-a") is not None)  # heard over pub/sub, not a poll
    await until(lambda: c.blocked_until("primary/model-a") is not None)
    # blocked for the 30 s from when it was heard
    assert published + 29 < b.blocked_until("primary/model-a") <= time.monotonic() + 30
    assert c.snapshot()["blocked"]["primary/model-a"]["state"] == "open"
    assert b.blocked_until("primary/model-b") is None
    late = await make()  # a pod that starts later reads the state when it subscribes
    assert late.state("primary/model-a") == "open"
    a.publish("primary/model-a", "closed", 0)  # the trial succeeded
    await until(lambda: b.blocked_until("primary/model-a") is None and c.state("primary/model-a") is None)
    await until(lambda: late.state("primary/model-a") is None)


async def test_a_cooldown_ends_on_its_own_without_a_call(pods):
    a, b, _, _ = pods
    a.publish("backup/model-b", "cooldown", 0.3, "429 Retry-After")
    await until(lambda: b.state("backup/model-b") == "cooldown")
    calls = b.link.calls
    waited = await until(lambda: b.blocked_until("backup/model-b") is None)
    # at most its periodic resyncs (every 0.5 s), not a call per question (every 5 ms here)
    assert b.link.calls <= calls + 1 + waited / 0.5


async def test_exactly_one_pod_gets_the_half_open_trial(pods):
    a, b, c, _ = pods
    claims = await asyncio.gather(*(p.claim_trial("primary/model-a", 5) for p in (a, b, c) for _ in range(3)))
    assert claims.count(True) == 1


async def test_redis_unreachable_keeps_what_was_heard(namespace):  # noqa: F811
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    health = FleetHealth(RedisLink(f"redis://127.0.0.1:{port}/0", timeout=0.1), namespace)
    health.start()
    try:
        health.publish("primary/model-a", "open", 10)  # no error: skipped while Redis is away
        assert health.state("primary/model-a") == "open"
        assert await health.claim_trial("primary/model-a", 5) is True  # decided alone, as without Redis
        await asyncio.sleep(0)
        assert health.subscribed is False
    finally:
        await health.stop()
        await health.link.close()


async def test_when_an_open_breaker_runs_out_one_pod_tries_and_the_others_wait(pods):
    a, b, c, _ = pods
    a.publish("primary/model-a", "open", 0.3, "5 failures")
    await until(lambda: all(p.state("primary/model-a") == "open" for p in (b, c)))
    await until(lambda: all(p.blocked_until("primary/model-a") is None for p in (a, b, c)), timeout=3)
    assert all(p.trial_due("primary/model-a") for p in (a, b, c))
    won = await asyncio.gather(*(p.claim_trial("primary/model-a", 5) for p in (a, b, c)))
    assert won.count(True) == 1
    trier = (a, b, c)[won.index(True)]
    others = [p for p, w in zip((a, b, c), won, strict=True) if not w]
    assert all(p.state("primary/model-a") == "trial" and not p.trial_due("primary/model-a") for p in others)
    trier.publish("primary/model-a", "closed", 0)  # the trial answered: the fleet sends to it again
    await until(lambda: all(p.blocked_until("primary/model-a") is None for p in others))


async def test_a_deployment_failing_on_one_tiergate_is_skipped_by_the_others_within_a_second(
        upstream, backup, start_tiergate, http, namespace):  # noqa: F811 - fixture
    """Two tiergates on one Redis: the first opens the primary's breaker; the second learns it within a
    second and sends its next request to the fallback without trying the primary; the primary's other
    models stay in use. A 429 cooldown is shared the same way."""
    from ..conftest import table_doc
    from ..upstream import Fail

    settings = {"redis_url": REDIS_URL, "cache_namespace": namespace, "redis_timeout": 1.0,
                "breaker_failure_threshold": 1, "enable_caching": False}
    first = await start_tiergate(table_doc(upstream, backup), **settings)
    second = await start_tiergate(table_doc(upstream, backup), **settings)
    body = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]}
    upstream.push(Fail(500))
    async with http.post(first.v1 + "/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.headers["x-tiergate-provider"] == "backup"
    assert first.router.breakers.get("primary/model-a").state == "open"
    fleet = second.router.fleet_health
    deadline = time.monotonic() + 1.0
    while fleet.blocked_until("primary/model-a") is None:
        assert time.monotonic() < deadline, "the second tiergate did not hear of the open breaker in 1 s"
        await asyncio.sleep(0.01)
    calls = upstream.calls
    async with http.post(second.v1 + "/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.headers["x-tiergate-provider"] == "backup"
        assert resp.headers["x-tiergate-attempts"] == "1"
    assert upstream.calls == calls  # skipped, not tried
    async with http.post(second.v1 + "/chat/completions", json={**body, "model": "fast"}) as resp:
        assert resp.status == 200 and resp.headers["x-tiergate-model"] == "primary/model-fast"
    async with http.get(second.url + "/health/details") as resp:
        assert "primary/model-a" in (await resp.json())["fleet_health"]["blocked"]
    # a rate limit seen by one is a cooldown for all
    upstream.push(Fail(429, retry_after=30))
    async with http.post(first.v1 + "/chat/completions", json={**body, "model": "fast"}) as resp:
        assert resp.status == 429
    deadline = time.monotonic() + 1.0
    while fleet.state("primary/model-fast") != "cooldown":
        assert time.monotonic() < deadline, "the cooldown did not reach the second tiergate in 1 s"
        await asyncio.sleep(0.01)
