"""Where a continuation asked for by instruction joins the answer already relayed.

A model told to go on with a cut answer may instead start it again, or repeat its last words; relayed
as they came, the client would read a doubled answer. So the continuation is held until its first
characters show how it joins: the longest suffix of the relayed text (from a word's start) that it
begins with is dropped (all of it when the answer was restarted word for word); a continuation that
restarts the answer and then departs from it is refused (it is a second answer, not the rest of the
first). Only its content is read, and only until that is decided.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

HEAD_WORDS = 3  # a continuation that begins with the answer's first words is a restart of it
_WORD_START = re.compile(r"(?<!\S)\S")
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class JoinCheck:
    """Fed the continuation's whole events (after their id and model are rewritten); holds them until
    the join is decided, then passes them on with the overlap cut out. `refused` once it is not a
    continuation of `relayed`."""

    def __init__(self, relayed: str):
        self.relayed = relayed.rstrip()
        self.spaced = len(self.relayed) != len(relayed)  # the relayed text ended with a space
        # where the relayed text may start again in the continuation: each word's start
        self.starts = [m.start() for m in _WORD_START.finditer(self.relayed)]
        heads = self.starts[HEAD_WORDS:HEAD_WORDS + 1]
        self.head = self.relayed[:heads[0]].rstrip() if heads else None
        self.text = ""
        self.held: list[bytes] = []
        self.decided = False
        self.refused = False

    def feed(self, events: bytes) -> bytes:
        """The events to relay now (none while the join is undecided)."""
        if self.decided:
            return events
        if events:
            self.held.append(events)
            self.text += "".join(_contents(events))
        stripped = self.text.lstrip()
        self.starts = [i for i in self.starts if self._compatible(i, stripped)]
        if any(len(self.relayed) - i >= len(stripped) for i in self.starts):
            return b""  # a suffix it may still turn out to repeat (or repeats, up to what follows it)
        return self._decide(stripped, ended=False)

    def finish(self, events: bytes = b"") -> bytes:
        """The continuation ended (or broke): decide with what came."""
        if self.decided:
            return events
        if events:
            self.held.append(events)
            self.text += "".join(_contents(events))
        stripped = self.text.lstrip()
        self.starts = [i for i in self.starts if self._compatible(i, stripped)]
        return self._decide(stripped, ended=True)

    def _compatible(self, start: int, text: str) -> bool:
        """The relayed text from `start` and the continuation agree as far as both go."""
        length = min(len(self.relayed) - start, len(text))
        return self.relayed[start:start + length] == text[:length]

    def _decide(self, stripped: str, *, ended: bool) -> bytes:
        self.decided = True
        held, self.held = b"".join(self.held), []
        matched = [i for i in self.starts if len(self.relayed) - i <= len(stripped)]
        if matched:
            overlap = len(self.relayed) - min(matched)
            drop = len(self.text) - len(stripped) + overlap
            if self.spaced:  # the relayed text ended with a space: the rest does not start with another
                rest = self.text[drop:]
                drop += len(rest) - len(rest.lstrip())
            return _cut(held, drop) if drop else held
        restarted = self.head is not None and stripped.startswith(self.head)
        if restarted or (ended and stripped and self.starts):  # a restart that departs, or stops short
            self.refused = True
            return b""
        return held


def _contents(events: bytes) -> list[str]:
    """The first choice's content in each event."""
    out = []
    for event in _EVENT_END.split(events):
        obj = _json(event)
        content = _content(obj) if obj is not None else None
        if content:
            out.append(content)
    return out


def _json(event: bytes) -> dict[str, Any] | None:
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        obj = orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None
    return obj if type(obj) is dict else None


def _content(obj: dict[str, Any]) -> str | None:
    for choice in obj.get("choices") or ():
        if type(choice) is dict and choice.get("index", 0) == 0:
            delta = choice.get("delta")
            content = delta.get("content") if type(delta) is dict else choice.get("text")
            return content if type(content) is str else None
    return None


def _cut(events: bytes, drop: int) -> bytes:
    """`events` without the first `drop` characters of content: an event left with nothing to say is
    left out, one cut in its middle is written again."""
    out: list[bytes] = []
    for event in _EVENT_END.split(events):
        if not event.strip():
            continue
        obj = _json(event) if drop else None
        content = _content(obj) if obj is not None else None
        if obj is None or not content:
            out.append(event + b"\n\n")
            continue
        take = min(drop, len(content))
        drop -= take
        choice = next(c for c in obj["choices"] if type(c) is dict and c.get("index", 0) == 0)
        rest = content[take:]
        if not rest and not choice.get("finish_reason") and type(obj.get("usage")) is not dict:
            continue
        if type(choice.get("delta")) is dict:
            choice["delta"]["content"] = rest
        else:
            choice["text"] = rest
        out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
    return b"".join(out)
