"""Whether a shadow's answer matched the primary's: the same text, else for free text the same finish
reason and a length within a fifth of the other's.

Both answers are in the client's API (chat or completions), a body or a stream's chunks; they are read
here, in the shadow's background task, never on the client's path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson

from ..protocol.sse import partial
from ..protocol.usage import finish_reasons

EXACT, SIMILAR, DIFFERENT, UNKNOWN = "exact", "similar", "different", "unknown"
_LENGTH_TOLERANCE = 0.2  # lengths within this share of the longer one count as alike


class Answer(NamedTuple):
    """What is compared of one answer: its text (None when the shape has none tiergate reads), its
    first finish reason, and its output tokens (the usage's, when it came)."""

    text: str | None
    finish_reason: str | None
    tokens: int | None = None


def of_body(body: bytes, tokens: int | None = None) -> Answer:
    """A whole answer (chat.completion or text_completion)."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Answer(None, None, tokens)
    choices = parsed.get("choices") if type(parsed) is dict else None
    first = choices[0] if type(choices) is list and choices and type(choices[0]) is dict else None
    if first is None:
        return Answer(None, None, tokens)
    message = first.get("message")
    text = message.get("content") if type(message) is dict else first.get("text")
    reason = first.get("finish_reason")
    return Answer(text if type(text) is str else None, reason if type(reason) is str else None, tokens)


def of_stream(chunks: Iterable[bytes], tokens: int | None = None) -> Answer:
    """A stream's chunks as relayed (chat or completions events)."""
    chunks = list(chunks)
    read = partial(chunks)
    if not read.events:
        return Answer(None, None, tokens)
    reasons = finish_reasons(b"".join(chunks[-4:]))
    return Answer(read.text, reasons[0] if reasons else None, tokens)


def compare(primary: Answer, shadow: Answer) -> str:
    """`exact` (the same non-empty text), `similar` (the same finish reason, lengths within 20%: text when
    both have it, else output tokens), `different`, or `unknown` (nothing to compare)."""
    if primary.text and shadow.text and primary.text == shadow.text:
        return EXACT
    if primary.text is not None and shadow.text is not None and (primary.text or shadow.text):
        lengths: tuple[int | None, int | None] = (len(primary.text), len(shadow.text))
    else:
        lengths = (primary.tokens, shadow.tokens)
    if primary.finish_reason is None or shadow.finish_reason is None or None in lengths:
        return UNKNOWN
    if primary.finish_reason != shadow.finish_reason:
        return DIFFERENT
    a, b = lengths
    assert a is not None and b is not None
    return SIMILAR if abs(a - b) <= _LENGTH_TOLERANCE * max(a, b) else DIFFERENT
