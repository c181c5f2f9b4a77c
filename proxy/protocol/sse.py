"""Reading and rewriting OpenAI SSE streams at their edges, without parsing every chunk.

`UsageFilter` takes out of a stream the usage tiergate asked for and the client did not (the final
`"choices":[],"usage":{...}` event and the `"usage":null` fields OpenAI adds to every chunk once
usage is asked for), so the client receives the bytes the provider would have sent it. Chunks pass
through whole events at a time: an event split across network reads is held until its end.

`assemble` turns a complete stream into the completion it adds up to (for the cache); `partial`
reads what a stream carried so far (for a continuation, or an estimate of a cut stream's tokens);
`finished` reads, from a stream's last bytes, whether an answer that ended without `data: [DONE]` was
whole all the same. `WholeEvents` and `first_malformed` let the relay pass a chat stream on whole events
at a time and stop at an event that is not JSON, so a corrupt chunk is never handed over as content.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

_USAGE = b'"usage"'
_USAGE_NULL = b',"usage":null'  # OpenAI's layout: the last field of every chunk once usage is asked for
_USAGE_NULL_ANY = re.compile(rb'\s*,\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')
DONE_EVENT = b"[DONE]"
USAGE_PATHS = frozenset({"/chat/completions", "/completions"})  # where `stream_options` is accepted


def wants_usage(payload: dict[str, Any]) -> bool:
    """Did the client ask for the usage event (`stream_options.include_usage`)?"""
    options = payload.get("stream_options")
    return type(options) is dict and options.get("include_usage") is True


def with_usage(payload: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of `payload` asking for the usage event (the client's options kept)."""
    options = payload.get("stream_options")
    return {**payload, "stream_options": {**options, "include_usage": True} if type(options) is dict
            else {"include_usage": True}}


def split_events(data: bytes) -> tuple[bytes, bytes]:
    """(complete events, the rest): the rest is an event not ended yet."""
    cut = data.rfind(b"\n\n")
    if cut >= 0:
        cut += 2
    else:
        cut = data.rfind(b"\r\n\r\n")
        if cut < 0:
            return b"", data
        cut += 4
    return data[:cut], data[cut:]


_EVENT_END = re.compile(rb"\r?\n\r?\n")


class WholeEvents:
    """Passes a stream on whole SSE events at a time: an event split across reads is held until its end."""

    __slots__ = ("carry",)

    def __init__(self) -> None:
        self.carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.carry + chunk if self.carry else chunk
        if data.endswith(b"\n\n"):  # the usual case: a read ends on an event's end
            self.carry = b""
            return data
        data, self.carry = split_events(data)
        return data

    def flush(self) -> bytes:
        rest, self.carry = self.carry, b""
        return rest


def first_malformed(events: bytes) -> int:
    """Where in `events` (whole SSE events of a Chat Completions or Completions stream) the first event
    starts whose `data:` is neither a JSON object nor `[DONE]`; -1 when every one is well formed.

    A look at the payload's first and last bytes (`{` ... `}`), not a parse: it catches an event cut
    short or garbled (what a broken provider or proxy sends) at a constant cost per chunk, where a full
    orjson parse of every event costs ~0.6 µs on a 225-byte chunk, grows with the chunk and allocates
    what is thrown away. An object garbled inside but still ending in `}` passes, as with any client
    that does not parse the stream itself."""
    if events.startswith(b"data: {") and events.endswith(b"}\n\n") and events.count(b"\n") == 2:
        return -1  # the usual chunk: one event, one `data:` line holding an object
    start = 0
    for end in _EVENT_END.finditer(events):
        if not _well_formed(events[start:end.start()]):
            return start
        start = end.end()
    return -1


def _well_formed(event: bytes) -> bool:
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return True  # a comment (keep-alive) or an event without data
    payload = b"\n".join(lines)
    return payload == DONE_EVENT or (payload[:1] == b"{" and payload[-1:] == b"}")


