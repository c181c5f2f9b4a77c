"""The response cache through a running tiergate over loopback HTTP, and through the library API:
hit/miss/bypass/coalesced, policy, Cache-Control, replay read by the official SDK, coalescing."""

from __future__ import annotations

import asyncio

import openai
import orjson
import pytest

from proxy.engine.router import Router
from proxy.table.routing import table_from_dict
from proxy.types import UpstreamError, UpstreamStatusError

from ..conftest import make_config, table_doc, until
from ..upstream import Fail, Hang, Ok

CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


async def post(http, url, body, headers=None):
    async with http.post(url, data=orjson.dumps(body), headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_deterministic_request_miss_then_hit_with_the_same_bytes(tiergate, upstream, http):
    url = tiergate.v1 + "/chat/completions"
    status, headers, first = await post(http, url, CHAT)
    assert status == 200 and headers["x-tiergate-cache"] == "miss"
    status, headers, second = await post(http, url, {**CHAT, "user": "someone-else", "stream": False})
    assert status == 200 and headers["x-tiergate-cache"] == "hit"
    assert second == first and upstream.calls == 1
    assert headers["x-tiergate-model"] == "primary/model-a" and headers["x-tiergate-attempts"] == "0"
    stats = (await tiergate.router.get_health_status())["cache"]
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["entries"] == 1 and stats["bytes"] > len(first)
    assert tiergate.router.get_metrics()["cache"]["hits"] == 1


async def test_non_deterministic_requests_bypass(tiergate, upstream, http):
    url = tiergate.v1 + "/chat/completions"
    body = {**CHAT, "temperature": 0.7}
    for _ in range(2):
        _, headers, _ = await post(http, url, body)
        assert headers["x-tiergate-cache"] == "bypass"
    without_temperature = {k: v for k, v in CHAT.items() if k != "temperature"}
    _, headers, _ = await post(http, url, without_temperature)
    assert headers["x-tiergate-cache"] == "bypass"
    _, headers, _ = await post(http, url, {**body, "seed": 3})
    assert headers["x-tiergate-cache"] == "miss"
    assert upstream.calls == 4


async def test_route_defaults_count_for_the_policy(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, temperature=0))  # the route sets temperature 0
    url = running.v1 + "/chat/completions"
    body = {k: v for k, v in CHAT.items() if k != "temperature"}
    assert (await post(http, url, body))[1]["x-tiergate-cache"] == "miss"
    assert (await post(http, url, body))[1]["x-tiergate-cache"] == "hit"
    assert (await post(http, url, {**body, "temperature": 0.3}))[1]["x-tiergate-cache"] == "bypass"


@pytest.mark.parametrize("policy,temperature,expected", [("always", 0.9, "hit"), ("never", 0, "bypass")])
async def test_route_policy(upstream, start_tiergate, http, policy, temperature, expected):
    running = await start_tiergate(table_doc(upstream, cache=policy))
    url = running.v1 + "/chat/completions"
    body = {**CHAT, "temperature": temperature}
    await post(http, url, body)
    assert (await post(http, url, body))[1]["x-tiergate-cache"] == expected


async def test_route_ttl_wins_and_zero_means_not_stored(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, cache_ttl=0), cache_ttl=3600)
    url = running.v1 + "/chat/completions"
    await post(http, url, CHAT)
    assert (await post(http, url, CHAT))[1]["x-tiergate-cache"] == "miss"
    assert running.router.cache.stats()["entries"] == 0


async def test_cache_control_no_cache_and_no_store(tiergate, upstream, http):
    url = tiergate.v1 + "/chat/completions"
    _, headers, _ = await post(http, url, CHAT, {"Cache-Control": "no-store"})
    assert headers["x-tiergate-cache"] == "miss"
    _, headers, _ = await post(http, url, CHAT)  # nothing was stored
    assert headers["x-tiergate-cache"] == "miss"
    _, headers, _ = await post(http, url, CHAT, {"Cache-Control": "no-cache"})  # skips the lookup, stores
    assert headers["x-tiergate-cache"] == "bypass"
    _, headers, _ = await post(http, url, CHAT)
    assert headers["x-tiergate-cache"] == "hit"
    assert upstream.calls == 3


async def test_only_successful_answers_are_stored(tiergate, upstream, backup, http):
    url = tiergate.v1 + "/chat/completions"
    upstream.push(Fail(400))
    status, headers, _ = await post(http, url, CHAT)
    assert status == 400 and headers["x-tiergate-cache"] == "miss"
    status, headers, _ = await post(http, url, CHAT)
    assert status == 200 and headers["x-tiergate-cache"] == "miss"
    assert (await post(http, url, CHAT))[1]["x-tiergate-cache"] == "hit"


async def test_caching_disabled(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), enable_caching=False)
    url = running.v1 + "/chat/completions"
    for _ in range(2):
        assert (await post(http, url, CHAT))[1]["x-tiergate-cache"] == "bypass"
    assert upstream.calls == 2


async def test_embeddings_are_cached(tiergate, upstream, http):
    url = tiergate.v1 + "/embeddings"
    body = {"model": "embed-small", "input": ["a", "bb"]}
    _, headers, first = await post(http, url, body)
    _, headers2, second = await post(http, url, body)
    assert (headers["x-tiergate-cache"], headers2["x-tiergate-cache"]) == ("miss", "hit")
    assert first == second and upstream.calls == 1


# --- replay read by the official SDK ---------------------------------------------------------


