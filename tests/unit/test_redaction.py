"""The redactor: each secret masked whole and in OpenAI's fragments, in a body held whole, in headers,
and in a stream cut anywhere (a secret split across chunks included), the stream's length kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from proxy.engine.redaction import Redactor

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrSt1234"
HEADER = "hdr-SECRET-9f8e7d6c5b4a"
BODY = (f'{{"error": "Incorrect API key provided: sk-proj-****1234 ({KEY}); header {HEADER}, '
        f'again {KEY[:14]}... and sk-proj-\u2026\u2026\u20261234"}}').encode()


def leaks(data: bytes) -> list[str]:
    return [s for s in (KEY, HEADER, KEY[8:20], HEADER[-12:], "****1234", "\u20261234") if s.encode() in data]


def test_a_body_held_whole_has_every_secret_and_fragment_masked():
    out = Redactor((KEY, HEADER)).redact(BODY)
    assert leaks(out) == [] and b"[redacted]" in out
    assert Redactor((KEY,)).redact(b"nothing to see") == b"nothing to see"


def test_headers_are_returned_as_they_are_unless_a_value_holds_a_secret():
    redactor = Redactor((KEY,))
    clean = {"x-request-id": "req_1"}
    assert redactor.headers(clean) is clean
    masked = redactor.headers({"x-echo": f"Bearer {KEY}", "X-Other": "ok"})
    assert masked["x-echo"] == "Bearer [redacted]" and masked["x-other"] == "ok"


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)


async def test_a_stream_cut_anywhere_has_every_secret_masked_and_keeps_its_length():
    redactor = Redactor((KEY, HEADER))
    body = b"x" * 3000 + BODY + b"y" * 5000 + BODY
    for size in (1, 2, 3, 7, 13, 64, 1000, 4096, len(body)):
        out = b"".join([c async for c in redactor.stream(chunks(body, size))])
        assert len(out) == len(body), size
        assert leaks(out) == [], size


async def test_a_stream_without_secrets_passes_unchanged():
    body = bytes(range(256)) * 300
    out = b"".join([c async for c in Redactor((KEY,)).stream(chunks(body, 4096))])
    assert out == body
    out = b"".join([c async for c in Redactor(()).stream(chunks(body, 4096))])
    assert out == body


def test_a_masked_run_of_any_length_is_a_fragment_even_when_the_key_ends_in_a_mask_character():
    redactor = Redactor(("sk-proj-abcdefghijklmnx9ab",))
    assert redactor.redact(b"sk-proj-****x9ab") == b"[redacted]"
    assert redactor.redact(b"abc" + b"." * 600 + b"x9ab") == b"abc[redacted]"
    assert redactor.redact(b"..x9ab and ..x9ab") == b"..x9ab and ..x9ab"  # two dots are no mask
