"""The cache's parts on their own: the bounded LRU+TTL backend, keys, policy, Cache-Control, replay."""

from __future__ import annotations

import orjson
import pytest
from openai.types.chat import ChatCompletionChunk
from openai.types.completion import Completion

from proxy.adapters import CHAT, EMBEDDINGS, RESPONSES
from proxy.engine.batching import apportion
from proxy.engine.cache import (
    ENTRY_OVERHEAD,
    BoundedMemoryCache,
    CacheControl,
    CachedResponse,
    CachedResponseSerializer,
    cache_key,
    redis_cache_from_url,
    replay_events,
)
from proxy.types import ConfigError, ModelRef, ModelTier, Route, UseCase

REF = ModelRef("primary", "model-a")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(size: int) -> CachedResponse:
    return CachedResponse(b"x" * size, REF)


async def test_lru_order_and_entry_bound():
    cache = BoundedMemoryCache(max_entries=3, max_bytes=10**9)
    for key in ("a", "b", "c"):
        await cache.set(key, entry(10))
    assert await cache.get("a") is not None  # a becomes the most recently used
    await cache.set("d", entry(10))           # b, the least recently used, goes
    assert cache.keys() == ["c", "a", "d"]
    assert await cache.get("b") is None
    assert cache.evictions == 1 and len(cache) == 3


async def test_byte_bound_evicts_least_recently_used_and_accounts_exactly():
    size = 1000 + 1 + ENTRY_OVERHEAD  # body + key "k"-ish + overhead
    cache = BoundedMemoryCache(max_entries=100, max_bytes=3 * size)
    for key in ("a", "b", "c"):
        await cache.set(key, entry(1000))
    assert cache.bytes == 3 * size
    await cache.get("a")
    await cache.set("d", entry(1000))
    assert cache.keys() == ["c", "a", "d"] and cache.bytes <= cache.max_bytes
    await cache.set("e", entry(2000))  # needs the room of two
    assert cache.keys() == ["d", "e"] and cache.bytes <= cache.max_bytes
    await cache.set("e", entry(10))    # replacing gives the room back
    assert cache.bytes == 2 * ENTRY_OVERHEAD + 2 + 1000 + 10
    await cache.delete("d")
    await cache.delete("e")
    assert cache.bytes == 0 and len(cache) == 0


async def test_an_entry_larger_than_the_byte_bound_is_not_stored():
    cache = BoundedMemoryCache(max_entries=10, max_bytes=5000)
    await cache.set("small", entry(100))
    assert await cache.set("big", entry(6000)) is False
    assert await cache.get("big") is None and await cache.get("small") is not None


async def test_ttl_expiry_with_an_injected_clock():
    clock = FakeClock()
    cache = BoundedMemoryCache(max_entries=10, max_bytes=10**6, clock=clock)
    await cache.set("short", entry(1), ttl=10)
    await cache.set("long", entry(1), ttl=100)
    await cache.set("forever", entry(1))
    clock.now += 9.999
    assert await cache.get("short") is not None
    clock.now += 0.001
    assert await cache.get("short") is None  # expired exactly at its TTL, never served after
    assert await cache.exists("long") and await cache.exists("forever")
    clock.now += 1000
    assert await cache.get("long") is None and await cache.get("forever") is not None
    assert cache.expired == 2 and len(cache) == 1


async def test_aiocache_api_add_expire_clear():
    clock = FakeClock()
    cache = BoundedMemoryCache(max_entries=10, max_bytes=10**6, clock=clock, namespace="ns:")
    await cache.add("k", entry(1), ttl=5)
    with pytest.raises(ValueError):
        await cache.add("k", entry(1))
    await cache.expire("k", 50)
    clock.now += 10
    assert await cache.get("k") is not None
    assert cache.keys() == ["ns:k"]
    await cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_serializer_round_trip_keeps_bytes():
    s = CachedResponseSerializer()
    value = CachedResponse(b'{"a":1}\n{"weird":"\\n"}', ModelRef("p", "vendor/model"))
    assert s.loads(s.dumps(value)) == value
    assert s.loads(None) is None and s.loads(b"no newline") is None


