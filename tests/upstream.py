"""A mock OpenAI-compatible upstream: a real aiohttp server on a loopback port that fails on command.

    upstream = MockUpstream(); await upstream.start()
    upstream.push(Fail(500), Fail(429, retry_after=1))   # the next two calls fail, then normal
    upstream.default = Fail(503)                         # every call fails from now on
    upstream.requests                                    # what it received (path, headers, json)

`MockUpstream(responses=True)` also speaks the Responses API (create, stream, retrieve, delete,
cancel, input_items); without it the upstream is chat-only and `/v1/responses` is a 404. Every
other `/v1/*` path (models/{id}, moderations, images, audio, files, batches, ...) answers like
OpenAI's, reading uploads in chunks (counted and hashed, never held) and streaming `speech`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Ok:
    """Answer normally (optionally after a delay, or with stream chunks held until `gate` is set)."""

    delay: float = 0.0
    gate: asyncio.Event | None = None
    content: str | None = None
    usage: dict[str, Any] | None = None  # added to the usage object (token details, ...)
    tool_calls: list[tuple[str, str]] | None = None  # (name, arguments): answer with these function calls
    tool_call: bool = False  # answer with a tool call (streamed as argument fragments)
    gap: float = 0.0  # seconds between stream chunks
    done: bool = True  # False: the stream ends cleanly after its last chunk, without `data: [DONE]`


@dataclass
class Fail:
    status: int = 500
    retry_after: float | str | None = None
    body: bytes | None = None
    retry_after_ms: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reset:
    """Close the connection without an answer."""


@dataclass
class Hang:
    """Accept the request and never answer (until the server stops)."""


@dataclass
class BreakStream:
    """Send `after` stream chunks, then cut the connection."""

    after: int = 2
    content: str | None = None
    tool_call: bool = False
    error_event: bool = False  # instead of cutting: send an SSE error event and end the stream


@dataclass
class StallStream:
    """Send `after` stream chunks, then go silent."""

    after: int = 2
    content: str | None = None


@dataclass
class MalformedChunk:
    """A stream with one event that is not JSON after `after` chunks; the rest follows as usual."""

    after: int = 2
    content: str | None = None


@dataclass
class InvalidJson:
    """Answer 200 with a body that is not JSON."""


@dataclass
class CloseEarly:
    """A stream framed by connection close (no chunked encoding) that stops after `after` events."""

    after: int = 2


@dataclass
class NotAStream:
    """Answer a stream request with a 200 that is not SSE: a JSON completion or an HTML page."""

    html: bool = False


@dataclass
class ErrorIn200:
    """A 200 whose body is an OpenAI error object (some gateways do this)."""


@dataclass
class FakeJson:
    """A 200 that begins with { and ends with } but is not JSON."""


@dataclass
class Huge:
    """A valid 200 chat completion of about `size` bytes."""

    size: int = 1 << 20


@dataclass
class Flaky:
    """Fail with `status` at random with probability `rate`, else answer normally."""

    rate: float = 0.3
    status: int = 500
    rng: random.Random = field(default_factory=lambda: random.Random(7))


Action = (Ok | Fail | Reset | Hang | BreakStream | StallStream | InvalidJson | Flaky | CloseEarly | NotAStream
          | ErrorIn200 | FakeJson | Huge | MalformedChunk)

OPENAI_VERSION = "2020-10-01"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    json: Any
    at: float
    method: str = "POST"
    query: str = ""
    size: int = 0  # body bytes (pass-through paths)
    sha256: str = ""
    head: bytes = b""  # the first 4 KiB of the body (pass-through paths)


class MockUpstream:
    def __init__(self, name: str = "upstream", models: tuple[str, ...] = ("model-a", "model-b"),
                 *, responses: bool = False, speech_bytes: int = 3 * 1024 * 1024, objects: bool = False):
        self.name = name
        self.models = models
        self.responses = responses
        self.speech_bytes = speech_bytes
        self.speech_cut = False  # break off the audio answer halfway (the connection closed, no end of body)
        self.stored: dict[str, dict[str, Any]] = {}  # Responses API: id -> {"response", "input"}
        # `objects`: files, batches and vector stores kept as OpenAI does (create, list, get, delete, cancel)
        self.objects: dict[str, dict[str, Any]] | None = {} if objects else None
        self.default: Action = Ok()
        self.script: list[Action] = []
        self.requests: list[Received] = []
        self.model_pricing: dict[str, dict[str, str]] = {}
        self.model_context: dict[str, int] = {}  # context_length listed by GET /models
        self.listings = 0  # GET /models answered
        self.cancelled = 0
        self.completed = 0
        self.fixed_id: str | None = None  # every chat answer carries this id (byte-exact comparisons)
        self.refuses_prefill: set[str] = set()  # models that answer a prefilled assistant message with a 400
        # model -> context window in tokens: a longer prompt (about 4 characters a token) is refused with a 400
        # as OpenAI words it, or in another server's words (`context_message`: {window} and {tokens} filled in)
        self.context_windows: dict[str, int] = {}
        self.context_message = ("This model's maximum context length is {window} tokens. However, your messages "
                                "resulted in {tokens} tokens. Please reduce the length of the messages.")
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> int:
        return len(self.requests)

    def push(self, *actions: Action) -> None:
        self.script.extend(actions)

    async def start(self, port: int = 0) -> MockUpstream:
        app = web.Application()
        app.on_response_prepare.append(self._openai_headers)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        if self.responses:
            app.router.add_post("/v1/responses", self._responses)
            app.router.add_get("/v1/responses/{id}", self._response_get)
            app.router.add_delete("/v1/responses/{id}", self._response_delete)
            app.router.add_post("/v1/responses/{id}/cancel", self._response_cancel)
            app.router.add_get("/v1/responses/{id}/input_items", self._response_input_items)
        app.router.add_route("*", "/v1/{tail:.*}", self._other)
        # A log line of the mock's own server is named as the mock's, never as tiergate's aiohttp.server
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     logger=logging.getLogger("tests.upstream"))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- behaviour ----------------------------------------------------------------------------

    async def _openai_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """The headers OpenAI sends with every answer, so tests can see them relayed."""
        response.headers.setdefault("x-request-id", f"req_{self.name}_{len(self.requests)}")
        response.headers.setdefault("openai-processing-ms", "42")
        response.headers.setdefault("openai-version", OPENAI_VERSION)
        response.headers.setdefault("x-ratelimit-limit-requests", "10000")
        response.headers.setdefault("x-ratelimit-remaining-requests", "9999")

    def _next(self) -> Action:
        return self.script.pop(0) if self.script else self.default

    async def _receive(self, request: web.Request) -> tuple[Any, Action]:
        body = orjson.loads(await request.read())
        self.requests.append(Received(request.path, dict(request.headers), body, time.monotonic()))
        action = self._next()
        if isinstance(action, Flaky):
            action = Fail(action.status) if action.rng.random() < action.rate else Ok()
        return body, action

    async def _fail_or_none(self, request: web.Request, action: Action) -> web.StreamResponse | None:
        if isinstance(action, Fail):
            headers = dict(action.headers)
            if action.retry_after is not None:
                headers["Retry-After"] = str(action.retry_after)
            if action.retry_after_ms is not None:
                headers["retry-after-ms"] = str(action.retry_after_ms)
            body = action.body or orjson.dumps({"error": {"message": f"{self.name} failed with {action.status}",
                                                          "type": "server_error" if action.status >= 500
                                                          else "invalid_request_error",
                                                          "param": None, "code": None}})
            return web.Response(status=action.status, body=body, headers=headers,
                                content_type="application/json")
        if isinstance(action, Reset):
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError()
        if isinstance(action, Hang):
            try:
                await self._stopping.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return web.Response(status=503)
        if isinstance(action, InvalidJson):
            return web.Response(status=200, body=b"<html>not json", content_type="application/json")
        if isinstance(action, ErrorIn200):
            return web.Response(status=200, content_type="application/json", body=orjson.dumps(
                {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}))
        if isinstance(action, FakeJson):
            return web.Response(status=200, body=b'{"choices": [oops]}', content_type="application/json")
        if isinstance(action, NotAStream) and action.html:
            return web.Response(status=200, body=b"<html><body>maintenance</body></html>", content_type="text/html")
        if isinstance(action, Ok) and action.delay:
            try:
                await asyncio.sleep(action.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, action = await self._receive(request)
        failed = await self._fail_or_none(request, action)
        if failed is not None:
            return failed
        model = body.get("model", "?")
        content = (action.content
                   if isinstance(action, (Ok, BreakStream, StallStream, MalformedChunk)) and action.content
                   else f"{self.name} answered {model}")
        messages = body.get("messages") or []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if model in self.context_windows:
            tokens = sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict)) // 4
            if tokens > self.context_windows[model]:
                message = self.context_message.format(window=self.context_windows[model], tokens=tokens)
                return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                                    "param": "messages", "code": "context_length_exceeded"
                                                    if "maximum context length" in message else None}}, status=400)
        if last.get("role") == "assistant" and model in self.refuses_prefill:  # as OpenAI's models do
            return web.json_response({"error": {"message": "Expected last role to be user or tool, got assistant",
                                                "type": "invalid_request_error", "param": "messages",
                                                "code": None}}, status=400)
        if last.get("role") == "assistant" and (last.get("prefix") or body.get("continue_final_message")):
            prefix = str(last.get("content") or "")  # a prefill: answer only what follows it
            content = content[len(prefix):] if content.startswith(prefix) else content
        words = content.split(" ")
        usage: dict[str, Any] = {"prompt_tokens": 10, "completion_tokens": len(words), "total_tokens": 10 + len(words),
                                 "prompt_tokens_details": {"cached_tokens": 4},
                                 "completion_tokens_details": {"reasoning_tokens": 1}}
        if isinstance(action, Ok) and action.usage:
            usage.update(action.usage)
        rid = self.fixed_id or f"chatcmpl-{self.name}-{len(self.requests)}"
        if isinstance(action, Huge):
            content = "x" * action.size
        calls = action.tool_calls if isinstance(action, Ok) else None
        if calls:
            return await self._chat_tool_calls(request, body, action, rid, calls, usage)
        if not body.get("stream") or isinstance(action, NotAStream):
            if isinstance(action, Ok) and action.gate is not None:  # hold the answer until the gate opens
                await action.gate.wait()
            self.completed += 1
            return web.Response(body=orjson.dumps({
                "id": rid, "object": "chat.completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": usage}), content_type="application/json")
        base = {"id": rid, "object": "chat.completion.chunk", "created": 1700000000, "model": model}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]
        if getattr(action, "tool_call", False):
            arguments = orjson.dumps({"city": content}).decode()
            pieces = [arguments[i:i + 6] for i in range(0, len(arguments), 6)]
            events += [{**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, **({"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": p}}
                                if i == 0 else {"function": {"arguments": p}})}]}, "finish_reason": None}]}
                for i, p in enumerate(pieces)]
            finish = "tool_calls"
        else:
            events += [{**base, "choices": [{"index": 0, "delta": {"content": (w if i == 0 else " " + w)},
                                             "finish_reason": None}]} for i, w in enumerate(words)]
            finish = "stop"
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        options = body.get("stream_options") or {}
        if options.get("include_usage"):  # as OpenAI: `"usage": null` on every chunk, then the usage event
            for event in events:
                event["usage"] = None
            events.append({**base, "choices": [], "usage": usage})
        return await self._stream(request, events, action)

    async def _stream(self, request: web.Request, events: list[dict[str, Any]], action: Action) -> web.StreamResponse:
        if isinstance(action, CloseEarly):  # HTTP/1.1 without length or chunks: the body ends at close
            assert request.transport is not None
            request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                                    + b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events[:action.after]))
            request.transport.close()
            raise asyncio.CancelledError()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i, event in enumerate(events):
                if isinstance(action, BreakStream) and i == action.after and action.error_event:
                    await response.write(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
                    await response.write_eof()
                    return response
                if isinstance(action, BreakStream) and i == action.after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if isinstance(action, MalformedChunk) and i == action.after:
                    await response.write(b'data: {"id": "chatcmpl-x", "choices": [{"delta": {"content": "oo\n\n')
                if isinstance(action, StallStream) and i == action.after:
                    await self._stopping.wait()
                    return response
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
                if i == 0 and isinstance(action, Ok) and action.gate is not None:
                    await action.gate.wait()
                if isinstance(action, Ok) and action.gap:
                    await asyncio.sleep(action.gap)
            if not isinstance(action, Ok) or action.done:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.completed += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except ConnectionResetError:  # the caller left mid-stream without cancelling this handler
            self.cancelled += 1
        return response

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, action = await self._receive(request)
        failed = await self._fail_or_none(request, action)
        if failed is not None:
            return failed
        model = body.get("model", "?")
        text = f"{self.name} completed {model}"
        if not body.get("stream"):
            self.completed += 1
            return web.Response(body=orjson.dumps({
                "id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}),
                content_type="application/json")
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": model}
        events = [{**base, "choices": [{"index": 0, "text": w + " ", "finish_reason": None, "logprobs": None}]}
                  for w in text.split()]
        events.append({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]})
        return await self._stream(request, events, action)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, action = await self._receive(request)
        failed = await self._fail_or_none(request, action)
        if failed is not None:
            return failed
        raw = body.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        self.completed += 1
        return web.Response(body=orjson.dumps({
            "object": "list", "model": body.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": [float(len(str(x))), float(i), 0.5]}
                     for i, x in enumerate(inputs)],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}),
            content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        self.listings += 1
        data = []
        for m in self.models:
            entry: dict[str, Any] = {"id": m, "object": "model", "created": 1700000000, "owned_by": self.name}
            if m in self.model_pricing:
                entry["pricing"] = self.model_pricing[m]
            if m in self.model_context:
                entry["context_length"] = self.model_context[m]
            data.append(entry)
        return web.json_response({"object": "list", "data": data})

    async def _chat_tool_calls(self, request: web.Request, body: dict[str, Any], action: Action, rid: str,
                               calls: list[tuple[str, str]], usage: dict[str, int]) -> web.StreamResponse:
        model = body.get("model", "?")
        tool_calls = [{"id": f"call_{self.name}_{i}", "type": "function",
                       "function": {"name": name, "arguments": arguments}} for i, (name, arguments) in enumerate(calls)]
        if not body.get("stream"):
            self.completed += 1
            return web.Response(body=orjson.dumps({
                "id": rid, "object": "chat.completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": tool_calls},
                             "finish_reason": "tool_calls", "logprobs": None}],
                "usage": usage}), content_type="application/json")
        base = {"id": rid, "object": "chat.completion.chunk", "created": 1700000000, "model": model}
        events = []
        for i, call in enumerate(tool_calls):  # name first, then the arguments in two pieces, as OpenAI does
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            events.append({**base, "choices": [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                {"index": i, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": ""}}]}}]})
            for piece in (arguments[:half], arguments[half:]):
                events.append({**base, "choices": [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                    {"index": i, "function": {"arguments": piece}}]}}]})
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        return await self._stream(request, events, action)

    # -- the Responses API (responses=True) ------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body, action = await self._receive(request)
        failed = await self._fail_or_none(request, action)
        if failed is not None:
            return failed
        model = body.get("model", "?")
        n = len(self.requests)
        rid = f"resp_{self.name}_{n}"
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            return web.json_response({"error": {"message": f"Previous response with id '{previous}' not found.",
                                                "type": "invalid_request_error", "param": "previous_response_id",
                                                "code": "previous_response_not_found"}}, status=400)
        text = (action.content if isinstance(action, Ok) and action.content
                else f"{self.name} responded {model}" + (f" after {previous}" if previous else ""))
        message = {"id": f"msg_{self.name}_{n}", "type": "message", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
        usage = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 0},
                 "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 16}
        response = {"id": rid, "object": "response", "created_at": 1700000000, "status": "completed",
                    "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
                    "model": model, "output": [message], "parallel_tool_calls": True,
                    "previous_response_id": previous, "store": body.get("store", True),
                    "tool_choice": "auto", "tools": [], "usage": usage}
        if body.get("store", True):
            self.stored[rid] = {"response": response, "input": body.get("input")}
        if not body.get("stream"):
            self.completed += 1
            return web.json_response(response, headers={"x-request-id": f"up_{rid}"})
        created = {**response, "status": "in_progress", "output": [], "usage": None}
        item = {**message, "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        ids = {"item_id": message["id"], "output_index": 0}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": created},
            {"type": "response.in_progress", "response": created},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.content_part.added", **ids, "content_index": 0, "part": part}]
        words = text.split(" ")
        events += [{"type": "response.output_text.delta", **ids, "content_index": 0,
                    "delta": w if i == 0 else " " + w, "logprobs": []} for i, w in enumerate(words)]
        events += [{"type": "response.output_text.done", **ids, "content_index": 0, "text": text, "logprobs": []},
                   {"type": "response.content_part.done", **ids, "content_index": 0, "part": {**part, "text": text}},
                   {"type": "response.output_item.done", "output_index": 0, "item": message},
                   {"type": "response.completed", "response": response}]
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        try:
            for i, event in enumerate(events):
                if isinstance(action, BreakStream) and i == action.after:
                    assert request.transport is not None
                    request.transport.abort()
                    return stream
                if i == 1 and isinstance(action, Ok) and action.gate is not None:  # hold the rest until the gate opens
                    await action.gate.wait()
                event = {**event, "sequence_number": i}
                await stream.write(f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n")
            await stream.write_eof()
        except ConnectionResetError:  # the caller left mid-stream
            self.cancelled += 1
            return stream
        self.completed += 1
        return stream

    def _record(self, request: web.Request, body: Any = None) -> None:
        self.requests.append(Received(request.path, dict(request.headers), body, time.monotonic(),
                                      request.method, request.query_string))

    def _stored_or_404(self, request: web.Request) -> dict[str, Any] | web.Response:
        self._record(request)
        found = self.stored.get(request.match_info["id"])
        if found is None:
            return web.json_response({"error": {"message": f"Response with id '{request.match_info['id']}' not "
                                                           "found.", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=404)
        return found

    async def _response_get(self, request: web.Request) -> web.Response:
        found = self._stored_or_404(request)
        return found if isinstance(found, web.Response) else web.json_response(found["response"])

    async def _response_delete(self, request: web.Request) -> web.Response:
        found = self._stored_or_404(request)
        if isinstance(found, web.Response):
            return found
        del self.stored[request.match_info["id"]]
        return web.json_response({"id": request.match_info["id"], "object": "response", "deleted": True})

    async def _response_cancel(self, request: web.Request) -> web.Response:
        found = self._stored_or_404(request)
        return found if isinstance(found, web.Response) else web.json_response(
            {**found["response"], "status": "cancelled"})

    async def _response_input_items(self, request: web.Request) -> web.Response:
        found = self._stored_or_404(request)
        if isinstance(found, web.Response):
            return found
        raw = found["input"]
        items = [{"id": "msg_in_0", "type": "message", "role": "user", "status": "completed",
                  "content": [{"type": "input_text", "text": raw}]}] if isinstance(raw, str) else list(raw or [])
        return web.json_response({"object": "list", "data": items, "first_id": "msg_in_0", "last_id": "msg_in_0",
                                  "has_more": False})

    # -- every other /v1/* path --------------------------------------------------------------------

    def _stored_object(self, method: str, path: str, body: Any, size: int) -> tuple[int, Any] | None:
        """Files, batches and vector stores with ids of their own, listed, read, cancelled and deleted."""
        assert self.objects is not None
        parts = path.removeprefix("/v1/").split("/")
        kinds = {"files": ("file", "file-"), "batches": ("batch", "batch_"), "vector_stores": ("vector_store", "vs_")}
        if parts[0] not in kinds:
            return None
        kind, prefix = kinds[parts[0]]
        if len(parts) == 1 and method == "POST":
            object_id = f"{prefix}{self.name}{len(self.objects) + 1}"
            extra = body if isinstance(body, dict) else {"bytes": size}
            self.objects[object_id] = {"id": object_id, "object": kind, "created_at": 1700000000, **extra}
            if kind == "batch":  # done at once: its results are a file the provider made
                output = f"file-{self.name}-output-{len(self.objects) + 1}"
                self.objects[output] = {"id": output, "object": "file", "purpose": "batch_output"}
                self.objects[object_id].update(status="completed", output_file_id=output)
            return 200, self.objects[object_id]
        if len(parts) == 1 and method == "GET":
            data = [o for o in self.objects.values() if o["object"] == kind]
            return 200, {"object": "list", "data": data, "has_more": False}
        found = self.objects.get(parts[1])
        if found is None:
            return 404, {"error": {"message": f"No such {kind}: {parts[1]}", "type": "invalid_request_error",
                                   "param": "id", "code": None}}
        if len(parts) == 2 and method == "DELETE":
            del self.objects[parts[1]]
            return 200, {"id": parts[1], "object": kind, "deleted": True}
        if len(parts) == 3 and parts[2] == "cancel":
            found["status"] = "cancelled"
        return 200, found

    async def _other(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's other endpoints, as far as the tests need them. The body is read in chunks, counted
        and hashed (a multi-MB upload is never held); a JSON body is parsed."""
        digest = hashlib.sha256()
        size = 0
        is_json = request.content_type == "application/json"
        kept = bytearray()
        head = b""
        async for chunk in request.content.iter_chunked(256 * 1024):
            size += len(chunk)
            digest.update(chunk)
            if len(head) < 4096:
                head = (head + chunk)[:4096]
            if is_json:
                kept += chunk
        body = orjson.loads(kept) if is_json and kept else None
        self.requests.append(Received(request.path, dict(request.headers), body, time.monotonic(),
                                      request.method, request.query_string, size, digest.hexdigest(), head))
        action = self._next()
        failed = await self._fail_or_none(request, action)
        if failed is not None:
            return failed
        path, method = request.path, request.method
        headers = {"x-request-id": f"up_req_{len(self.requests)}", "openai-processing-ms": "7"}
        model = body.get("model") if isinstance(body, dict) else None
        answer: Any
        kept = self._stored_object(method, path, body, size) if self.objects is not None else None
        if kept is not None:
            status, answer = kept
            return web.json_response(answer, status=status, headers=headers)
        if method == "GET" and path.startswith("/v1/models/"):
            answer = {"id": path.removeprefix("/v1/models/"), "object": "model", "created": 1700000000,
                      "owned_by": self.name}
        elif path == "/v1/moderations":
            answer = {"id": "modr-1", "model": model or "omni-moderation-latest",
                      "results": [{"flagged": False, "categories": {"violence": False},
                                   "category_scores": {"violence": 0.01}}]}
        elif path == "/v1/images/generations":
            answer = {"created": 1700000000, "data": [{"url": f"https://{self.name}.example/{model}.png"}]}
        elif path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            answer = {"text": f"{self.name} heard {size} bytes"}
        elif path == "/v1/audio/speech":
            return await self._speech(request, headers)
        elif path == "/v1/files" and method == "POST":
            answer = {"id": "file-1", "object": "file", "bytes": size, "created_at": 1700000000,
                      "filename": "upload", "purpose": "batch", "status": "processed"}
        elif path == "/v1/files" and method == "GET":
            answer = {"object": "list", "data": [], "has_more": False}
        elif path == "/v1/batches" and method == "POST":
            answer = {"id": "batch_1", "object": "batch", "endpoint": body.get("endpoint"),
                      "input_file_id": body.get("input_file_id"), "completion_window": "24h",
                      "status": "validating", "created_at": 1700000000}
        elif path.startswith("/v1/chat/completions/"):
            answer = {"id": path.rsplit("/", 1)[1], "object": "chat.completion", "created": 1700000000,
                      "model": "stored", "choices": []}
        else:
            return web.json_response({"error": {"message": f"{self.name}: no {method} {path}",
                                                "type": "invalid_request_error", "param": None,
                                                "code": "unknown_url"}}, status=404, headers=headers)
        self.completed += 1
        return web.json_response(answer, headers=headers)

    async def _speech(self, request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={**headers, "Content-Type": "audio/mpeg",
                                               "Content-Length": str(self.speech_bytes)})
        await response.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        left = self.speech_bytes
        try:
            while left > 0:
                if self.speech_cut and left <= self.speech_bytes // 2:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(block[:left])
                left -= len(block)
            await response.write_eof()
        except ConnectionResetError:  # the caller left mid-answer: a provider just stops writing
            self.cancelled += 1
            return response
        self.completed += 1
        return response

@contextmanager
def upstream_in_thread(name: str = "primary") -> Iterator[MockUpstream]:
    """A MockUpstream on an event loop of its own thread, for code that runs (and closes) its own
    loops: `asyncio.run()` twice, FastAPI's TestClient."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"upstream-{name}", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(MockUpstream(name).start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
