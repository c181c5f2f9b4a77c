"""A Chat Completions SSE stream as the Responses API's typed event stream, incrementally.

Fed the chat stream's bytes as they arrive, `feed` returns the Responses events they complete
(`event: response.output_text.delta` ...); `close` ends the stream with `response.completed`
(or `response.incomplete`) carrying the whole Response and its usage; `fail` ends it with
`response.failed` followed by an `error` event, which the openai SDK raises as an `APIError`.
"""

from __future__ import annotations

from typing import Any

import orjson

from .response import (
    finish_status,
    function_call_item,
    message_item,
    output_text_part,
    reasoning_item,
    reasoning_summary,
    response_skeleton,
    thinking_content,
    translate_usage,
)

_DONE = b"[DONE]"


class ChatStreamTranslator:
    """One stream's state: the open output items, their text so far, the finish reason and usage."""

    def __init__(self, request: dict[str, Any], response_id: str, created_at: float, model: str):
        self.response = response_skeleton(request, response_id, created_at, model)
        self._suffix = response_id.removeprefix("resp_")
        self._buffer = b""
        self._seq = 0
        self._started = False
        self._ended = False
        self._output: list[dict[str, Any]] = []  # items in output order, finished ones included
        self._open: dict[str, Any] | None = None  # the item receiving deltas: message or reasoning
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool_call index -> the function_call item
        self._args: dict[int, list[str]] = {}
        self._finish: Any = None
        self._usage: dict[str, Any] | None = None
        self._thinking: list[dict[str, Any]] = []  # the open reasoning item's thinking blocks, as they add up

    # -- the interface ------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Chat SSE bytes in (any split), Responses SSE bytes out (possibly empty)."""
        if self._ended:
            return b""
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        self._buffer += data
        while True:
            end, sep = _event_end(self._buffer)
            if end < 0:
                break
            event, self._buffer = self._buffer[:end], self._buffer[end + sep:]
            self._event(event, out)
            if self._ended:
                break
        return b"".join(out)

    def close(self) -> bytes:
        """The upstream stream ended: finish every open item and the response."""
        if self._ended:
            return b""
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        if self._buffer.strip():
            self._event(self._buffer, out)
            self._buffer = b""
        if not self._ended:
            self._complete(out)
        return b"".join(out)

    def fail(self, message: str, code: str = "server_error") -> bytes:
        """End the stream as failed (the upstream broke off or sent an error)."""
        if self._ended:
            return b""
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        self._failed(message, code, out)
        return b"".join(out)

    @property
    def ended(self) -> bool:
        return self._ended

    # -- chat events --------------------------------------------------------------------------

    def _event(self, raw: bytes, out: list[bytes]) -> None:
        data = b"".join(line[5:].lstrip(b" ") for line in raw.splitlines() if line.startswith(b"data:"))
        if not data:
            return
        if data.strip() == _DONE:
            self._complete(out)
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._failed("the upstream chat stream sent an event that is not JSON", "server_error", out)
            return
        if not isinstance(chunk, dict):
            return
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else str(error)
            self._failed(str(message or "the upstream stream failed"), "server_error", out)
            return
        if isinstance(chunk.get("model"), str) and self.response["model"] != chunk["model"]:
            self.response["model"] = chunk["model"]
        if chunk.get("usage"):
            self._usage = translate_usage(chunk["usage"])
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        blocks = delta.get("thinking_blocks")
        if isinstance(reasoning, str) and reasoning or isinstance(blocks, list) and blocks:
            if self._open is None or self._open["type"] != "reasoning":
                self._close_open(out)
                item = reasoning_item(f"rs_{self._suffix}_{len(self._output)}", "")
                item["content"] = []
                self._open_item(item, out)
            if isinstance(blocks, list):
                self._add_thinking(blocks)
        if isinstance(reasoning, str) and reasoning:
            self._text.append(reasoning)
            self._emit(out, "response.reasoning_text.delta", item_id=self._open["id"],  # type: ignore[index]
                       output_index=len(self._output) - 1, content_index=0, delta=reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            if self._open is None or self._open["type"] != "message":
                self._close_open(out)
                item = message_item(f"msg_{self._suffix}_{len(self._output)}", "", "in_progress")
                item["content"] = []
                self._open_item(item, out)
                self._emit(out, "response.content_part.added", item_id=item["id"],
                           output_index=len(self._output) - 1, content_index=0, part=output_text_part(""))
            self._text.append(content)
            self._emit(out, "response.output_text.delta", item_id=self._open["id"],  # type: ignore[index]
                       output_index=len(self._output) - 1, content_index=0, delta=content, logprobs=[])
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                self._tool_call(call, out)

    def _tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        if not isinstance(index, int):
            return
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        item = self._calls.get(index)
        if item is None:
            self._close_open(out)
            n = len(self._output)
            item = function_call_item(f"fc_{self._suffix}_{n}", str(call.get("id") or f"call_{self._suffix}_{n}"),
                                      str(function.get("name") or ""), "", "in_progress")
            item["_index"] = n
            self._calls[index] = item
            self._args[index] = []
            self._output.append(item)
            self._emit(out, "response.output_item.added", output_index=n, item=_public(item))
        elif function.get("name") and not item["name"]:
            item["name"] = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._args[index].append(arguments)
            self._emit(out, "response.function_call_arguments.delta", item_id=item["id"],
                       output_index=item["_index"], delta=arguments)

    # -- output items -------------------------------------------------------------------------

    def _open_item(self, item: dict[str, Any], out: list[bytes]) -> None:
        self._open = item
        self._text = []
        self._output.append(item)
        self._emit(out, "response.output_item.added", output_index=len(self._output) - 1, item=dict(item))

    def _close_open(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        text = "".join(self._text)
        index = self._output.index(item)
        if item["type"] == "message":
            part = output_text_part(text)
            self._emit(out, "response.output_text.done", item_id=item["id"], output_index=index,
                       content_index=0, text=text, logprobs=[])
            self._emit(out, "response.content_part.done", item_id=item["id"], output_index=index,
                       content_index=0, part=part)
            item["content"] = [part]
        else:
            self._emit(out, "response.reasoning_text.done", item_id=item["id"], output_index=index,
                       content_index=0, text=text)
            item["content"] = [{"type": "reasoning_text", "text": text}]
            item["summary"] = reasoning_summary(text)
            encrypted = thinking_content(self._thinking)
            if encrypted is not None:
                item["encrypted_content"] = encrypted
            self._thinking = []
        item["status"] = "completed" if item["type"] == "message" else item.get("status")
        if item.get("status") is None:
            item.pop("status", None)
        self._emit(out, "response.output_item.done", output_index=index, item=item)

    def _add_thinking(self, pieces: list[Any]) -> None:
        """Streamed thinking blocks put back together: a thinking block's text comes in pieces and its
        signature last; a redacted block comes whole."""
        blocks = self._thinking
        for piece in pieces:
            if not isinstance(piece, dict):
                continue
            if piece.get("type") == "redacted_thinking":
                blocks.append(dict(piece))
            elif piece.get("type") == "thinking":
                last = blocks[-1] if blocks else None
                if last is None or last.get("type") != "thinking" or "signature" in last:
                    last = {"type": "thinking", "thinking": ""}
                    blocks.append(last)
                last["thinking"] += str(piece.get("thinking") or "")
                if piece.get("signature"):
                    last["signature"] = piece["signature"]

    def _close_calls(self, out: list[bytes]) -> None:
        for index, item in self._calls.items():
            if item["status"] != "in_progress":
                continue
            arguments = "".join(self._args[index])
            item["arguments"] = arguments
            item["status"] = "completed"
            self._emit(out, "response.function_call_arguments.done", item_id=item["id"],
                       output_index=item["_index"], arguments=arguments)
            self._emit(out, "response.output_item.done", output_index=item["_index"], item=_public(item))

    # -- the response -------------------------------------------------------------------------

    def _start(self, out: list[bytes]) -> None:
        self._started = True
        self._emit(out, "response.created", response=self.response)
        self._emit(out, "response.in_progress", response=self.response)

    def _complete(self, out: list[bytes]) -> None:
        self._close_open(out)
        self._close_calls(out)
        if not self._output:
            item = message_item(f"msg_{self._suffix}_0", "", "in_progress")
            item["content"] = []
            self._open_item(item, out)
            self._close_open(out)
        status, incomplete = finish_status(self._finish)
        response = self.response
        response["status"] = status
        response["incomplete_details"] = incomplete
        response["output"] = [_public(item) for item in self._output]
        response["usage"] = self._usage
        self._emit(out, "response.completed" if status == "completed" else "response.incomplete",
                   response=response)
        self._ended = True

    def _failed(self, message: str, code: str, out: list[bytes]) -> None:
        response = self.response
        response["status"] = "failed"
        response["error"] = {"code": code, "message": message}
        response["output"] = [_public(item) for item in self._output]
        response["usage"] = self._usage
        self._emit(out, "response.failed", response=response)
        error = {"type": "server_error", "code": code, "message": message, "param": None}
        # top-level fields: the ResponseErrorEvent shape; `error`: what makes the SDK raise APIError
        self._emit(out, "error", code=code, message=message, param=None, error=error)
        self._ended = True

    def _emit(self, out: list[bytes], kind: str, **fields: Any) -> None:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")


def _public(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Where the first complete SSE event in `buffer` ends, and the separator's length (-1: none yet)."""
    lf = buffer.find(b"\n\n")
    crlf = buffer.find(b"\r\n\r\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return lf, 2