def test_key_ignores_stream_user_and_model_name_but_not_output_fields():
    refs = (REF,)
    base = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    k = cache_key("/chat/completions", refs, base)
    assert k == cache_key("/chat/completions", refs, {**base, "stream": True, "user": "u1", "model": "fast",
                                                      "stream_options": {"include_usage": True}})
    assert k == cache_key("/chat/completions", refs, dict(reversed(list(base.items()))))
    for changed in ({"temperature": 0.5}, {"max_tokens": 5}, {"seed": 1}, {"tools": []},
                    {"messages": [{"role": "user", "content": "ho"}]}):
        assert k != cache_key("/chat/completions", refs, {**base, **changed})
    assert k != cache_key("/completions", refs, base)
    assert k != cache_key("/chat/completions", (ModelRef("primary", "model-b"),), base)


def test_policy():
    def route(cache: str) -> Route:
        return Route(UseCase.GENERAL_PURPOSE, ModelTier.STANDARD, REF, cache=cache)

    assert CHAT.cacheable(route("auto"), {"temperature": 0}, False)
    assert CHAT.cacheable(route("auto"), {"temperature": 0.0}, False)
    assert CHAT.cacheable(None, {"seed": 7, "temperature": 1}, False)
    assert not CHAT.cacheable(route("auto"), {"temperature": 0.2}, False)
    assert not CHAT.cacheable(route("auto"), {}, False)
    assert EMBEDDINGS.cacheable(route("auto"), {}, False)
    assert CHAT.cacheable(route("always"), {"temperature": 1}, False)
    assert not EMBEDDINGS.cacheable(route("never"), {"temperature": 0}, False)
    # a Responses stream is typed events: never replayed from or shared as a completion
    assert RESPONSES.cacheable(route("always"), {}, False) and not RESPONSES.cacheable(route("always"), {}, True)


def test_cache_control():
    assert CacheControl.parse(None) == CacheControl(True, True)
    assert CacheControl.parse("no-cache") == CacheControl(lookup=False, store=True)
    assert CacheControl.parse("No-Store") == CacheControl(lookup=True, store=False)
    assert CacheControl.parse("max-age=0, no-cache , no-store") == CacheControl(False, False)


def test_redis_url_parsing_and_errors():
    cache = redis_cache_from_url("redis://user:p%40ss@example.org:6390/3", timeout=0.1, namespace="t")
    assert (cache.endpoint, cache.port, cache.db, cache.password) == ("example.org", 6390, 3, "p@ss")
    assert cache.timeout == 0.1
    with pytest.raises(ConfigError) as err:
        redis_cache_from_url("http://user:secret@host/0", timeout=0.1)
    assert "secret" not in str(err.value)
    with pytest.raises(ConfigError):
        redis_cache_from_url("redis://host/notanumber", timeout=0.1)


def _events(raw: list[bytes]) -> list[dict]:
    assert raw[-1] == b"data: [DONE]\n\n"
    return [orjson.loads(e[len(b"data: "):]) for e in raw[:-1]]


def test_replay_of_a_chat_completion_parses_as_sdk_chunks():
    body = orjson.dumps({
        "id": "c1", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                     "message": {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}},
                    {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": "B"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    events = _events(replay_events(body, include_usage=True))
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    assert chunks[0].choices[0].delta.tool_calls[0].function.name == "f"
    assert chunks[1].choices[0].finish_reason == "tool_calls"
    assert chunks[2].choices[0].index == 1 and chunks[2].choices[0].delta.content == "B"
    assert chunks[-1].usage.total_tokens == 3 and chunks[-1].choices == []
    assert all(c.system_fingerprint == "fp" for c in chunks)
    assert "usage" not in _events(replay_events(body, include_usage=False))[-1]


def test_replay_of_a_text_completion():
    body = orjson.dumps({"id": "x", "object": "text_completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "text": "hello", "finish_reason": "length", "logprobs": None}]})
    events = _events(replay_events(body, include_usage=False))
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == "hello"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert Completion.model_validate(events[-1]).choices[0].finish_reason == "length"


@pytest.mark.parametrize("total,weights", [(10, [1, 1, 1]), (7, [5, 1, 1, 3]), (0, [2, 3]), (1, [1, 1]),
                                           (1000, [17, 3, 999])])
def test_apportion_adds_up(total, weights):
    shares = apportion(total, weights)
    assert sum(shares) == total and all(s >= 0 for s in shares)
    assert all(abs(s - total * w / sum(weights)) < 1 for s, w in zip(shares, weights, strict=True))