async def test_cached_completion_replayed_as_a_stream_to_the_sdk(tiergate, upstream):
    async with openai.AsyncOpenAI(base_url=tiergate.v1, api_key="sk-client", max_retries=0) as client:
        answer = await client.chat.completions.create(model="general_purpose", temperature=0,
                                                      messages=CHAT["messages"])
        raw = await client.chat.completions.with_raw_response.create(
            model="general_purpose", temperature=0, messages=CHAT["messages"], stream=True,
            stream_options={"include_usage": True})
        assert raw.headers["x-tiergate-cache"] == "hit"
        parts, usage, finish = [], None, None
        async for chunk in raw.parse():
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        assert "".join(parts) == answer.choices[0].message.content == "primary answered model-a"
        assert finish == "stop" and usage is not None and usage.total_tokens == answer.usage.total_tokens

        text = await client.completions.create(model="fast", prompt="Once", temperature=0)
        stream = await client.completions.create(model="fast", prompt="Once", temperature=0, stream=True)
        assert "".join([c.choices[0].text async for c in stream]) == text.choices[0].text
    assert upstream.calls == 2


async def test_a_stream_miss_is_relayed_from_upstream_and_stored_once_complete(tiergate, upstream):
    async with openai.AsyncOpenAI(base_url=tiergate.v1, api_key="x", max_retries=0) as client:
        for expected in ("miss", "hit"):
            raw = await client.chat.completions.with_raw_response.create(
                model="general_purpose", temperature=0, messages=CHAT["messages"], stream=True)
            assert raw.headers["x-tiergate-cache"] == expected
            assert "".join([c.choices[0].delta.content or "" async for c in raw.parse()
                            if c.choices]) == "primary answered model-a"
    assert upstream.calls == 1


# --- coalescing ------------------------------------------------------------------------------


async def test_fifty_identical_concurrent_requests_make_one_upstream_call(tiergate, upstream, http):
    gate = asyncio.Event()
    upstream.default = Ok(gate=gate)
    url = tiergate.v1 + "/chat/completions"
    tasks = [asyncio.create_task(post(http, url, CHAT)) for _ in range(50)]
    cache = tiergate.router.cache
    await until(lambda: cache.coalesced == 49 and upstream.calls == 1)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 1
    assert all(status == 200 for status, _, _ in results)
    assert len({body for _, _, body in results}) == 1
    kinds = sorted(headers["x-tiergate-cache"] for _, headers, _ in results)
    assert kinds == ["coalesced"] * 49 + ["miss"]
    assert (await post(http, url, CHAT))[1]["x-tiergate-cache"] == "hit"


@pytest.fixture
async def router(upstream, backup):
    r = Router(make_config(), table=table_from_dict(table_doc(upstream, backup), source="test"))
    await r.initialize()
    yield r
    await r.close()


async def test_a_waiter_that_goes_away_does_not_cancel_the_others(router, upstream):
    gate = asyncio.Event()
    upstream.default = Ok(gate=gate)
    tasks = [asyncio.create_task(router.complete("hi", temperature=0)) for _ in range(3)]
    await until(lambda: router.cache.coalesced == 2 and upstream.calls == 1)
    tasks[0].cancel()  # the leader's client disconnects
    await asyncio.wait([tasks[0]])
    assert tasks[0].cancelled()
    gate.set()
    answers = await asyncio.gather(*tasks[1:])
    assert [a.content for a in answers] == ["primary answered model-a"] * 2
    assert upstream.calls == 1 and upstream.completed == 1
    assert (await router.complete("hi", temperature=0)).cached is True


async def test_when_every_waiter_goes_away_the_upstream_call_is_cancelled(router, upstream):
    upstream.default = Hang()
    tasks = [asyncio.create_task(router.complete("hi", temperature=0)) for _ in range(2)]
    await until(lambda: router.cache.coalesced == 1 and upstream.calls == 1)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    await until(lambda: upstream.cancelled == 1 and router.cache.stats()["in_flight"] == 0)


async def test_an_upstream_failure_reaches_every_waiter(router, upstream, backup):
    upstream.default = Fail(400)
    results = await asyncio.gather(*[router.complete("hi", temperature=0) for _ in range(5)],
                                   return_exceptions=True)
    assert all(isinstance(r, UpstreamStatusError) and r.status == 400 for r in results)
    assert upstream.calls == 1 and router.cache.coalesced == 4
    # the deciding failure was a provider 500: the client sees the class it would have seen from it
    upstream.default = Fail(500)
    backup.default = Fail(500)
    results = await asyncio.gather(*[router.complete("hi", temperature=0) for _ in range(5)],
                                   return_exceptions=True)
    assert all(isinstance(r, UpstreamError) and r.status == 500 for r in results)
    assert router.cache.stats()["entries"] == 0 and router.cache.stats()["in_flight"] == 0


async def test_library_hit_sets_cached(router, upstream):
    first = await router.complete("hi", seed=1)
    second = await router.complete("hi", seed=1)
    assert (first.cached, second.cached) == (False, True)
    assert second.metadata["cache"] == "hit" and second.content == first.content
    assert upstream.calls == 1


async def test_library_stream_is_replayed_from_the_cache(router, upstream):
    answer = await router.complete("hi", temperature=0)
    chunks = [c async for c in router.stream("hi", temperature=0, stream_options={"include_usage": True})]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == answer.content and chunks[-1]["usage"] == answer.usage
    assert upstream.calls == 1
