"""A mock Anthropic Messages upstream: a real aiohttp server on a loopback port that fails on command.

    upstream = await AnthropicUpstream().start()
    upstream.push(Fail(529), Cut(after=3))    # the next call is overloaded, the one after breaks mid-stream
    upstream.requests                         # what it received (path, query, headers, json)

It answers `POST /v1/messages` (a Message, or its SSE event sequence when `stream` is true) and
`POST /v1/messages/count_tokens`. With `thinking` enabled it thinks first (a signed `thinking` block), and
it checks what Anthropic checks: the budget below `max_tokens`, no `temperature` other than 1, and the
last assistant turn with tool use starting with its thinking block.
With `tools` and no tool result in the last turn it calls the first tool
(`input` {"city": "Paris"}, streamed as `input_json_delta` fragments); otherwise it echoes the last user text.
Usage carries cache counts when the request has a `cache_control` marker.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Fail:
    """Answer with `status` and an Anthropic error body."""

    status: int = 500
    error_type: str = "api_error"
    retry_after: str | None = None
    quote_key: bool = False  # the message quotes the x-api-key it was sent (as a provider's 401 may)


@dataclass
class Cut:
    """A stream that breaks (connection closed) after `after` events."""

    after: int = 3


@dataclass
class ErrorEvent:
    """A stream whose first event is Anthropic's `error` event (overloaded, mid-flight)."""


@dataclass
class Hold:
    """A stream that sends `after` events, then holds the rest until `gate` is set (a stall, or a stream a
    shutdown outlives)."""

    gate: asyncio.Event
    after: int = 3


Action = Fail | Cut | ErrorEvent | Hold | None


@dataclass
class Received:
    path: str
    query: str
    headers: dict[str, str]
    json: dict[str, Any] = field(default_factory=dict)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _last_user(messages: list[dict[str, Any]]) -> tuple[str, bool]:
    """The last user turn's text, and whether it carries a tool result."""
    last = messages[-1] if messages else {}
    content = last.get("content")
    if isinstance(content, str):
        return content, False
    texts, result = [], False
    for block in content or ():
        if block.get("type") == "text":
            texts.append(block["text"])
        elif block.get("type") == "tool_result":
            result = True
            inner = block.get("content")
            texts.append(inner if isinstance(inner, str) else " ".join(b.get("text", "") for b in inner or ()))
    return " ".join(texts), result


