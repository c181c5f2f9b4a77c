"""Shared and stored streams: identical cacheable streaming requests in flight at once share one
upstream stream, each client at its own pace; a complete stream is stored as its completion and
replayed to later identical requests, streamed or not."""

from __future__ import annotations

import asyncio

import orjson
from openai import AsyncOpenAI

from proxy.engine.fanout import SharedStream
from proxy.outcome import Result, StreamState
from proxy.types import ModelRef

from ..conftest import table_doc, until
from ..telemetry_support import config_with, running
from ..upstream import BreakStream, Ok

ANSWER = "the quick brown fox jumps over the lazy dog"
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 0}


async def test_five_identical_streams_share_one_upstream_call(upstream, backup, http):
    upstream.fixed_id = "chatcmpl-shared"
    upstream.default = Ok(content=ANSWER)
    direct = await (await http.post(upstream.url + "/chat/completions", json={**CHAT, "model": "model-a"})).read()
    gate = asyncio.Event()
    upstream.default = Ok(content=ANSWER, gate=gate)  # holds the stream after its first chunk
    async with running(table_doc(upstream, backup), config_with()) as (url, router):
        calls_before = upstream.calls
        responses = []
        for _ in range(5):
            responses.append(await http.post(url + "/v1/chat/completions", json=CHAT))
            await until(lambda n=len(responses): router.cache.stats()["coalesced"] == n - 1)
        assert upstream.calls == calls_before + 1
        assert [r.headers["x-tiergate-cache"] for r in responses] == ["miss"] + ["coalesced"] * 4
        # the first client (whose request started the upstream call) leaves after its first chunk: the
        # others go on, the upstream is not cancelled
        leaver = responses.pop(0)
        assert (await leaver.content.readany()).startswith(b"data: ")
        leaver.close()
        await until(lambda: router.cache.stats()["stream_subscribers"] == 4)
        gate.set()
        bodies = await asyncio.gather(*(r.read() for r in responses))
        assert all(body == direct for body in bodies)  # the provider's bytes, usage taken out
        assert upstream.calls == calls_before + 1 and upstream.completed == 2 and upstream.cancelled == 0
        await until(lambda: router.cache.stats()["streams_stored"] == 1)


async def test_a_non_stream_request_joins_an_identical_stream_in_flight(upstream, backup, http):
    gate = asyncio.Event()
    upstream.default = Ok(content=ANSWER, gate=gate)
    async with running(table_doc(upstream, backup), config_with()) as (url, router):
        streamed = await http.post(url + "/v1/chat/completions", json=CHAT)
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        whole = asyncio.create_task(client.chat.completions.with_raw_response.create(
            model="auto", messages=CHAT["messages"], temperature=0))
        await until(lambda: router.cache.stats()["stream_subscribers"] == 2)
        gate.set()
        raw = await whole
        assert raw.headers["x-tiergate-cache"] == "coalesced"
        assert raw.parse().choices[0].message.content == ANSWER
        assert (await streamed.read()).endswith(b"data: [DONE]\n\n")
        assert upstream.calls == 1


async def test_a_stored_stream_is_replayed_streamed_and_not(upstream, backup):
    upstream.default = Ok(content=ANSWER)
    async with running(table_doc(upstream, backup), config_with()) as (url, router):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        first = await client.chat.completions.create(model="auto", messages=CHAT["messages"], temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in first]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 10
        await until(lambda: router.cache.stats()["streams_stored"] == 1)
        calls = upstream.calls
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=CHAT["messages"], temperature=0, stream=True)
        assert raw.headers["x-tiergate-cache"] == "hit"
        replayed = [c async for c in raw.parse()]
        assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) == ANSWER
        assert replayed[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in replayed)
        whole = await client.chat.completions.with_raw_response.create(
            model="auto", messages=CHAT["messages"], temperature=0)
        assert whole.headers["x-tiergate-cache"] == "hit"
        completion = whole.parse()
        assert completion.choices[0].message.content == ANSWER and completion.usage.completion_tokens == 9
        assert upstream.calls == calls


async def test_an_incomplete_stream_is_not_stored_and_leaving_all_cancels_upstream(upstream, backup, http):
    upstream.push(BreakStream(after=3, content=ANSWER))
    async with running(table_doc(upstream, backup, stream_recovery="off"), config_with()) as (url, router):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            body = await resp.read()
        assert b"[DONE]" not in body and b'"error"' in body
        await until(lambda: router.cache.stats()["streams_in_flight"] == 0)
        assert router.cache.stats()["streams_stored"] == 0 and router.cache.stats()["entries"] == 0
        gate = asyncio.Event()
        upstream.default = Ok(content=ANSWER, gate=gate)
        first = await http.post(url + "/v1/chat/completions", json=CHAT)
        second = await http.post(url + "/v1/chat/completions", json=CHAT)
        assert second.headers["x-tiergate-cache"] == "coalesced"
        first.close()
        second.close()
        await until(lambda: upstream.cancelled == 1)  # the last reader left: the upstream call ended
        assert router.cache.stats()["streams_in_flight"] == 0


async def test_a_slow_subscriber_is_cut_and_never_slows_the_others():
    chunks = [b"data: " + orjson.dumps({"n": i, "pad": "x" * 50}) + b"\n\n" for i in range(20)]
    state = StreamState()

    async def upstream_stream():
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0)
        yield b"data: [DONE]\n\n"
        state.completed = True

    async def call() -> Result:
        return Result(200, ModelRef("p", "m"), [], stream=upstream_stream(), stream_state=state,
                      content_type="text/event-stream")

    shared = SharedStream(call, max_lag=300)
    fast, slow = shared.subscribe(), shared.subscribe()
    fast_result = await fast.result(leader=True, client_usage=True)
    slow_result = await slow.result(leader=False, client_usage=True)
    got = [chunk async for chunk in fast_result.stream]
    assert got == [*chunks, b"data: [DONE]\n\n"] and fast_result.stream_state.completed
    late = [chunk async for chunk in slow_result.stream]  # it read nothing while the stream ran
    assert len(late) == 1 and b"stream_subscriber_too_slow" in late[0]
    assert slow_result.stream_state.error == "subscriber_too_slow"
