"""Usage and cost of every stream: tiergate asks the provider for the usage event, takes it out of
what a client that did not ask receives (byte for byte the provider's stream without it), and counts
tokens and cost; a stream cut short is charged an estimate, flagged in the request log."""

from __future__ import annotations

import logging

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI

from proxy.protocol.sse import UsageFilter, assemble

from ..conftest import table_doc
from ..telemetry_support import PRICING, config_with, parse_metrics, running, value
from ..upstream import BreakStream, Ok

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
ANSWER = "one two three four five"


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tiergate.requests"]


async def raw(http: aiohttp.ClientSession, url: str, body: dict) -> bytes:
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        return await resp.read()


async def test_usage_is_asked_upstream_and_removed_downstream_byte_exact(upstream, backup, http):
    upstream.fixed_id = "chatcmpl-fixed"
    upstream.default = Ok(content=ANSWER)
    direct = await raw(http, upstream.url + "/chat/completions", {**CHAT, "model": "model-a"})
    assert b'"usage"' not in direct
    async with running(table_doc(upstream, backup), config_with()) as (url, _):
        through = await raw(http, url + "/v1/chat/completions", CHAT)
        assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
        assert through == direct  # the provider's stream without the usage tiergate asked for
        # a client that asked gets the usage event as the provider sent it
        asked = {**CHAT, "stream_options": {"include_usage": True}}
        direct_usage = await raw(http, upstream.url + "/chat/completions", {**asked, "model": "model-a"})
        assert await raw(http, url + "/v1/chat/completions", asked) == direct_usage
        assert b'"choices":[],"usage":{' in direct_usage


async def test_the_sdk_sees_no_usage_it_did_not_ask_for_and_the_stream_is_charged(upstream, backup, caplog):
    caplog.set_level(logging.INFO)
    upstream.default = Ok(content=ANSWER)
    doc = {**table_doc(upstream, backup), "pricing": PRICING}
    async with running(doc, config_with(request_log="logging")) as (url, router):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="auto", messages=CHAT["messages"], stream=True)
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        assert all(c.choices and c.usage is None for c in chunks)
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/metrics") as resp:
                metrics = parse_metrics(await resp.text())
        snapshot = router.get_metrics()
    # 10 prompt tokens at $1/M, 5 completion tokens at $2/M
    assert value(metrics, "tiergate_tokens_total", model="primary/model-a", type="prompt") == 10
    assert value(metrics, "tiergate_tokens_total", model="primary/model-a", type="completion") == 5
    assert value(metrics, "tiergate_cost_usd_total", model="primary/model-a") == pytest.approx(20e-6)
    assert snapshot["tokens"] == {"prompt": 10, "completion": 5, "total": 15, "cached_prompt": 4, "reasoning": 1}
    assert snapshot["cost_usd"] == pytest.approx(20e-6)
    (line,) = request_lines(caplog)
    assert line["stream"] is True and line["prompt_tokens"] == 10 and line["completion_tokens"] == 5
    assert line["cost_usd"] == pytest.approx(20e-6)
    assert line["cached_tokens"] == 4 and line["reasoning_tokens"] == 1
    assert "usage_estimated" not in line


async def test_a_stream_cut_short_is_charged_an_estimate(upstream, backup, http, caplog):
    caplog.set_level(logging.INFO)
    upstream.push(BreakStream(after=4, content="alpha beta gamma delta epsilon zeta"))
    doc = {**table_doc(upstream, backup, stream_recovery="off"), "pricing": PRICING}
    async with running(doc, config_with(request_log="logging")) as (url, _):
        body = await raw(http, url + "/v1/chat/completions", CHAT)
    assert body.rstrip().endswith(b'"code":"upstream_connection"}}') and b"[DONE]" not in body
    (line,) = request_lines(caplog)
    assert line["usage_estimated"] is True and line["stream_error"] == "connection"
    # "alpha beta gamma" relayed: about 16 characters, 4 tokens; the prompt from the request's size
    assert 2 <= line["completion_tokens"] <= 8 and line["prompt_tokens"] > 0 and line["cost_usd"] > 0


def test_the_filter_holds_an_event_split_across_reads():
    event = (b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],'
             b'"usage":null}\n\n')
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    stream = event + usage + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):  # every place a read may end
        f = UsageFilter()
        out = f.feed(stream[:cut]) + f.feed(stream[cut:]) + f.flush()
        assert out == event.replace(b',"usage":null', b"") + b"data: [DONE]\n\n"
        assert f.usage == usage.rstrip()


def test_a_complete_stream_assembles_into_its_completion():
    events = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": d, "finish_reason": f}]}
              for d, f in (({"role": "assistant", "content": ""}, None), ({"content": "a"}, None),
                           ({"content": "b"}, None), ({}, "stop"))]
    chunks = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events]
    body = orjson.loads(assemble([*chunks, b"data: [DONE]\n\n"]))
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "ab"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert assemble(chunks) is None  # no final event: never stored



def test_the_filter_reads_other_layouts_and_leaves_usage_on_a_content_chunk():
    spaced = (b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": null}\n\n'
              b'data: {"usage": null, "id": "x", "choices": []}\n\n')
    f = UsageFilter()
    assert f.feed(spaced) == (b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
                              b'data: {"id": "x", "choices": []}\n\n')
    final = (b'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens":1}}\n\n')
    assert f.feed(final) == final and f.usage is None  # usage on a content chunk: not rewritten
