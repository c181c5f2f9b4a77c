"""The response cache: a bounded LRU+TTL aiocache backend, an optional shared Redis level, cache keys,
single-flight coalescing of identical requests (shared streams included), and SSE replay of a cached
completion.

A cached entry is the upstream body as it came (bytes) and the model that produced it; a hit is
served without touching those bytes, a streamed request replays them as chat.completion.chunk events.
A complete stream is stored as the completion it adds up to.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiocache.backends.redis import RedisCache
from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer, NullSerializer
from redis.exceptions import RedisError

from ..fleet.connect import redis_client, redis_target
from ..outcome import RequestRecord, Result
from ..planner.plan import Plan
from ..protocol.sse import assemble, wants_usage
from ..settings import RouterConfig
from ..table.routing import ProviderSpec
from ..types import ModelRef, Route, TiergateError
from .fanout import SharedStream

log = logging.getLogger("tiergate")

Clock = Callable[[], float]

# bytes counted per entry on top of its body and key: the entry object, the OrderedDict slot, the
# key string; an estimate, so that many tiny entries still respect the byte bound
ENTRY_OVERHEAD = 256
# fields of a request that do not change the answer: left out of the cache key
KEY_EXCLUDED = frozenset({"model", "stream", "stream_options", "user"})
REDIS_RETRY_INTERVAL = 5.0
_REDIS_ERRORS = (RedisError, OSError, TimeoutError, ValueError)


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """An upstream response body, stored as it came, and the model that answered it."""

    body: bytes
    ref: ModelRef

    @property
    def size(self) -> int:
        return len(self.body)


class CachedResponseSerializer(BaseSerializer):
    """`provider/model\\n<body>` in bytes, for Redis; no JSON round trip of the body."""

    DEFAULT_ENCODING = None

    def dumps(self, value: CachedResponse) -> bytes:  # type: ignore[override]
        return str(value.ref).encode() + b"\n" + value.body

    def loads(self, value: bytes | None) -> CachedResponse | None:  # type: ignore[override]
        if value is None:
            return None
        head, sep, body = value.partition(b"\n")
        if not sep:
            return None
        return CachedResponse(body, ModelRef.parse(head.decode()))


# --- the bounded memory backend ---------------------------------------------------------------


class BoundedMemoryCache(BaseCache):
    """An aiocache cache held in this process, bounded by entries and by bytes, least recently used
    out first; entries expire after their TTL (checked on read against `clock`, so tests need no sleep).

    aiocache's own SimpleMemoryCache has no bound; this keeps its API (get/set/delete/exists/clear).
    """

    NAME = "bounded_memory"

    def __init__(self, *, max_entries: int, max_bytes: int, clock: Clock = time.monotonic,
                 **kwargs: Any):
        kwargs.setdefault("serializer", NullSerializer())
        kwargs.setdefault("timeout", None)  # no asyncio.wait_for around dict operations
        super().__init__(**kwargs)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        # key -> (value, size, expires_at or None); the end is the most recently used
        self._data: OrderedDict[str, tuple[Any, int, float | None]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._data)

    @staticmethod
    def size_of(key: str, value: Any) -> int:
        size = getattr(value, "size", None)
        if size is None:
            size = len(value) if isinstance(value, (bytes, str)) else 0
        return size + len(key) + ENTRY_OVERHEAD

    async def _get(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        value, _, expires_at = item
        if expires_at is not None and self.clock() >= expires_at:
            self._remove(key)
            self.expired += 1
            return None
        self._data.move_to_end(key)
        return value

    async def _gets(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        return await self._get(key, encoding)

    async def _multi_get(self, keys: list[str], encoding: str | None = "utf-8", _conn: Any = None) -> list[Any]:
        return [await self._get(key, encoding) for key in keys]

    async def _set(self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None,
                   _conn: Any = None) -> bool:
        if _cas_token is not None:
            current = await self._get(key)
            if current != _cas_token:
                return False
        size = self.size_of(key, value)
        if size > self.max_bytes or self.max_entries <= 0:
            self._remove(key)
            return False
        self._remove(key)
        expires_at = self.clock() + ttl if ttl else None
        self._data[key] = (value, size, expires_at)
        self.bytes += size
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, evicted_size, _) = self._data.popitem(last=False)
            self.bytes -= evicted_size
            self.evictions += 1
        return True

    async def _multi_set(self, pairs: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        for key, value in pairs:
            await self._set(key, value, ttl)
        return True

    async def _add(self, key: str, value: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        if await self._get(key) is not None:
            raise ValueError(f"Key {key} already exists, use .set to update the value")
        return await self._set(key, value, ttl)

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return await self._get(key) is not None

    async def _expire(self, key: str, ttl: float | None, _conn: Any = None) -> bool:
        item = self._data.get(key)
        if item is None:
            return False
        self._data[key] = (item[0], item[1], self.clock() + ttl if ttl else None)
        return True

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return 1 if self._remove(key) else 0

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        if namespace:
            for key in [k for k in self._data if k.startswith(namespace)]:
                self._remove(key)
        else:
            self._data.clear()
            self.bytes = 0
        return True

    async def _raw(self, command: str, *args: Any, encoding: str | None = "utf-8", _conn: Any = None,
                   **kwargs: Any) -> Any:
        return getattr(self._data, command)(*args, **kwargs)

    async def _redlock_release(self, key: str, value: Any) -> int:
        item = self._data.get(key)
        if item is not None and item[0] == value:
            return 1 if self._remove(key) else 0
        return 0

    def _remove(self, key: str) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self.bytes -= item[1]
        return True


# --- Redis ---------------------------------------------------------------------------------


class TiergateRedisCache(RedisCache):
    """aiocache's Redis cache, storing with SET EX/PX (redis-py 6+ deprecates the SETEX aiocache uses)."""

    async def _set(self, key: str, value: Any, ttl: float | None = None, _cas_token: Any = None,
                   _conn: Any = None) -> Any:
        if _cas_token is not None or not ttl:
            return await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)
        if isinstance(ttl, float):
            return await self.client.set(key, value, px=int(ttl * 1000))
        return await self.client.set(key, value, ex=ttl)


