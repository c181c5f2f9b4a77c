"""A chat stream event whose `data:` is neither JSON nor `[DONE]` breaks the stream: it is never relayed,
the stream ends with the error event (`upstream_malformed`, which the OpenAI SDK raises) and counts as
a failure of the deployment; on a `stream_recovery: continue` route the answer is continued."""

from __future__ import annotations

import openai
import pytest
from openai import AsyncOpenAI

from proxy.protocol.sse import WholeEvents, first_malformed

from ..conftest import table_doc
from ..telemetry_support import config_with, running
from ..upstream import MalformedChunk, Ok

ANSWER = "one two three four five six seven"
MESSAGES = [{"role": "user", "content": "count"}]


async def test_a_malformed_chunk_is_not_relayed_and_ends_the_stream_with_the_error_event(upstream, backup, http):
    upstream.default = MalformedChunk(after=3, content=ANSWER)  # role chunk, "one", " two", then the bad event
    async with running(table_doc(upstream, backup, stream_recovery="off"), config_with()) as (url, router):
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
        assert router.breakers.get("primary/model-a").failures == 1
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        text = []
        with pytest.raises(openai.APIError, match="not JSON"):
            async for chunk in stream:
                text.extend(c.delta.content or "" for c in chunk.choices)
        assert router.breakers.get("primary/model-a").failures == 2
    assert b"[DONE]" not in body and b'"oo' not in body and b" three" not in body
    assert body.count(b"data: ") == 4  # the role chunk, "one", " two", the error event
    assert body.rstrip().endswith(b'"code":"upstream_malformed"}}')
    assert "".join(text) == "one two"
    assert backup.calls == 0  # content was relayed: no silent restart without recovery


async def test_on_a_recovering_route_a_malformed_chunk_is_continued_by_the_next_model(upstream, backup):
    doc = table_doc(upstream, backup, stream_recovery="continue")
    doc["providers"]["backup"]["continuation"] = "prefix"
    upstream.push(MalformedChunk(after=3, content=ANSWER))
    backup.default = Ok(content=ANSWER)
    async with running(doc, config_with()) as (url, router):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert backup.requests[-1].json["messages"][-1] == {"role": "assistant", "content": "one two", "prefix": True}


def test_only_events_that_are_neither_an_object_nor_done_are_malformed():
    good = b'data: {"a": 1}\n\n'
    assert first_malformed(good) == -1
    assert first_malformed(good + b"data: [DONE]\n\n") == -1
    assert first_malformed(b": keep-alive\n\n" + good + b'event: x\r\ndata: {"b":\r\ndata: 2}\r\n\r\n') == -1
    assert first_malformed(good + b'data: {"a": "cut\n\n' + good) == len(good)
    assert first_malformed(b"data: oops\n\n") == 0
    assert first_malformed(good + b"data: \n\n") == len(good)  # an empty payload is not an event of a chat stream


def test_an_event_split_across_reads_is_held_until_its_end():
    events = WholeEvents()
    assert events.feed(b'data: {"a"') == b""
    assert events.feed(b': 1}\n\ndata: {') == b'data: {"a": 1}\n\n'
    assert events.feed(b"}\n\n") == b"data: {}\n\n"
    assert events.feed(b"data: [DONE]") == b"" and events.flush() == b"data: [DONE]"
