"""Which inbound key created each stored object (file, upload, batch, vector store, ...) tiergate saw
created through pass-through, so that other keys are answered 404 for it.

A bounded LRU in memory; with `TIERGATE_REDIS_URL` also in Redis (expiring with the objects' usual
life), so that every tiergate of a fleet agrees. Redis failing is logged and survived: this process's
memory still answers for the objects it saw.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from ..settings import RouterConfig

log = logging.getLogger("tiergate.owners")

TTL_S = 30 * 24 * 3600  # a month: batches' files and stored objects outlive a day, most not a month
RETRY_INTERVAL_S = 5.0  # after a Redis failure, memory alone answers this long (one log line per outage)


class ObjectOwners:
    """`remember(id, key)`, `owner(id)`, `forget(id)`; `close()` at shutdown."""

    def __init__(self, config: RouterConfig):
        self._size = max(1, config.response_affinity_size)
        self._memory: OrderedDict[str, str] = OrderedDict()
        self._prefix = f"{config.cache_namespace}:owner:"
        self._timeout = max(config.redis_timeout, 0.5)
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
            log.warning("object owners: Redis %s failed (%s); using this process's memory for %ss",
                        what, type(exc).__name__, RETRY_INTERVAL_S)
        self._down_until = time.monotonic() + RETRY_INTERVAL_S

    async def remember(self, object_id: str, key: str) -> None:
        memory = self._memory
        memory[object_id] = key
        memory.move_to_end(object_id)
        if len(memory) > self._size:
            memory.popitem(last=False)
        client = self._client()
        if client is not None:
            try:
                await client.set(self._prefix + object_id, key.encode(), ex=TTL_S)
            except Exception as exc:  # noqa: BLE001 - Redis down: this process still remembers
                self._failed("set", exc)
            else:
                self._down_until = 0.0

    async def owner(self, object_id: str) -> str | None:
        """The name of the key that created `object_id`; None when tiergate did not see it created."""
        key = self._memory.get(object_id)
        if key is not None:
            self._memory.move_to_end(object_id)
            return key
        client = self._client()
        if client is None:
            return None
        try:
            raw = await client.get(self._prefix + object_id)
        except Exception as exc:  # noqa: BLE001
            self._failed("get", exc)
            return None
        if raw is None:
            return None
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        self._memory[object_id] = key
        return key

    async def owners(self, object_ids: list[str]) -> dict[str, str]:
        """The owners of those of `object_ids` tiergate knows (one Redis round trip for the rest)."""
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
                    if raw is not None:
                        found[object_id] = raw.decode() if isinstance(raw, bytes) else str(raw)
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
                log.debug("object owners: closing Redis: %s", type(exc).__name__)
            self._redis = None