def redis_cache_from_url(url: str, *, timeout: float, namespace: str = "tiergate") -> RedisCache:
    """aiocache's Redis cache for what `TIERGATE_REDIS_URL` names (one server, a Redis Cluster or a
    Sentinel-managed primary), every operation bounded by `timeout` seconds.

    aiocache builds its client for one server only; for a cluster or a Sentinel its client is
    replaced by redis-py's `RedisCluster` or the Sentinel's primary: the cache calls only single-key
    commands (GET, SET, DEL), which both route by themselves."""
    target = redis_target(url)
    host, port = target.nodes[0]
    pool_kwargs: dict[str, Any] = {"socket_timeout": timeout}
    if target.username:
        pool_kwargs["username"] = target.username
    cache = TiergateRedisCache(
        serializer=CachedResponseSerializer(), namespace=namespace, timeout=timeout,
        endpoint=host, port=port, db=target.db, password=target.password,
        create_connection_timeout=timeout, ssl=target.tls, connection_pool_kwargs=pool_kwargs)
    if target.kind != "server":
        cache.client = redis_client(url, timeout=timeout)
    return cache


class RedisLevel:
    """The shared level: a Redis call that fails or is slower than its timeout is a miss, never an
    error; after a failure Redis is left alone for `retry_interval` seconds so requests do not wait."""

    def __init__(self, cache: RedisCache, *, retry_interval: float = REDIS_RETRY_INTERVAL,
                 clock: Clock = time.monotonic):
        self.cache = cache
        self.retry_interval = retry_interval
        self.clock = clock
        self.down_until = 0.0
        self.errors = 0
        self.last_error: str | None = None
        self.hits = 0
        self.writes = 0

    @property
    def available(self) -> bool:
        return self.clock() >= self.down_until

    def _failed(self, exc: BaseException, operation: str) -> None:
        self.errors += 1
        self.last_error = f"{operation}: {type(exc).__name__}"
        self.down_until = self.clock() + self.retry_interval
        log.warning("redis cache %s failed (%s); going on without it for %ss",
                    operation, type(exc).__name__, self.retry_interval)

    async def get(self, key: str) -> CachedResponse | None:
        if not self.available:
            return None
        try:
            value = await self.cache.get(key)
        except _REDIS_ERRORS as exc:
            self._failed(exc, "get")
            return None
        if value is not None:
            self.hits += 1
        return value

    async def set(self, key: str, value: CachedResponse, ttl: int) -> None:
        if not self.available:
            return
        try:
            await self.cache.set(key, value, ttl=ttl)
            self.writes += 1
        except _REDIS_ERRORS as exc:
            self._failed(exc, "set")

    def stats(self) -> dict[str, Any]:
        return {"configured": True, "available": self.available, "errors": self.errors,
                "last_error": self.last_error, "hits": self.hits, "writes": self.writes}

    async def close(self) -> None:
        try:
            await self.cache.client.aclose()
        except _REDIS_ERRORS as exc:
            log.debug("closing the redis cache: %s", type(exc).__name__)


