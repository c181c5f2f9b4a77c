"""Messages' event stream as a Chat Completions stream: text and tool-call deltas as chunks, the finish
reason, the usage chunk when the client asked for it, `data: [DONE]`. Thinking comes as OpenAI-compatible
gateways stream it: `delta.reasoning_content` with each thinking delta, `delta.thinking_blocks` with its
text, its signature, or a redacted block's data. An `error` event ends it with OpenAI's error event instead."""

from __future__ import annotations

from typing import Any

import orjson

from .chat_request import finish_reason
from .chat_response import chat_usage


class MessagesToChatStream:
    """Fed the Messages stream's bytes as they come (`feed`), gives chat chunks; `close` at its end."""

    __slots__ = ("base", "buffer", "usage", "tools", "include_usage", "ended")

    def __init__(self, model: str, created: int, include_usage: bool):
        self.base: dict[str, Any] = {"id": "chatcmpl-", "object": "chat.completion.chunk", "created": created,
                                     "model": model}
        self.buffer = b""
        self.usage: dict[str, Any] = {}
        self.tools: dict[int, int] = {}  # content block index -> tool call index
        self.include_usage = include_usage
        self.ended = False

    def close(self) -> bytes:
        """The Messages stream ended: its chunks were given as they came, nothing is held back."""
        return b""

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out: list[bytes] = []
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            line = line.strip()
            if line.startswith(b"data:") and not self.ended:
                out.append(self._event(line[5:].strip()))
        return b"".join(out)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _event(self, data: bytes) -> bytes:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(event, dict):
            return b""
        kind = event.get("type")
        if kind is None and "error" in event:  # the relay's own error event (OpenAI's shape): as it is
            self.ended = True
            return b"data: " + data + b"\n\n"
        handler = _HANDLERS.get(kind)
        return handler(self, event) if handler is not None else b""

    def _start(self, event: dict[str, Any]) -> bytes:
        message = event.get("message") or {}
        self.base["id"] = "chatcmpl-" + str(message.get("id") or "")
        self.usage.update(message.get("usage") or {})
        return self._chunk({"role": "assistant", "content": ""})

    def _block_start(self, event: dict[str, Any]) -> bytes:
        block = event.get("content_block") or {}
        if block.get("type") == "redacted_thinking":
            return self._chunk({"thinking_blocks": [{"type": "redacted_thinking", "data": block.get("data")}]})
        if block.get("type") != "tool_use":
            return b""
        index = self.tools[event.get("index", 0)] = len(self.tools)
        return self._chunk({"tool_calls": [{"index": index, "id": block.get("id"), "type": "function",
                                            "function": {"name": block.get("name"), "arguments": ""}}]})

    def _block_delta(self, event: dict[str, Any]) -> bytes:
        delta = event.get("delta") or {}
        if delta.get("type") == "text_delta":
            return self._chunk({"content": delta.get("text", "")})
        if delta.get("type") == "input_json_delta" and event.get("index") in self.tools:
            return self._chunk({"tool_calls": [{"index": self.tools[event["index"]],
                                                "function": {"arguments": delta.get("partial_json", "")}}]})
        if delta.get("type") == "thinking_delta":
            text = delta.get("thinking", "")
            return self._chunk({"reasoning_content": text, "thinking_blocks": [{"type": "thinking", "thinking": text}]})
        if delta.get("type") == "signature_delta":
            return self._chunk({"thinking_blocks": [{"type": "thinking", "thinking": "",
                                                     "signature": delta.get("signature")}]})
        return b""

    def _message_delta(self, event: dict[str, Any]) -> bytes:
        self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
        return self._chunk({}, finish_reason((event.get("delta") or {}).get("stop_reason")))

    def _stop(self, event: dict[str, Any]) -> bytes:
        self.ended = True
        usage = b""
        if self.include_usage:
            usage = b"data: " + orjson.dumps({**self.base, "choices": [], "usage": chat_usage(self.usage)}) + b"\n\n"
        return usage + b"data: [DONE]\n\n"

    def _error(self, event: dict[str, Any]) -> bytes:
        self.ended = True
        error = event.get("error") or {}
        return b"data: " + orjson.dumps({"error": {"message": error.get("message") or "the stream failed",
                                                   "type": error.get("type") or "api_error", "param": None,
                                                   "code": error.get("type")}}) + b"\n\n"


_HANDLERS = {"message_start": MessagesToChatStream._start, "content_block_start": MessagesToChatStream._block_start,
             "content_block_delta": MessagesToChatStream._block_delta,
             "message_delta": MessagesToChatStream._message_delta, "message_stop": MessagesToChatStream._stop,
             "error": MessagesToChatStream._error}
