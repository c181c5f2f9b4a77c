"""A mock OpenAI-compatible upstream: a real aiohttp server on a loopback port that fails on command.

    upstream = MockUpstream(); await upstream.start()
    upstream.push(Fail(500), Fail(429, retry_after=1))   # the next two calls fail, then normal
    upstream.default = Fail(503)                         # every call fails from now on
    upstream.requests                                    # what it received (path, headers, json)
"""

from __future__ import annotations

import asyncio
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
    tool_call: bool = False  # answer with a tool call (streamed as argument fragments)
    gap: float = 0.0  # seconds between stream chunks


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
          | ErrorIn200 | FakeJson | Huge)

OPENAI_VERSION = "2020-10-01"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    json: Any
    at: float


class MockUpstream:
    def __init__(self, name: str = "upstream", models: tuple[str, ...] = ("model-a", "model-b")):
        self.name = name
        self.models = models
        self.default: Action = Ok()
        self.script: list[Action] = []
        self.requests: list[Received] = []
        self.model_pricing: dict[str, dict[str, str]] = {}
        self.model_context: dict[str, int] = {}  # context_length listed by GET /models
        self.listings = 0  # GET /models answered
        self.cancelled = 0
        self.completed = 0
        self.fixed_id: str | None = None  # every chat answer carries this id (byte-exact comparisons)
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
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
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
        content = (action.content if isinstance(action, (Ok, BreakStream)) and action.content
                   else f"{self.name} answered {model}")
        messages = body.get("messages") or []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if last.get("role") == "assistant" and (last.get("prefix") or body.get("continue_final_message")):
            prefix = str(last.get("content") or "")  # a prefill: answer only what follows it
            content = content[len(prefix):] if content.startswith(prefix) else content
        words = content.split(" ")
        usage = {"prompt_tokens": 10, "completion_tokens": len(words), "total_tokens": 10 + len(words),
                 "prompt_tokens_details": {"cached_tokens": 4},
                 "completion_tokens_details": {"reasoning_tokens": 1}}
        rid = self.fixed_id or f"chatcmpl-{self.name}-{len(self.requests)}"
        if isinstance(action, Huge):
            content = "x" * action.size
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
                if isinstance(action, StallStream) and i == action.after:
                    await self._stopping.wait()
                    return response
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
                if i == 0 and isinstance(action, Ok) and action.gate is not None:
                    await action.gate.wait()
                if isinstance(action, Ok) and action.gap:
                    await asyncio.sleep(action.gap)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.completed += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
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
