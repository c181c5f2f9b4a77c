"""Which provider holds each stored Responses API id, so that follow-ups reach it, and which inbound key
created it, so that no other key reaches it.

A bounded LRU in memory; with `TIERGATE_REDIS_URL` also in Redis, so that every tiergate of a
fleet agrees (a follow-up may land on another sidecar). Redis failing is logged and survived:
this process's own memory still answers for the ids it saw.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, NamedTuple

from ..settings import RouterConfig

log = logging.getLogger("tiergate.affinity")

TTL_S = 30 * 24 * 3600  # OpenAI keeps stored responses for 30 days
RETRY_INTERVAL_S = 5.0  # after a Redis failure, memory alone answers this long (one log line per outage)


class Holder(NamedTuple):
    """Where a response id lives: its provider and model; `translated` when a chat-only provider
    answered through translation (nothing is stored there: the id cannot be retrieved); `owner`, the
    name of the inbound key that created it (None without inbound keys)."""

    provider: str
    model: str
    translated: bool = False
    owner: str | None = None

    def encode(self) -> bytes:
        return f"{self.provider}\n{self.model}\n{int(self.translated)}\n{self.owner or ''}".encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Holder | None:
        text = raw.decode() if isinstance(raw, bytes) else raw
        parts = text.split("\n")
        if len(parts) not in (3, 4) or not parts[0]:  # 3: written before owners were recorded
            return None
        return cls(parts[0], parts[1], parts[2] == "1", (parts[3] or None) if len(parts) == 4 else None)


class ResponseAffinity:
    """`remember(id, holder)`, `lookup(id)`, `forget(id)`; `close()` at shutdown; `for_key(name)`, the
    same as one inbound key sees it. `keyed`: lookups are limited to one key's ids."""

    keyed = False

    def __init__(self, config: RouterConfig):
        self._size = max(1, config.response_affinity_size)
        self._memory: OrderedDict[str, Holder] = OrderedDict()
        self._prefix = f"{config.cache_namespace}:response:"
        self._timeout = max(config.redis_timeout, 0.5)  # a follow-up must find the id: worth a little wait
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
            log.warning("response affinity: Redis %s failed (%s); using this process's memory for %ss",
                        what, type(exc).__name__, RETRY_INTERVAL_S)
        self._down_until = time.monotonic() + RETRY_INTERVAL_S

    def _recovered(self) -> None:
        if self._down_until:
            self._down_until = 0.0
            log.info("response affinity: Redis answers again")

    async def remember(self, response_id: str, holder: Holder) -> None:
        memory = self._memory
        memory[response_id] = holder
        memory.move_to_end(response_id)
        if len(memory) > self._size:
            memory.popitem(last=False)
        client = self._client()
        if client is not None:
            try:
                await client.set(self._prefix + response_id, holder.encode(), ex=TTL_S)
            except Exception as exc:  # noqa: BLE001 - Redis down: this process still remembers
                self._failed("set", exc)
            else:
                self._recovered()

    async def lookup(self, response_id: str) -> Holder | None:
        holder = self._memory.get(response_id)
        if holder is not None:
            self._memory.move_to_end(response_id)  # a conversation in use stays remembered
            return holder
        client = self._client()
        if client is None:
            return None
        try:
            raw = await client.get(self._prefix + response_id)
        except Exception as exc:  # noqa: BLE001
            self._failed("get", exc)
            return None
        self._recovered()
        return None if raw is None else Holder.decode(raw)

    async def forget(self, response_id: str) -> None:
        self._memory.pop(response_id, None)
        client = self._client()
        if client is not None:
            try:
                await client.delete(self._prefix + response_id)
            except Exception as exc:  # noqa: BLE001
                self._failed("delete", exc)

    def for_key(self, key: str | None) -> ResponseAffinity:
        """The ids as the inbound key `key` sees them (all of them without inbound keys)."""
        return self if key is None else KeyedAffinity(self, key)

    async def close(self) -> None:
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception as exc:  # noqa: BLE001 - closing a pool whose server is gone
                log.debug("response affinity: closing Redis: %s", type(exc).__name__)
            self._redis = None


class KeyedAffinity(ResponseAffinity):
    """The affinity as one inbound key sees it: the ids it records are its own, and an id another key
    created (or one without an owner) is not found. A view: the state is the shared affinity's."""

    keyed = True

    def __init__(self, shared: ResponseAffinity, key: str):  # noqa: D107 - no state of its own to set up
        self._shared = shared
        self.key = key

    async def remember(self, response_id: str, holder: Holder) -> None:
        await self._shared.remember(response_id, holder._replace(owner=self.key))

    async def lookup(self, response_id: str) -> Holder | None:
        holder = await self._shared.lookup(response_id)
        return holder if holder is not None and holder.owner == self.key else None

    async def forget(self, response_id: str) -> None:
        if await self.lookup(response_id) is not None:  # never another key's
            await self._shared.forget(response_id)

    def for_key(self, key: str | None) -> ResponseAffinity:
        return self._shared.for_key(key)

    async def close(self) -> None:
        await self._shared.close()