# --- keys and policy -------------------------------------------------------------------------


def cache_key(path: str, candidates: tuple[ModelRef, ...], payload: dict[str, Any], scope: str = "") -> str:
    """A hash of the request after routing: endpoint, resolved models and every field that can change
    the answer (the client's `model` name, `stream`, `stream_options` and `user` do not), within `scope`
    (see `cache_scope`: whose requests the answer may serve)."""
    canonical = {k: v for k, v in payload.items() if k not in KEY_EXCLUDED}
    digest = hashlib.blake2b(digest_size=20)
    if scope:
        digest.update(scope.encode())
        digest.update(b"\0")
    digest.update(path.encode())
    digest.update(b"\0")
    digest.update("|".join(map(str, candidates)).encode())
    digest.update(b"\0")
    digest.update(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
    return digest.hexdigest()


def cache_scope(plan: Plan, key_name: str | None, headers: Mapping[str, str] | None,
                providers: Mapping[str, ProviderSpec]) -> str:
    """Whose requests an answer may serve (a part of its cache key, so of single flights and shared
    streams too): the inbound key's (by its name) unless the route says `cache_scope: shared`, and on a
    `pass_client_key` provider always the client's own provider credential as well, so that no one is
    answered on the strength of a credential the provider never saw. `headers` are those sent upstream
    (None when no provider takes the client's key); "" is everyone's."""
    if key_name is None and headers is None:  # a sidecar without keys: one scope
        return ""
    route = plan.route
    scope = "" if key_name is None or (route is not None and route.cache_scope == "shared") else "key=" + key_name
    specs = (providers.get(c.ref.provider) for c in plan.candidates)
    if headers is not None and any(spec is not None and spec.pass_client_key for spec in specs):
        credential = headers.get("authorization") or headers.get("Authorization") or ""
        scope += "\0credential=" + credential
    return scope


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The client's `Cache-Control`: `no-cache` skips the lookup, `no-store` skips storing."""

    lookup: bool = True
    store: bool = True

    @classmethod
    def parse(cls, header: str | None) -> CacheControl:
        if not header:
            return _DEFAULT_CONTROL
        tokens = {t.strip().lower().split("=", 1)[0] for t in header.split(",")}
        return cls(lookup="no-cache" not in tokens, store="no-store" not in tokens)


_DEFAULT_CONTROL = CacheControl()


# --- the cache the router uses ------------------------------------------------------------


class ResponseCache:
    """Memory level (bounded LRU+TTL) in front of an optional Redis level, plus single-flight:
    identical requests in flight at once share one upstream call."""

    def __init__(self, config: RouterConfig, *, clock: Clock = time.monotonic,
                 redis_retry_interval: float = REDIS_RETRY_INTERVAL):
        self.enabled = config.enable_caching
        self.default_ttl = config.cache_ttl
        self.memory = BoundedMemoryCache(max_entries=config.cache_max_size,
                                         max_bytes=config.cache_memory_limit_mb * 1024 * 1024, clock=clock)
        self.redis: RedisLevel | None = None
        if config.enable_caching and config.redis_url:
            self.redis = RedisLevel(redis_cache_from_url(config.redis_url, timeout=config.redis_timeout,
                                                         namespace=config.cache_namespace),
                                    retry_interval=redis_retry_interval)
        self.hits = 0
        self.misses = 0
        self.coalesced = 0
        self.stores = 0
        self._inflight: dict[str, _Flight] = {}
        self._streams: dict[str, SharedStream] = {}  # streams in flight, by cache key
        self.stream_buffer = config.stream_subscriber_buffer
        self.streams_stored = 0
        self._background: set[asyncio.Task[Any]] = set()

    def ttl_for(self, route: Route | None) -> int:
        if route is not None and route.cache_ttl is not None:
            return route.cache_ttl
        return self.default_ttl

    async def get(self, key: str, ttl: int | None = None) -> CachedResponse | None:
        """Memory first, then Redis (a Redis hit is kept in memory for `ttl`)."""
        value = await self.memory.get(key)
        if value is None and self.redis is not None:
            value = await self.redis.get(key)
            if value is not None:
                await self.memory.set(key, value, ttl=ttl or self.default_ttl)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    async def set(self, key: str, value: CachedResponse, ttl: int) -> None:
        """Store in memory now; in Redis in the background (the response does not wait for it)."""
        if ttl <= 0:
            return
        await self.memory.set(key, value, ttl=ttl)
        self.stores += 1
        if self.redis is not None:
            task = asyncio.get_running_loop().create_task(self.redis.set(key, value, ttl))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def serve(self, path: str, payload: dict[str, Any], plan: Plan, record: RequestRecord,
                    *, stream: bool, control: CacheControl, call: Callable[..., Awaitable[Result]],
                    scope: str = "") -> Result:
        """Answer from the cache, or join an identical request in flight, or `call` upstream and store.

        Sets `record.cache`: hit | miss | coalesced | bypass (not cacheable, or the lookup skipped).
        Streams are answered from a cached completion (replayed as SSE), else join an identical stream
        in flight (`call(raw_usage=True)` starts it); a complete stream is stored as its completion.
        The caller asks the request's endpoint whether it is cacheable first. `scope` (`cache_scope`)
        keeps an answer, a flight and a shared stream among the requests it may serve.
        """
        route = plan.route
        key = cache_key(path, tuple(c.ref for c in plan.candidates), payload, scope)
        ttl = self.ttl_for(route)
        if control.lookup:
            cached = await self.get(key, ttl)
            if cached is not None:
                record.cache = "hit"
                if stream:
                    options = payload.get("stream_options")
                    usage = isinstance(options, dict) and bool(options.get("include_usage"))
                    return Result(200, cached.ref, [], stream=replay_stream(cached.body, include_usage=usage),
                                  content_type="text/event-stream")
                return Result(200, cached.ref, [], body=cached.body)
            record.cache = "miss"
        store = control.store and ttl > 0
        if stream:
            if not control.lookup:
                return await call()
            return await self.shared_stream(key, call, record, payload, store=store, ttl=ttl)

        async def fetch_and_store() -> Result:
            result = await call()
            if store and result.status == 200 and result.body is not None:
                await self.set(key, CachedResponse(result.body, result.ref), ttl)
            return result

        if not control.lookup:
            return await fetch_and_store()
        streaming = self._streams.get(key)
        if streaming is not None and streaming.joinable:  # the same request is being streamed: join it
            joined = await self._completion_of(streaming)
            if joined is not None:
                self.coalesced += 1
                record.cache = "coalesced"
                return joined
        result, shared = await self.single_flight(key, fetch_and_store)
        if shared:
            record.cache = "coalesced"
        return result

    async def single_flight(self, key: str, call: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """Run `call` once for every concurrent caller with this key; returns (result, shared).

        The call runs in its own task: a caller that goes away (its task cancelled) does not cancel
        it for the others; it is cancelled only when no caller is left. A failure reaches every caller.
        """
        flight = self._inflight.get(key)
        shared = flight is not None
        if flight is None:
            task = asyncio.get_running_loop().create_task(call())
            flight = _Flight(task)
            self._inflight[key] = flight
            task.add_done_callback(lambda _t, k=key, f=flight: self._landed(k, f))
        else:
            self.coalesced += 1
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task), shared
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()

    async def shared_stream(self, key: str, call: Callable[..., Awaitable[Result]], record: RequestRecord,
                            payload: dict[str, Any], *, store: bool, ttl: int) -> Result:
        """Join the identical stream in flight, or start it (see fanout.py); store it when complete."""
        shared = self._streams.get(key)
        leader = shared is None or not shared.joinable
        if leader:
            async def stored(result: Result, chunks: list[bytes]) -> None:
                state = result.stream_state
                if state is not None and state.recovered_by:  # stitched from two models: not stored
                    return
                body = assemble(chunks)
                if body is not None:
                    await self.set(key, CachedResponse(body, result.ref), ttl)
                    self.streams_stored += 1

            shared = SharedStream(lambda: call(raw_usage=True), max_lag=self.stream_buffer,
                                  on_complete=stored if store else None,
                                  on_end=lambda s, k=key: self._stream_ended(k, s))
            self._streams[key] = shared
        else:
            self.coalesced += 1
            record.cache = "coalesced"
        assert shared is not None
        return await shared.subscribe().result(leader=leader, client_usage=wants_usage(payload))

    @staticmethod
    async def _completion_of(shared: SharedStream) -> Result | None:
        """A non-stream answer read from a stream in flight; None when that stream fails or breaks
        (the request then makes its own call)."""
        subscriber = shared.subscribe()
        try:
            base = await subscriber.result(leader=False, client_usage=True)
            chunks = [chunk async for chunk in subscriber]
        except TiergateError:
            return None
        finally:
            await subscriber.aclose()
        body = assemble(chunks) if subscriber.state.completed else None
        return Result(200, base.ref, [], body=body) if body is not None else None

    def _stream_ended(self, key: str, shared: SharedStream) -> None:
        if self._streams.get(key) is shared:
            del self._streams[key]

    def _landed(self, key: str, flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled, "hits": self.hits, "misses": self.misses,
            "coalesced": self.coalesced, "stores": self.stores, "evictions": self.memory.evictions,
            "expired": self.memory.expired, "entries": len(self.memory), "bytes": self.memory.bytes,
            "max_entries": self.memory.max_entries, "max_bytes": self.memory.max_bytes,
            "in_flight": len(self._inflight), "streams_in_flight": len(self._streams),
            "stream_subscribers": sum(s.subscribers for s in self._streams.values()),
            "streams_stored": self.streams_stored,
            "redis": self.redis.stats() if self.redis is not None else {"configured": False},
        }

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for flight in list(self._inflight.values()):
            flight.task.cancel()
        self._inflight.clear()
        for shared in list(self._streams.values()):
            shared.task.cancel()
        self._streams.clear()
        if self.redis is not None:
            await self.redis.close()
        await self.memory.clear()


class _Flight:
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[Any]):
        self.task = task
        self.waiters = 0