class UsageFilter:
    """Removes the usage the client did not ask for; keeps the usage event in `usage` (raw bytes)."""

    __slots__ = ("carry", "usage")

    def __init__(self) -> None:
        self.carry = b""
        self.usage: bytes | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to relay for `chunk` (possibly empty while an event is incomplete)."""
        data = self.carry + chunk if self.carry else chunk
        if data.endswith(b"\n\n"):  # the usual case: a read ends on an event's end
            self.carry = b""
        else:
            data, self.carry = split_events(data)
        if _USAGE not in data:
            return data
        data = data.replace(_USAGE_NULL, b"")
        if _USAGE not in data:
            return data
        return b"".join(self._events(data))

    def flush(self) -> bytes:
        """What is left at the end of the stream (an event never ended: passed on as it came)."""
        rest, self.carry = self.carry, b""
        return rest

    def _events(self, data: bytes) -> Iterator[bytes]:
        for event in data.split(b"\n\n"):
            if not event:
                continue
            if _USAGE in event:
                obj = _data_json(event)
                if type(obj) is dict and obj.get("choices") == [] and type(obj.get("usage")) is dict:
                    self.usage = event  # the event tiergate asked for: not the client's
                    continue
                event = _USAGE_NULL_ANY.sub(b"", event)
            yield event + b"\n\n"


def _data_json(event: bytes) -> Any:
    """The JSON of an event's `data:` lines, or None."""
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


def iter_event_json(data: bytes) -> Iterator[Any]:
    """The JSON object of each `data:` event in `data`; `DONE_EVENT` for the final one."""
    for event in re.split(rb"\r?\n\r?\n", data):
        lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
        if not lines:
            continue
        raw = b"\n".join(lines)
        if raw == DONE_EVENT:
            yield DONE_EVENT
            continue
        try:
            yield orjson.loads(raw)
        except orjson.JSONDecodeError:
            yield None


def finished(tail: bytes, *, usage_asked: bool) -> bool:
    """Did the Chat Completions (or Completions) stream whose last bytes are `tail` end its answer: its
    last event whole, every choice in it with its `finish_reason`, no error event, and the usage event
    there when it was asked for (by tiergate, or as OpenAI's `"usage":null` fields show)?"""
    if not tail.endswith((b"\n\n", b"\r\n\r\n")):
        return False
    open_choices: set[Any] = set()
    done_choices: set[Any] = set()
    usage = False
    for obj in iter_event_json(tail):
        if type(obj) is not dict:
            continue  # the first event may be cut by the tail's start
        if "error" in obj and "choices" not in obj:
            return False
        usage = usage or type(obj.get("usage")) is dict
        for choice in obj.get("choices") or ():
            if type(choice) is dict:
                index = choice.get("index", 0)
                (done_choices if choice.get("finish_reason") else open_choices).add(index)
    if not done_choices or open_choices - done_choices:
        return False
    return usage or not (usage_asked or _USAGE_NULL_ANY.search(tail) is not None)


@dataclass
class Partial:
    """What a stream carried so far: the first choice's text, and whether anything else came
    (a tool call, a second choice, a refusal) that a continuation could not carry on."""

    text: str = ""
    id: str | None = None
    model: str | None = None
    created: int | None = None
    role_sent: bool = False
    finished: bool = False
    tool_call: bool = False
    other_choices: bool = False
    error: bool = False
    events: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def partial(chunks: Iterable[bytes], into: Partial | None = None) -> Partial:
    """Read the events relayed so far (at a break, or at the end of a stream); `into`, a reading of the
    events before these, is carried on (so a long stream can be read a part at a time)."""
    out = Partial() if into is None else into
    parts: list[str] = [out.text]
    for obj in iter_event_json(b"".join(chunks)):
        if type(obj) is not dict:
            continue
        if "error" in obj and "choices" not in obj:
            out.error = True
            continue
        out.events += 1
        if out.id is None:
            out.id, out.model, out.created = obj.get("id"), obj.get("model"), obj.get("created")
        for choice in obj.get("choices") or ():
            if type(choice) is not dict:
                continue
            if choice.get("index", 0) != 0:
                out.other_choices = True
                continue
            delta = choice.get("delta")
            if type(delta) is dict:
                if delta.get("role"):
                    out.role_sent = True
                if delta.get("tool_calls") or delta.get("function_call") or delta.get("refusal"):
                    out.tool_call = True
                content = delta.get("content")
            else:
                content = choice.get("text")
            if type(content) is str:
                parts.append(content)
            if choice.get("finish_reason"):
                out.finished = True
    out.text = "".join(parts)
    return out


_CONTENT = re.compile(rb'"content":"([^"\\]*(?:\\.[^"\\]*)*)"')