class AnthropicUpstream:
    def __init__(self, name: str = "claude") -> None:
        self.name = name
        self.script: list[Action] = []
        self.default: Action = None
        self.requests: list[Received] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *actions: Action) -> None:
        self.script.extend(actions)

    async def start(self) -> AnthropicUpstream:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     logger=logging.getLogger("tests.anthropic_upstream"))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _next(self) -> Action:
        return self.script.pop(0) if self.script else self.default

    async def _received(self, request: web.Request) -> dict[str, Any]:
        body = orjson.loads(await request.read())
        self.requests.append(Received(request.path, request.query_string, dict(request.headers), body))
        return body

    def _error(self, fail: Fail, request: web.Request | None = None) -> web.Response:
        headers = {"request-id": "req_mock_error"}
        if fail.retry_after is not None:
            headers["retry-after"] = fail.retry_after
        message = f"{self.name} says {fail.status}"
        if fail.quote_key and request is not None:
            message += f": invalid x-api-key {request.headers.get('x-api-key')}"
            headers["x-echo-key"] = str(request.headers.get("x-api-key"))
        error = {"type": fail.error_type, "message": message}
        return web.Response(status=fail.status, headers=headers, content_type="application/json",
                            body=orjson.dumps({"type": "error", "error": error}))

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"type": "model", "id": "claude-sonnet-4"}], "has_more": False})

    async def _count(self, request: web.Request) -> web.Response:
        body = await self._received(request)
        action = self._next()
        if isinstance(action, Fail):
            return self._error(action)
        return web.json_response({"input_tokens": len(orjson.dumps(body["messages"])) // 4})

    def _thinking_refusal(self, body: dict[str, Any]) -> str | None:
        """What Anthropic would refuse in a call with thinking on (None: nothing)."""
        thinking = body.get("thinking")
        if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
            return None
        if not thinking.get("budget_tokens", 0) < body.get("max_tokens", 0):
            return "max_tokens must be greater than thinking.budget_tokens"
        if body.get("temperature", 1) != 1:
            return "temperature may only be set to 1 when thinking is enabled"
        turns = [m for m in body["messages"] if m.get("role") == "assistant"]
        content = turns[-1].get("content") if turns else None
        if isinstance(content, list) and any(b.get("type") == "tool_use" for b in content) and (
                content[0].get("type") not in ("thinking", "redacted_thinking")):
            return "a final assistant message with tool use must start with a thinking block"
        return None

    def _answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, dict[str, int]]:
        text, has_result = _last_user(body["messages"])
        if body.get("tools") and not has_result:
            tool = body["tools"][0]
            content = [{"type": "text", "text": "Let me check."},
                       {"type": "tool_use", "id": "toolu_mock_1", "name": tool["name"], "input": {"city": "Paris"}}]
            reason = "tool_use"
        else:
            content = [{"type": "text", "text": f"{self.name}: {text}"}]
            reason = "end_turn"
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            content.insert(0, {"type": "thinking", "thinking": f"Thinking about {text}.", "signature": "c2lnLW1vY2s="})
        cached = b"cache_control" in orjson.dumps(body)
        usage = {"input_tokens": 12, "output_tokens": 7, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 100 if cached else 0}
        return content, reason, usage

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._received(request)
        action = self._next()
        if isinstance(action, Fail):
            return self._error(action, request)
        refused = self._thinking_refusal(body)
        if refused is not None:
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error", "message": refused}},
                                     status=400)
        content, reason, usage = self._answer(body)
        message = {"id": "msg_mock_1", "type": "message", "role": "assistant", "model": body.get("model"),
                   "content": content, "stop_reason": reason, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return web.json_response(message, headers={"request-id": "req_mock_1"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "request-id": "req_mock_1"})
        await response.prepare(request)
        if isinstance(action, ErrorEvent):
            await response.write(_event("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                             "message": "Overloaded"}}))
            await response.write_eof()
            return response
        events = self._events(message, usage)
        try:
            for i, event in enumerate(events):
                if isinstance(action, Cut) and i == action.after:
                    assert request.transport is not None
                    request.transport.close()  # the connection drops mid-answer
                    return response
                if isinstance(action, Hold) and i == action.after:
                    await action.gate.wait()
                await response.write(event)
            await response.write_eof()
        except ConnectionResetError:  # the caller left mid-stream, as a provider sees it: no error of the mock's
            pass
        return response

    def _events(self, message: dict[str, Any], usage: dict[str, int]) -> list[bytes]:
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events = [_event("message_start", {"type": "message_start", "message": start}),
                  _event("ping", {"type": "ping"})]
        for i, block in enumerate(message["content"]):
            if block["type"] == "thinking":
                events.append(_event("content_block_start", {"type": "content_block_start", "index": i,
                                                             "content_block": {"type": "thinking", "thinking": ""}}))
                for delta in ({"type": "thinking_delta", "thinking": block["thinking"]},
                              {"type": "signature_delta", "signature": block["signature"]}):
                    events.append(_event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                                 "delta": delta}))
            elif block["type"] == "text":
                events.append(_event("content_block_start", {"type": "content_block_start", "index": i,
                                                             "content_block": {"type": "text", "text": ""}}))
                for word in block["text"].split(" "):
                    events.append(_event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                                 "delta": {"type": "text_delta", "text": word + " "}}))
            else:
                events.append(_event("content_block_start", {"type": "content_block_start", "index": i,
                                                             "content_block": {**block, "input": {}}}))
                raw = orjson.dumps(block["input"]).decode()
                for part in (raw[:5], raw[5:]):
                    events.append(_event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                                 "delta": {"type": "input_json_delta",
                                                                           "partial_json": part}}))
            events.append(_event("content_block_stop", {"type": "content_block_stop", "index": i}))
        events.append(_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                                                  "stop_sequence": None},
                                               "usage": {"output_tokens": usage["output_tokens"]}}))
        events.append(_event("message_stop", {"type": "message_stop"}))
        return events
