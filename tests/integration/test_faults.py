"""Never less reliable than calling the provider directly: providers that hang, cut streams, answer
garbage or too much; ordinary load of long streams; bodies that cannot be re-encoded. Real tiergate,
real sockets, a mock upstream that misbehaves on command."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import orjson
import pytest

from ..conftest import BACKUP_KEY, PRIMARY_KEY, table_doc, until
from ..upstream import CloseEarly, ErrorIn200, Fail, FakeJson, Hang, Huge, NotAStream, Ok, StallStream

CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


async def post(http, url, body=CHAT, headers=None):
    async with http.post(url, data=orjson.dumps(body), headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


# -- a hung provider is fallen back from -------------------------------------------------------


async def test_a_hung_stream_falls_back_after_the_first_byte_budget(upstream, backup, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, backup), first_byte_timeout=0.3, timeout=30)
    upstream.default = Hang()
    started = time.monotonic()
    status, headers, raw = await post(http, running.v1 + "/chat/completions", STREAM)
    assert status == 200 and headers["x-tiergate-model"] == "backup/model-b"
    assert events(raw)[-1] == b"data: [DONE]"
    assert time.monotonic() - started < 5  # not the whole deadline


async def test_a_route_may_give_a_reasoning_model_longer_before_its_first_byte(upstream, backup, start_tiergate,
                                                                                http):
    running = await start_tiergate(table_doc(upstream, backup, first_byte_timeout=2.0), first_byte_timeout=0.2)
    upstream.push(Ok(delay=0.5))
    status, headers, raw = await post(http, running.v1 + "/chat/completions", STREAM)
    assert status == 200 and headers["x-tiergate-model"] == "primary/model-a"


async def test_a_slow_non_stream_answer_is_not_cut_by_the_first_byte_budget(upstream, start_tiergate, http):
    # a non-stream answer's first byte is the whole answer: only the deadline bounds it
    running = await start_tiergate(table_doc(upstream), first_byte_timeout=0.1)
    upstream.push(Ok(delay=0.6))
    status, _, _ = await post(http, running.v1 + "/chat/completions")
    assert status == 200


async def test_a_hung_non_stream_provider_is_fallen_back_from_after_the_first_byte_budget(upstream, backup,
                                                                                          start_tiergate, http):
    # a non-stream answer's first byte is all of it: once it is late, the rest of the route starts alongside
    running = await start_tiergate(table_doc(upstream, backup), first_byte_timeout=0.3, timeout=30)
    upstream.default = Hang()
    started = time.monotonic()
    status, headers, raw = await post(http, running.v1 + "/chat/completions")
    assert status == 200 and headers["x-tiergate-model"] == "backup/model-b"
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "backup answered model-b"
    assert time.monotonic() - started < 5  # not the whole deadline
    assert headers["x-tiergate-attempts"] == "2"
    assert running.router.breakers.get("primary/model-a").failures == 1  # the hung attempt counts
    await until(lambda: upstream.cancelled == 1)  # and its connection was given up
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="k", max_retries=0, timeout=10) as client:
        answer = await client.chat.completions.create(model="general_purpose", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "backup answered model-b"


async def test_a_slow_non_stream_answer_still_wins_when_the_rest_fails_or_hangs(upstream, backup, start_tiergate,
                                                                               http):
    running = await start_tiergate(table_doc(upstream, backup), first_byte_timeout=0.1, timeout=30)
    for rest in (Fail(500), Hang()):
        upstream.push(Ok(delay=0.6))
        backup.default = rest  # every try of the rest
        status, headers, raw = await post(http, running.v1 + "/chat/completions")
        assert status == 200 and headers["x-tiergate-model"] == "primary/model-a", rest
        assert orjson.loads(raw)["choices"][0]["message"]["content"] == "primary answered model-a"
    await until(lambda: backup.cancelled == 1)  # the hung rest was cancelled once the slow one answered


async def test_the_rest_started_alongside_stays_within_the_retry_setting(upstream, backup, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, backup), first_byte_timeout=0.2, timeout=1.5, max_retries=2)
    upstream.default = Hang()
    backup.default = Fail(500)
    status, headers, _ = await post(http, running.v1 + "/chat/completions")
    # the hung one is waited for to the deadline (it might still answer), then the backup's 500 decides
    assert status == 500 and headers["x-should-retry"] == "false"
    assert len(upstream.requests) + len(backup.requests) == 2  # one each: not 1 + 2


async def test_without_another_candidate_a_late_first_byte_changes_nothing(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), first_byte_timeout=0.1, timeout=0.5)
    upstream.default = Hang()
    status, _, raw = await post(http, running.v1 + "/chat/completions")
    assert status == 504 and orjson.loads(raw)["error"]["code"] == "upstream_timeout"


# -- streams never end as if complete ----------------------------------------------------------


async def test_a_close_framed_stream_that_stops_early_ends_with_an_error_event(start_tiergate, upstream, backup,
                                                                              http):
    tiergate = await start_tiergate(table_doc(upstream, backup, stream_recovery="off"))
    upstream.push(Ok(), CloseEarly(after=3))
    await post(http, tiergate.v1 + "/chat/completions")  # warm the connection pool
    status, _, raw = await post(http, tiergate.v1 + "/chat/completions", STREAM)
    assert status == 200
    last = events(raw)[-1]
    assert b"[DONE]" not in raw and orjson.loads(last[len(b"data: "):])["error"]["code"] == "upstream_incomplete"


async def test_the_sdk_raises_on_a_stream_that_stops_early(start_tiergate, upstream, backup):
    tiergate = await start_tiergate(table_doc(upstream, backup, stream_recovery="off"))
    upstream.push(CloseEarly(after=3))
    async with openai.AsyncOpenAI(base_url=tiergate.v1, api_key="k", max_retries=0) as client:
        stream = await client.chat.completions.create(model="general_purpose", messages=CHAT["messages"],
                                                      stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


@pytest.mark.parametrize("answer", [NotAStream(), NotAStream(html=True)])
async def test_a_stream_request_answered_without_sse_falls_back(tiergate, upstream, backup, http, answer):
    upstream.push(answer)
    status, headers, raw = await post(http, tiergate.v1 + "/chat/completions", STREAM)
    assert status == 200 and headers["x-tiergate-model"] == "backup/model-b"
    assert events(raw)[-1] == b"data: [DONE]"
    assert tiergate.router.breakers.get("primary/model-a").failures == 1


async def test_a_stream_that_stalls_ends_with_an_error_event(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), stream_idle_timeout=0.3)
    upstream.push(StallStream(after=2))
    status, _, raw = await post(http, running.v1 + "/chat/completions", STREAM)
    assert status == 200 and b"[DONE]" not in raw
    assert orjson.loads(events(raw)[-1][6:])["error"]["code"] == "upstream_timeout"


# -- answers that are not answers -----------------------------------------------------------------


@pytest.mark.parametrize("answer,outcome", [(ErrorIn200(), "error_body"), (FakeJson(), "invalid_response")])
async def test_a_200_that_is_not_an_answer_falls_back_and_is_never_cached(tiergate, upstream, backup, http,
                                                                          answer, outcome):
    upstream.push(answer)
    body = {**CHAT, "temperature": 0}  # cacheable
    status, headers, raw = await post(http, tiergate.v1 + "/chat/completions", body)
    assert status == 200 and headers["x-tiergate-model"] == "backup/model-b"
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "backup answered model-b"
    assert tiergate.router.breakers.get("primary/model-a").failures == 1
    # with the backup gone the primary's bad answer must not come back from the cache either
    upstream.default = answer
    backup.default = Fail(500)
    status, headers, raw = await post(http, tiergate.v1 + "/chat/completions", {**body, "seed": 9})
    assert status >= 500 and b"oops" not in raw
    assert tiergate.router.cache.stats()["entries"] == 1  # only the backup's real answer


async def test_an_answer_over_the_size_bound_is_a_failed_attempt(upstream, backup, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, backup), max_response_bytes=64 * 1024)
    upstream.push(Huge(size=200 * 1024))
    status, headers, _ = await post(http, running.v1 + "/chat/completions")
    assert status == 200 and headers["x-tiergate-model"] == "backup/model-b"
    upstream.push(Huge(size=200 * 1024), Huge(size=200 * 1024))
    backup.default = Huge(size=200 * 1024)
    status, _, raw = await post(http, running.v1 + "/chat/completions", {**CHAT, "seed": 2})
    assert status == 502 and b"too_large" in raw


# -- bad input and bad configuration ------------------------------------------------------------


@pytest.mark.parametrize("depth", [255, 600, 1000])
async def test_a_deeply_nested_body_is_a_400_not_a_500(tiergate, http, depth):
    nested = "[" * depth + "]" * depth
    raw = b'{"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}], "x": ' \
        + nested.encode() + b"}"
    async with http.post(tiergate.v1 + "/chat/completions", data=raw) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_a_failure_inside_an_attempt_is_an_attempt_failure_not_a_500(upstream, backup, start_tiergate, http):
    # a header aiohttp refuses to send: the attempt fails inside tiergate; the fallback answers
    doc = table_doc(upstream, backup)
    doc["providers"]["primary"]["headers"] = {"x-broken": "a\r\nb"}
    running = await start_tiergate(doc, breaker_failure_threshold=2)
    for _ in range(2):
        status, headers, _ = await post(http, running.v1 + "/chat/completions")
        assert status == 200 and headers["x-tiergate-model"] == "backup/model-b"
    assert running.router.breakers.get("primary/model-a").state == "open"  # counted, so it is skipped


# -- relayed errors never carry tiergate's provider keys ----------------------------------------


async def test_an_upstream_401_is_relayed_without_the_providers_key(tiergate, upstream, http):
    quoted = f"Incorrect API key provided: {PRIMARY_KEY[:8]}{'*' * 12}{PRIMARY_KEY[-4:]}. Also {PRIMARY_KEY}."
    upstream.push(Fail(401, body=orjson.dumps({"error": {"message": quoted, "type": "invalid_request_error",
                                                         "param": None, "code": "invalid_api_key"}})))
    status, _, raw = await post(http, tiergate.v1 + "/chat/completions")
    assert status == 401
    for fragment in (PRIMARY_KEY, PRIMARY_KEY[:8], PRIMARY_KEY[-4:]):
        assert fragment.encode() not in raw
    assert orjson.loads(raw)["error"]["code"] == "invalid_api_key"
    assert BACKUP_KEY.encode() not in raw


# -- ordinary load: long streams, many at once ---------------------------------------------------


async def test_two_thousand_concurrent_streams_all_complete_with_the_default_pool(upstream, start_tiergate):
    # every stream held open upstream at once (the old pool of 120 marked the provider down at 121);
    # the defaults of a real sidecar, but for the test's own short deadline
    running = await start_tiergate(table_doc(upstream), timeout=120.0, first_byte_timeout=60.0)
    gate = asyncio.Event()
    upstream.default = Ok(gate=gate)
    n = 2000
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        async def one() -> bytes:
            _, _, raw = await post(client, running.v1 + "/chat/completions", STREAM)
            return raw

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        deadline = time.monotonic() + 120
        while len(upstream.requests) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(upstream.requests) == n  # all of them upstream at once
        gate.set()
        raws = await asyncio.gather(*tasks)
        assert sum(events(r)[-1] == b"data: [DONE]" for r in raws) == n
        assert running.router.breakers.get("primary/model-a").snapshot()["state"] == "closed"
        status, _, _ = await post(client, running.v1 + "/chat/completions")
        assert status == 200


async def test_a_full_pool_queues_within_the_deadline_and_is_not_the_providers_fault(
        upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), connection_pool_size=2, connection_pool_overflow=0,
                                   first_byte_timeout=0.3)
    gate = asyncio.Event()
    upstream.default = Ok(gate=gate)
    held = [asyncio.create_task(post(http, running.v1 + "/chat/completions", STREAM)) for _ in range(2)]
    deadline = time.monotonic() + 10
    while len(upstream.requests) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(post(http, running.v1 + "/chat/completions", STREAM))
    await asyncio.sleep(0.6)  # longer than the first-byte budget: the wait for a slot is not counted in it
    assert not waiting.done()
    gate.set()
    for status, _, raw in await asyncio.gather(*held, waiting):
        assert status == 200 and events(raw)[-1] == b"data: [DONE]"
    assert running.router.breakers.get("primary/model-a").failures == 0