def fold(events: bytes, into: Partial | None) -> Partial:
    """`partial((events,), into)` for complete events, cheaper for the plain events of an answer under way
    (OpenAI's compact layout): when each event has one choice, index 0, one content string and a null
    finish_reason, only their content strings are read (one regex pass, one JSON decode). Anything else
    (the message opened, a tool call, a refusal, another choice, an end, spaces in the layout) is read by
    `partial`. Counting a few byte strings is all the check costs."""
    if into is None:
        return partial((events,), into)
    count = events.count
    n = count(b"data:")
    if (count(b'"finish_reason":null') != n or count(b'"content":"') != n or count(b'"index":0') != n
            or count(b'"finish_reason"') != n or count(b'"index":') != n):
        return partial((events,), into)
    found = _CONTENT.findall(events)
    into.text += "".join(orjson.loads(b'["' + b'","'.join(found) + b'"]'))
    into.events += n
    return into


def content_chars(data: bytes) -> int:
    """Characters of content (or tool-call arguments) in the complete events of `data`."""
    total = 0
    for obj in iter_event_json(data):
        if type(obj) is not dict:
            continue
        for choice in obj.get("choices") or ():
            if type(choice) is not dict:
                continue
            delta = choice.get("delta")
            if type(delta) is not dict:
                text = choice.get("text")
                total += len(text) if type(text) is str else 0
                continue
            content = delta.get("content")
            if type(content) is str:
                total += len(content)
            for call in delta.get("tool_calls") or ():
                function = call.get("function") if type(call) is dict else None
                args = function.get("arguments") if type(function) is dict else None
                total += len(args) if type(args) is str else 0
    return total


def assemble(chunks: Iterable[bytes]) -> bytes | None:
    """The chat.completion (or text_completion) a complete stream adds up to; None when the stream is
    not complete (no final event, an error event, a choice without its finish_reason)."""
    base: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    done = False
    chat = True
    for obj in iter_event_json(b"".join(chunks)):
        if obj is DONE_EVENT:
            done = True
            continue
        if type(obj) is not dict or ("error" in obj and "choices" not in obj):
            return None
        if base is None:
            chat = obj.get("object") != "text_completion"
            base = {"id": obj.get("id", ""), "object": "chat.completion" if chat else "text_completion",
                    "created": obj.get("created", 0), "model": obj.get("model", "")}
            if obj.get("system_fingerprint") is not None:
                base["system_fingerprint"] = obj["system_fingerprint"]
        if type(obj.get("usage")) is dict:
            usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if type(choice) is not dict:
                return None
            index = choice.get("index", 0)
            slot = choices.setdefault(index, {"parts": [], "refusal": [], "tools": {}, "role": "assistant",
                                              "finish_reason": None})
            delta = choice.get("delta") if chat else None
            if type(delta) is dict:
                if delta.get("role"):
                    slot["role"] = delta["role"]
                if type(delta.get("content")) is str:
                    slot["parts"].append(delta["content"])
                if type(delta.get("refusal")) is str:
                    slot["refusal"].append(delta["refusal"])
                for call in delta.get("tool_calls") or ():
                    if type(call) is not dict:
                        return None
                    tool = slot["tools"].setdefault(call.get("index", 0),
                                                    {"id": None, "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
                    if call.get("id"):
                        tool["id"] = call["id"]
                    if call.get("type"):
                        tool["type"] = call["type"]
                    function = call.get("function")
                    if type(function) is dict:
                        if type(function.get("name")) is str:
                            tool["function"]["name"] += function["name"]
                        if type(function.get("arguments")) is str:
                            tool["function"]["arguments"] += function["arguments"]
            elif not chat and type(choice.get("text")) is str:
                slot["parts"].append(choice["text"])
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]
    if not done or base is None or not choices or any(s["finish_reason"] is None for s in choices.values()):
        return None
    out_choices = []
    for index in sorted(choices):
        slot = choices[index]
        if chat:
            message: dict[str, Any] = {"role": slot["role"],
                                       "content": "".join(slot["parts"]) if slot["parts"] or not slot["tools"]
                                       else None}
            if slot["refusal"]:
                message["refusal"] = "".join(slot["refusal"])
            if slot["tools"]:
                message["tool_calls"] = [slot["tools"][i] for i in sorted(slot["tools"])]
            out_choices.append({"index": index, "message": message, "logprobs": None,
                                "finish_reason": slot["finish_reason"]})
        else:
            out_choices.append({"index": index, "text": "".join(slot["parts"]), "logprobs": None,
                                "finish_reason": slot["finish_reason"]})
    body = {**base, "choices": out_choices}
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)
