"""Which provider holds each stored Responses API id, so that follow-ups reach it, and which inbound key
created it, so that no other key reaches it; kept in an `IdStore` (memory, and Redis for the fleet).
"""

from __future__ import annotations

from typing import NamedTuple

from ..settings import RouterConfig
from .idstore import IdStore

TTL_S = 30 * 24 * 3600  # OpenAI keeps stored responses for 30 days


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
        self._store: IdStore[Holder] = IdStore(config, name="response affinity", key_prefix="response",
                                               ttl_s=TTL_S, encode=Holder.encode, decode=Holder.decode)

    async def remember(self, response_id: str, holder: Holder) -> None:
        await self._store.remember(response_id, holder)

    async def lookup(self, response_id: str) -> Holder | None:
        return await self._store.get(response_id)

    async def forget(self, response_id: str) -> None:
        await self._store.forget(response_id)

    def for_key(self, key: str | None) -> ResponseAffinity:
        """The ids as the inbound key `key` sees them (all of them without inbound keys)."""
        return self if key is None else KeyedAffinity(self, key)

    async def close(self) -> None:
        await self._store.close()


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
