"""`IdStore`: what tiergate remembers per id it saw created (which provider holds a stored response, which
key owns a file...), kept for the fleet.

A bounded LRU in memory; with `TIERGATE_REDIS_URL` also in Redis with an expiry, so that every tiergate
of a fleet agrees (a follow-up may land on another sidecar). Redis failing is logged once per outage and
survived: this process's memory still answers for the ids it saw, and Redis is asked again after a pause.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..settings import RouterConfig

log = logging.getLogger("tiergate.fleet")

RETRY_INTERVAL_S = 5.0  # after a Redis failure, memory alone answers this long (one log line per outage)
V = TypeVar("V")


class IdStore(Generic[V]):
    """`remember(id, value)`, `get(id)`, `get_many(ids)`, `forget(id)`; `close()` at shutdown.
    `encode`/`decode` turn a value into the bytes kept in Redis and back (None: not a value)."""

    def __init__(self, config: RouterConfig, *, name: str, key_prefix: str, ttl_s: int,
                 encode: Callable[[V], bytes], decode: Callable[[bytes | str], V | None]):
        self.name = name
        self._size = max(1, config.response_affinity_size)
        self._memory: OrderedDict[str, V] = OrderedDict()
        self._prefix = f"{config.cache_namespace}:{key_prefix}:"
        self._ttl_s = ttl_s
        self._encode, self._decode = encode, decode
        self._timeout = max(config.redis_timeout, 0.5)  # a follow-up must find its id: worth a little wait
        self._url = config.redis_url
        self._redis: Any = None
        self._down_until = 0.0

    def _client(self) -> Any:
        if not self._url or (self._down_until and time.monotonic() < self._down_until):
            return None
        if self._redis is None:
            from .connect import redis_client  # one server, a cluster or a Sentinel's primary

            self._redis = redis_client(self._url, timeout=self._timeout)
        return self._redis

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self._down_until:
            log.warning("%s: Redis %s failed (%s); using this process's memory for %ss",
                        self.name, what, type(exc).__name__, RETRY_INTERVAL_S)
        self._down_until = time.monotonic() + RETRY_INTERVAL_S

    def _recovered(self) -> None:
        if self._down_until:
            self._down_until = 0.0
            log.info("%s: Redis answers again", self.name)

    def _keep(self, object_id: str, value: V) -> None:
        memory = self._memory
        memory[object_id] = value
        memory.move_to_end(object_id)
        if len(memory) > self._size:
            memory.popitem(last=False)

    async def remember(self, object_id: str, value: V) -> None:
        self._keep(object_id, value)
        client = self._client()
        if client is not None:
            try:
                await client.set(self._prefix + object_id, self._encode(value), ex=self._ttl_s)
            except Exception as exc:  # noqa: BLE001 - Redis down: this process still remembers
                self._failed("set", exc)
            else:
                self._recovered()

    async def get(self, object_id: str) -> V | None:
        value = self._memory.get(object_id)
        if value is not None:
            self._memory.move_to_end(object_id)  # an id in use stays remembered
            return value
        client = self._client()
        if client is None:
            return None
        try:
            raw = await client.get(self._prefix + object_id)
        except Exception as exc:  # noqa: BLE001
            self._failed("get", exc)
            return None
        self._recovered()
        value = None if raw is None else self._decode(raw)
        if value is not None:
            self._keep(object_id, value)
        return value

    async def get_many(self, object_ids: list[str]) -> dict[str, V]:
        """The values of those of `object_ids` known (one Redis round trip for the ones not in memory)."""
        found = {i: self._memory[i] for i in object_ids if i in self._memory}
        missing = [i for i in object_ids if i not in found]
        client = self._client() if missing else None
        if client is not None:
            try:
                # a cluster spreads the ids over its slots: one MGET per node (redis-py's mget_nonatomic)
                mget = getattr(client, "mget_nonatomic", client.mget)
                values = await mget([self._prefix + i for i in missing])
            except Exception as exc:  # noqa: BLE001
                self._failed("mget", exc)
            else:
                for object_id, raw in zip(missing, values, strict=True):
                    value = None if raw is None else self._decode(raw)
                    if value is not None:
                        found[object_id] = value
        return found

    async def forget(self, object_id: str) -> None:
        self._memory.pop(object_id, None)
        client = self._client()
        if client is not None:
            try:
                await client.delete(self._prefix + object_id)
            except Exception as exc:  # noqa: BLE001
                self._failed("delete", exc)

    async def close(self) -> None:
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception as exc:  # noqa: BLE001 - closing a pool whose server is gone
                log.debug("%s: closing Redis: %s", self.name, type(exc).__name__)
            self._redis = None
