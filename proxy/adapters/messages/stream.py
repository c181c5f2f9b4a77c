"""A Chat Completions stream as Messages' event sequence: `message_start`, per content block
`content_block_start` / `_delta` (text, `input_json_delta`) / `_stop`, `message_delta` with the stop
reason and usage, `message_stop`. A break the relay reports ends it with Messages' `error` event instead."""

from __future__ import annotations

from typing import Any

import orjson

from .response import message_usage, stop_reason


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ChatToMessagesStream:
    """Fed the chat stream's bytes as they come (`feed`), gives Messages' events; `close` at its end."""

    __slots__ = ("message_id", "model", "buffer", "started", "block", "block_kind", "tools", "finish", "usage",
                 "failed", "has_tool")

    def __init__(self, message_id: str, model: str, created: int = 0):
        self.message_id = message_id
        self.model = model
        self.buffer = b""
        self.started = False
        self.block = -1  # index of the open content block (-1: none yet)
        self.block_kind: str | None = None  # "text", or ("tool", chat index) of the open block
        self.tools: dict[int, int] = {}  # chat tool-call index -> content block index
        self.finish: Any = None
        self.usage: Any = None
        self.failed = False
        self.has_tool = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out: list[bytes] = []
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            out.append(self._line(line.strip()))
        return b"".join(out)

    def close(self) -> bytes:
        """The end: the open block closed, the stop reason and usage, `message_stop` (not after an error)."""
        if self.failed:
            return b""
        out = [self._start(), self._close_block()]
        reason = stop_reason(self.finish)
        if reason == "end_turn" and self.has_tool:
            reason = "tool_use"
        out.append(event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": reason, "stop_sequence": None},
                                           "usage": message_usage(self.usage)}))
        out.append(event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def _line(self, line: bytes) -> bytes:
        if not line.startswith(b"data:") or self.failed:
            return b""
        data = line[5:].strip()
        if data == b"[DONE]":
            return b""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""
        if type(chunk) is not dict:
            return b""
        if "error" in chunk:  # the relay's (or the provider's) error event: the stream ends here
            self.failed = True
            error = chunk["error"] if type(chunk["error"]) is dict else {}
            return event("error", {"type": "error", "error": {"type": "api_error",
                                                              "message": str(error.get("message") or "stream failed")}})
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out = [self._start()]
        for choice in chunk.get("choices") or ():
            if type(choice) is not dict:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out.append(self._text(delta["content"]))
            for call in delta.get("tool_calls") or ():
                out.append(self._tool(call))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return b"".join(out)

    def _start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return event("message_start", {"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _open(self, kind: Any, block: dict[str, Any]) -> bytes:
        closed = self._close_block()
        self.block += 1
        self.block_kind = kind
        return closed + event("content_block_start", {"type": "content_block_start", "index": self.block,
                                                      "content_block": block})

    def _close_block(self) -> bytes:
        if self.block_kind is None:
            return b""
        self.block_kind = None
        return event("content_block_stop", {"type": "content_block_stop", "index": self.block})

    def _text(self, text: str) -> bytes:
        opened = b"" if self.block_kind == "text" else self._open("text", {"type": "text", "text": ""})
        return opened + event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                      "delta": {"type": "text_delta", "text": text}})

    def _tool(self, call: Any) -> bytes:
        if type(call) is not dict:
            return b""
        index = call.get("index", 0)
        function = call.get("function") or {}
        opened = b""
        if index not in self.tools:
            self.has_tool = True
            opened = self._open(("tool", index), {"type": "tool_use", "id": call.get("id") or f"toolu_{index}",
                                                  "name": function.get("name") or "", "input": {}})
            self.tools[index] = self.block
        elif self.block_kind != ("tool", index):  # fragments of an earlier call after another began: dropped
            return opened
        arguments = function.get("arguments")
        if not arguments:
            return opened
        return opened + event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                      "delta": {"type": "input_json_delta", "partial_json": arguments}})
