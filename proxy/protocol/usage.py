"""Token usage and cost of one response, read from the upstream bytes without re-parsing them.

A non-stream body carries `"usage": {...}` (OpenAI puts it last); a stream carries it in its
last `data:` event when the client asked for `stream_options.include_usage`. Only that object
is parsed (orjson), never the whole body. Prices are USD per million tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

_USAGE_KEY = b'"usage"'
_KEY_LENGTH = len(_USAGE_KEY)
_OPENAI_USAGE = re.compile(rb'"usage"\s*:\s*\{\s*"prompt_tokens"\s*:\s*(\d{1,15})\s*,'
                           rb'\s*"completion_tokens"\s*:\s*(\d{1,15})(?=\s*[,}])')
_USAGE_END = re.compile(rb'\s*(?:,\s*"total_tokens"\s*:\s*\d{1,15}\s*)?}')
_MAX_CLOSING_BRACES = 8  # usage nests `*_tokens_details` objects one level deep
_FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z0-9_\-]{1,64})"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_DETAIL = re.compile(rb'"(cached_tokens|reasoning_tokens)"\s*:\s*(\d{1,15})')
_COUNTS_ONLY = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


class Usage(NamedTuple):
    """Tokens one response used (`completion` is 0 for embeddings). `cache_read` and `cache_write` are
    parts of `prompt` (input tokens served from, or written to, the provider's prompt cache);
    `reasoning` is part of `completion`."""

    prompt: int
    completion: int
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0


def find_usage(data: bytes) -> Usage | None:
    """The last `"usage": {...}` object in `data` (a body or a stream's tail), or None.

    Only that object is parsed: find `: {` after the key, then try each closing brace in turn
    (the first one that parses closes the object; `*_tokens_details` nest one level)."""
    at = data.rfind(_USAGE_KEY)
    if at >= 0:
        match = _OPENAI_USAGE.match(data, at)
        # OpenAI's own layout, nothing after the counts but the total: one regex match instead of a
        # parse (twice as fast); token details, cache counts and other layouts take the parse
        if match is not None and _USAGE_END.match(data, match.end()) is not None:
            return Usage(int(match[1]), int(match[2]))
    while at >= 0:
        key_end = at + _KEY_LENGTH
        start = data.find(b"{", key_end, key_end + 16)
        if start >= 0 and data[key_end:start].strip() == b":":
            end = start
            for _ in range(_MAX_CLOSING_BRACES):
                end = data.find(b"}", end) + 1
                if end == 0:
                    break
                try:
                    obj = orjson.loads(data[start:end])
                except orjson.JSONDecodeError:
                    continue
                if type(obj) is not dict:
                    break
                usage = _usage_from(obj)
                if usage is not None:
                    return usage
                break
        at = data.rfind(_USAGE_KEY, 0, at)
    return None


def usage_details(data: bytes) -> dict[str, int] | None:
    """`cached_tokens` and `reasoning_tokens` of the last usage object in `data`, when it has them."""
    at = data.rfind(_USAGE_KEY)
    if at < 0:
        return None
    found = {m.group(1).decode(): int(m.group(2)) for m in _DETAIL.finditer(data, at, at + 1024)}
    return found or None


def usage_of(answer: Any) -> Usage | None:
    """The usage of an answer dispatch has parsed already (no second look at the bytes)."""
    obj = answer.get("usage") if type(answer) is dict else None
    return _usage_from(obj) if type(obj) is dict else None


def _usage_from(obj: dict[str, Any]) -> Usage | None:
    """Chat and completions (`prompt_tokens`, `*_tokens_details`), embeddings (no completion tokens)
    and the Responses API's names (`input_tokens`, `input_tokens_details`, ...)."""
    prompt = obj.get("prompt_tokens")
    if prompt is None:
        prompt = obj.get("input_tokens")
        if "cache_read_input_tokens" in obj or "cache_creation_input_tokens" in obj:
            return _messages_usage(obj, prompt)
    completion = obj.get("completion_tokens")
    if completion is None:
        completion = obj.get("output_tokens") or 0
    if type(prompt) is not int or type(completion) is not int:
        return None
    if prompt < 0:  # comparisons, not max(): CPython 3.11 parses max()'s keyword arguments on every call
        prompt = 0
    if completion < 0:
        completion = 0
    if obj.keys() <= _COUNTS_ONLY:  # the counts alone (many compatible servers): no details to look for
        return Usage(prompt, completion)
    input_details = obj.get("prompt_tokens_details") or obj.get("input_tokens_details")
    output_details = obj.get("completion_tokens_details") or obj.get("output_tokens_details")
    cache_read = cache_write = reasoning = 0
    if type(input_details) is dict:
        cache_read = _count(input_details.get("cached_tokens"), prompt)
        cache_write = _count(input_details.get("cache_write_tokens", input_details.get("cache_creation_tokens")),
                             prompt)
    if not cache_read:  # providers that speak Anthropic's names through the OpenAI shape
        cache_read = _count(obj.get("cache_read_input_tokens"), prompt)
    if not cache_write:
        cache_write = _count(obj.get("cache_creation_input_tokens"), prompt)
    if type(output_details) is dict:
        reasoning = _count(output_details.get("reasoning_tokens"), completion)
    return Usage(prompt, completion, cache_read, cache_write, reasoning)


def _messages_usage(obj: dict[str, Any], uncached: Any) -> Usage | None:
    """Anthropic's Messages usage: `input_tokens` are the input tokens the cache did not serve; those it
    served (`cache_read_input_tokens`) and those written to it (`cache_creation_input_tokens`) come on
    top, so the prompt is their sum."""
    output = obj.get("output_tokens") or 0
    if type(uncached) is not int or type(output) is not int:
        return None
    read, write = obj.get("cache_read_input_tokens"), obj.get("cache_creation_input_tokens")
    read = read if type(read) is int and read > 0 else 0
    write = write if type(write) is int and write > 0 else 0
    return Usage(max(uncached, 0) + read + write, max(output, 0), read, write)


_OUTPUT_TOKENS = re.compile(rb'"output_tokens"\s*:\s*(\d{1,15})')


def messages_start_usage(chunk: bytes) -> Usage | None:
    """The usage of a Messages stream's `message_start` event (in its first chunk), or None."""
    if b"message_start" not in chunk[:256]:
        return None
    return find_usage(chunk[:chunk.find(b"\n\n", chunk.find(b"message_start")) + 1 or None])


def messages_stream_usage(head: Usage, tail: bytes) -> Usage:
    """A Messages stream's usage: the input counts from its first event, the output tokens from the last
    event that counts them (`message_delta`'s are cumulative)."""
    counts = _OUTPUT_TOKENS.findall(tail)
    return head._replace(completion=int(counts[-1])) if counts else head


def _count(value: Any, limit: int) -> int:
    """A token count from a provider's details: an int between 0 and the total it is part of."""
    return min(value, limit) if type(value) is int and value > 0 else 0


def finish_reasons(data: bytes) -> tuple[str, ...]:
    """Distinct `finish_reason` values in `data`, in order of appearance (for traces only)."""
    seen: dict[str, None] = {}
    for match in _FINISH_REASON.finditer(data):
        seen.setdefault(match.group(1).decode(), None)
    return tuple(seen)


def response_model(data: bytes) -> str | None:
    """The `model` the upstream reported, from the head of a body or a stream (for traces only)."""
    match = _MODEL.search(data, 0, 2048)
    return match.group(1).decode() if match else None


def cost_usd(usage: Usage, price: Any) -> float:
    """USD for `usage` at `price` (`input`, `output` and optionally `cached_input` and `cache_write`, USD
    per 1M tokens): input tokens served from the provider's cache at `cached_input`, those written to it
    at `cache_write`, when the table gives them (else at `input`)."""
    cached, write = price.cached_input, price.cache_write
    read_at = cached if cached is not None and usage.cache_read else None
    write_at = write if write is not None and usage.cache_write else None
    if read_at is None and write_at is None:
        return (usage.prompt * price.input + usage.completion * price.output) / 1_000_000
    uncached = usage.prompt
    total = usage.completion * price.output
    if read_at is not None:
        uncached -= usage.cache_read
        total += usage.cache_read * read_at
    if write_at is not None:
        uncached -= usage.cache_write
        total += usage.cache_write * write_at
    return (total + uncached * price.input) / 1_000_000


def price_for(pricing: Mapping[str, Any], provider: str, model: str) -> Any:
    """The price of `provider/model`, or None when the table has none."""
    if not pricing:
        return None
    return pricing.get(f"{provider}/{model}")
