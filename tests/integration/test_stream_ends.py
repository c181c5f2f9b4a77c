"""How a stream's end is judged: a Chat Completions stream whose body ended cleanly after every choice's
`finish_reason` (and the usage event, when asked for) lacked only `data: [DONE]`, and is ended with it;
one cut before its `finish_reason` still ends with the error event."""

from __future__ import annotations

import logging

import orjson
from openai import AsyncOpenAI

from proxy.protocol.sse import finished

from ..conftest import table_doc
from ..telemetry_support import config_with, running
from ..upstream import CloseEarly, Ok

ANSWER = "one two three four five"
MESSAGES = [{"role": "user", "content": "count"}]


def request_lines(caplog) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tiergate.requests"]


async def test_a_whole_answer_without_done_is_ended_with_done_and_counted_complete(upstream, backup, http, caplog):
    caplog.set_level(logging.INFO)
    upstream.default = Ok(content=ANSWER, done=False)
    async with running(table_doc(upstream, backup), config_with(request_log="logging")) as (url, router):
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="auto", messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert router.breakers.get("primary/model-a").failures == 0
    assert body.endswith(b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n') and b'"error"' not in body
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [(line["status"], line["error"], line.get("stream_error")) for line in request_lines(caplog)] == [
        (200, None, None), (200, None, None)]
    assert backup.calls == 0


async def test_a_stream_that_ends_cleanly_before_its_finish_reason_still_ends_with_the_error_event(upstream, http):
    upstream.push(Ok(), CloseEarly(after=3))  # the role chunk and two words, then a clean end of body
    async with running(table_doc(upstream), config_with()) as (url, _):
        async with http.post(url + "/v1/chat/completions", json={"model": "auto", "messages": MESSAGES}) as resp:
            await resp.read()  # a pooled connection first: the close-framed answer comes on it
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
    assert b"[DONE]" not in body and body.rstrip().endswith(b'"code":"upstream_incomplete"}}')


def event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def choice(index: int, finish: str | None, **extra) -> dict:
    return {"id": "c", "choices": [{"index": index, "delta": {"content": "x"}, "finish_reason": finish}], **extra}


def test_finished_needs_every_choice_finished_and_the_usage_asked_for():
    both = event(choice(0, None)) + event(choice(1, None)) + event(choice(0, "stop")) + event(choice(1, "length"))
    assert finished(both, usage_asked=False)
    assert not finished(event(choice(0, None)) + event(choice(1, None)) + event(choice(0, "stop")), usage_asked=False)
    assert not finished(event(choice(0, None)), usage_asked=False)
    assert not finished(event(choice(0, "stop"))[:-1], usage_asked=False)  # its last event not whole
    assert not finished(event(choice(0, "stop")) + b'data: {"error": {"message": "x"}}\n\n', usage_asked=False)
    usage = event({"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert not finished(event(choice(0, "stop")), usage_asked=True)
    assert finished(event(choice(0, "stop")) + usage, usage_asked=True)
    # the client asked for usage (OpenAI's "usage":null on every chunk), and it never came
    assert not finished(event(choice(0, "stop", usage=None)), usage_asked=False)
    assert finished(event(choice(0, "stop", usage=None)) + usage, usage_asked=False)
