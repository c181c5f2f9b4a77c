"""Secrets tiergate sends, kept out of what it relays: provider keys, the table's secret header values
and a client's own provider key (bring-your-own-key).

Each secret is masked whole and in the fragments providers quote: its first eight characters and
what follows them (`sk-proj-abc...`), and a masked run ending in its last four (OpenAI's
`sk-proj-****cdef`, `sk-...cdef`). Bodies are masked with `[redacted]` when tiergate holds them whole
(errors it reads), and character for character (`*`) when they stream through, so that a relayed
`Content-Length` stays true; a secret split across two chunks is masked too (the last bytes of a
chunk wait for the next). Header values are masked with `[redacted]`. A cheap look for the
secrets' ends comes first: the regular expression runs only where one is present.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from multidict import CIMultiDict

MARK = b"[redacted]"
_FRAGMENT = 512  # the longest fragment matched: OpenAI masks a key's middle with one `*` per character
_MIN_SECRET = 8  # shorter values are no secret worth a mask (and would mask ordinary words)


class Redactor:
    """Masks a set of secrets (see the module's docstring). Immutable; `with_secret` makes another."""

    __slots__ = ("secrets", "_pattern", "_needles", "_text_needles", "_hold")

    def __init__(self, secrets: Iterable[str | None] = ()):
        kept = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET}, key=len, reverse=True)
        self.secrets: tuple[str, ...] = tuple(kept)
        parts: list[bytes] = []
        needles: set[bytes] = set()
        for secret in kept:
            raw = secret.encode("utf-8", "surrogateescape")
            parts.append(re.escape(raw))
            parts.append(re.escape(raw[:8]) + rb"[^\s\"',;<>]{0,%d}" % _FRAGMENT)  # sk-proj-abc...
            # ****cdef, tried from a masked run's start only: a long run of dots or stars costs one pass
            # and a walk back, not an attempt from each of its characters
            parts.append(rb"(?<![*.x])(?<!\xe2\x80\xa6)(?:[*.x]|\xe2\x80\xa6){3,}" + re.escape(raw[-4:]))
            needles.update((raw[:8], raw[-4:]))
        self._pattern = re.compile(b"|".join(parts)) if parts else None
        self._needles = tuple(needles)
        self._text_needles = tuple(n.decode("utf-8", "surrogateescape") for n in needles)
        # the longest match: a secret whole, or a fragment (a masked run of 3-byte ellipses, then four)
        self._hold = max([len(p) for p in kept] + [8 + _FRAGMENT, 3 * _FRAGMENT + 4]) if kept else 0

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __repr__(self) -> str:  # never shows a secret
        return f"Redactor({len(self.secrets)} secrets)"

    def with_secret(self, secret: str | None) -> Redactor:
        """These secrets and one more (a client's own provider key, for one request)."""
        if not secret or secret in self.secrets:
            return self
        return Redactor((*self.secrets, secret))

    def redact(self, data: bytes) -> bytes:
        """`data` (held whole) with each secret and fragment replaced by `[redacted]`."""
        pattern = self._pattern
        if pattern is None or not _holds(data, self._needles):
            return data
        return pattern.sub(MARK, data)

    def redact_text(self, text: str) -> str:
        if self._pattern is None or not _holds(text, self._text_needles):
            return text
        return self.redact(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """`headers` as they are when no value holds a secret (the usual case: one join and a look for
        each secret's ends), else a copy with those values masked."""
        if self._pattern is None:
            return headers
        if not _holds("\n".join(headers.values()), self._text_needles):
            return headers
        return CIMultiDict((name, self.redact_text(value)) for name, value in headers.items())

    def screen(self, headers: dict[str, str]) -> dict[str, str]:
        """`headers`, a copy of the headers relayed with a success (only those that cross back), masked
        in place when a value holds a secret. The cheap form of `headers()` for every answer: one join and
        a look for each secret's ends, inline (a call per look costs more than the look)."""
        needles = self._text_needles
        if needles:
            joined = "\n".join(headers.values())
            for needle in needles:
                if needle in joined:
                    for name in list(headers):
                        headers[name] = self.redact_text(headers[name])
                    break
        return headers

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`chunks` with each secret masked character for character (the length stays), a secret split
        across chunks included: what may be the start of one waits for the next chunk."""
        if self._pattern is None:
            async for chunk in chunks:
                yield chunk
            return
        held = b""
        async for chunk in chunks:
            out, held = self._cut(held + chunk if held else chunk, final=False)
            if out:
                yield out
        out, _ = self._cut(held, final=True)
        if out:
            yield out

    def _cut(self, data: bytes, *, final: bool) -> tuple[bytes, bytes]:
        """(what of `data` can go now, masked; what must wait for more)."""
        size = len(data)
        ready = size if final else max(0, size - self._hold)  # a match starting later may be incomplete
        if not _holds(data, self._needles):
            return data[:ready], data[ready:]
        parts: list[bytes] = []
        pos = 0
        assert self._pattern is not None
        for match in self._pattern.finditer(data):
            start, end = match.span()
            if not final and (start >= ready or end == size):  # it may go on in the next chunk
                ready = min(ready, start)
                break
            parts.append(data[pos:start])
            parts.append(b"*" * (end - start))
            pos = end
        ready = max(ready, pos)
        parts.append(data[pos:ready])
        return b"".join(parts), data[ready:]


def _holds(data: Any, needles: tuple[Any, ...]) -> bool:
    """Whether one of `needles` is in `data` (a loop: `any()` over a generator costs more per call)."""
    for needle in needles:
        if needle in data:
            return True
    return False
