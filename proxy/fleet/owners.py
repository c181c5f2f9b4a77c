"""Which inbound key created each stored object (file, upload, batch, vector store, ...) tiergate saw
created through pass-through, so that other keys are answered 404 for it.

A bounded LRU in memory; with `TIERGATE_REDIS_URL` also in Redis (expiring with the objects' usual
life), so that every tiergate of a fleet agrees. Redis failing is logged and survived: this process's
memory still answers for the objects it saw.
"""

from __future__ import annotations

from ..settings import RouterConfig
from .idstore import IdStore

TTL_S = 30 * 24 * 3600  # a month: batches' files and stored objects outlive a day, most not a month


def _decode(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class ObjectOwners:
    """`remember(id, key)`, `owner(id)`, `owners(ids)`, `forget(id)`; `close()` at shutdown."""

    def __init__(self, config: RouterConfig):
        self._store: IdStore[str] = IdStore(config, name="object owners", key_prefix="owner", ttl_s=TTL_S,
                                            encode=str.encode, decode=_decode)

    async def remember(self, object_id: str, key: str) -> None:
        await self._store.remember(object_id, key)

    async def owner(self, object_id: str) -> str | None:
        """The name of the key that created `object_id`; None when tiergate did not see it created."""
        return await self._store.get(object_id)

    async def owners(self, object_ids: list[str]) -> dict[str, str]:
        """The owners of those of `object_ids` tiergate knows (one Redis round trip for the rest)."""
        return await self._store.get_many(object_ids)

    async def forget(self, object_id: str) -> None:
        await self._store.forget(object_id)

    async def close(self) -> None:
        await self._store.close()
