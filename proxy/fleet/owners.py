"""Which inbound key created each stored object (file, upload, batch, vector store, ...) tiergate saw
created through pass-through, so that other keys are answered 404 for it.

A bounded LRU in memory; with `TIERGATE_REDIS_URL` also in Redis (expiring with the objects' usual
life), so that every tiergate of a fleet agrees. Redis failing is logged and survived: this process's
memory still answers for the objects it saw.
"""

from __future__ import annotations

from ..settings import RouterConfig
from ..types import NotFoundError
from .idstore import IdStore

TTL_S = 30 * 24 * 3600  # a month: batches' files and stored objects outlive a day, most not a month


def _decode(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class ObjectOwners:
    """`remember(id, key)`, `owner(id)`, `owners(ids)`, `require(named, key)`, `forget(id)`; `close()` at
    shutdown."""

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

    async def require(self, named: list[tuple[str, str]], key: str) -> None:
        """Raise NotFoundError (404) for the first of `named` ((field, id) pairs) that `key` did not
        create: another key's object, or one tiergate did not see created, is no object of this key's."""
        known = await self.owners([object_id for _, object_id in named])
        for field, object_id in named:
            if known.get(object_id) != key:
                raise NotFoundError(f"No such object: {object_id!r} (it was not created through tiergate with "
                                    "this key)", param=field, code="not_found")

    async def forget(self, object_id: str) -> None:
        await self._store.forget(object_id)

    async def close(self) -> None:
        await self._store.close()