# --- replay of a cached completion as a stream ---------------------------------------------


async def replay_stream(body: bytes, *, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE events the OpenAI SDK accepts, built from a cached chat.completion or text_completion."""
    for event in replay_events(body, include_usage=include_usage):
        yield event


def replay_events(body: bytes, *, include_usage: bool) -> list[bytes]:
    data = orjson.loads(body)
    chat = data.get("object") != "text_completion"
    base: dict[str, Any] = {"id": data.get("id", ""), "created": data.get("created", 0),
                            "model": data.get("model", ""),
                            "object": "chat.completion.chunk" if chat else "text_completion"}
    if data.get("system_fingerprint") is not None:
        base["system_fingerprint"] = data["system_fingerprint"]
    events: list[dict[str, Any]] = []
    for i, choice in enumerate(data.get("choices") or []):
        index = choice.get("index", i)
        if chat:
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": message.get("role", "assistant"),
                                     "content": message.get("content")}
            if message.get("refusal") is not None:
                delta["refusal"] = message["refusal"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": n, **call} for n, call in enumerate(message["tool_calls"])]
            if message.get("function_call"):
                delta["function_call"] = message["function_call"]
            events.append({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None,
                                                "logprobs": choice.get("logprobs")}]})
            events.append({**base, "choices": [{"index": index, "delta": {},
                                                "finish_reason": choice.get("finish_reason", "stop")}]})
        else:
            events.append({**base, "choices": [{"index": index, "text": choice.get("text", ""),
                                                "finish_reason": None, "logprobs": choice.get("logprobs")}]})
            events.append({**base, "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": choice.get("finish_reason", "stop")}]})
    if include_usage and data.get("usage") is not None:
        events.append({**base, "choices": [], "usage": data["usage"]})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
