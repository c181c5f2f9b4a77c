"""Stored objects passed through (files, uploads, batches, vector stores, ...) belong to the inbound key
that created them: another key is answered 404 for them, and a list shows a key only its own.

tiergate's provider key is shared by every inbound key, so the provider cannot tell them apart: the
owner is recorded when tiergate sees an object created (its `id` read from the provider's answer, as a
Responses id is) and checked on every later call naming it, in the path or in the body (a batch's
`input_file_id`, a vector store's `file_ids`, ...). An object whose owner tiergate does not know is no
key's. Without inbound keys (a sidecar) none of this applies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from ..engine.redaction import Redactor
from ..fleet.owners import ObjectOwners
from ..types import NotFoundError, UpstreamError

# the OpenAI API's collections of stored objects, by path under /v1 (the object's id follows)
COLLECTIONS = ("files", "uploads", "batches", "vector_stores", "fine_tuning/jobs", "containers", "conversations",
               "chat/completions")  # the last: chat answers stored with `store: true` (recorded by the router)
# request fields naming stored objects the call would use
REFERENCES = ("input_file_id", "file_id", "file_ids", "training_file", "validation_file", "vector_store_ids")
# answer fields naming objects the provider made for the call's owner (a batch's results, an upload's file)
DERIVED = ("output_file_id", "error_file_id")
_MAX_ANSWER = 32 * 1024 * 1024  # a JSON answer about stored objects held whole to read its ids
_MAX_PAGES = 10  # further provider pages read to fill one filtered page of a key's objects


def _collection(path: str) -> tuple[str, str | None] | None:
    """(collection, object id or None) of a `/v1/...` path about stored objects; None for any other."""
    rest = path[4:]  # after "/v1/"
    for collection in COLLECTIONS:
        if rest == collection:
            return collection, None
        if rest.startswith(collection) and rest[len(collection)] == "/":
            object_id = rest[len(collection) + 1:].split("/", 1)[0]
            return collection, object_id or None
    return None


def _referenced(body: bytes | None) -> list[str]:
    """The stored objects a JSON request body names."""
    if not body:
        return []
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(payload, dict):
        return []
    found: list[str] = []
    for name in REFERENCES:
        value = payload.get(name)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, str))
    return found


def _not_found(object_id: str) -> NotFoundError:
    return NotFoundError(f"No such object: {object_id!r} (it was not created through tiergate with this key)",
                         param="id", code="not_found")


class Keep:
    """What a pass-through answer goes through on its way back: its headers (`keep(upstream, out)`), then
    its chunks (`keep.chunks(...)`). This one, `as_is`, changes nothing. `lists`: the answer is a list
    filtered to the key's objects, which further pages of the provider's (`pages`) fill."""

    lists = False
    pages: PageSource | None = None

    def __call__(self, upstream: Any, out: dict[str, str]) -> dict[str, str]:
        return out

    def chunks(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return chunks


as_is = Keep()


@dataclass
class PageSource:
    """Where the further pages of a listed collection come from: the same GET at the same provider, with
    the same headers, `after` the last object seen (its answer masked as the relayed one is)."""

    session: aiohttp.ClientSession
    url: URL
    headers: Mapping[str, str]
    timeout: aiohttp.ClientTimeout
    redactor: Redactor
    query: Mapping[str, str]

    async def after(self, cursor: str) -> dict[str, Any] | None:
        """The provider's page after `cursor`; None when it gives none (an error, not JSON, too large)."""
        async with self.session.get(self.url.update_query(after=cursor), headers=self.headers,
                                    timeout=self.timeout, allow_redirects=False) as resp:
            if resp.status != 200 or (resp.content_length or 0) > _MAX_ANSWER:
                return None
            body = await resp.content.read(_MAX_ANSWER + 1)
        if len(body) > _MAX_ANSWER:
            return None
        try:
            page = orjson.loads(self.redactor.redact(body))
        except orjson.JSONDecodeError:
            return None
        return page if isinstance(page, dict) and isinstance(page.get("data"), list) else None


class Ownership(Keep):
    """One call of an inbound key about stored objects, checked before it was sent (`guard`): its answer
    read for the ids it creates, and filtered when it lists them."""

    def __init__(self, owners: ObjectOwners, key: str, method: str, object_id: str | None):
        self.owners = owners
        self.key = key
        self.method = method
        self.object_id = object_id
        self.read = False
        # a list of the collection's objects is filtered; one under an object of the key's (a conversation's
        # items, a stored chat answer's messages, a job's events) is that object's, whole: its entries are
        # not objects tiergate records, and filtering them would empty it
        self.lists = method == "GET" and object_id is None

    def __call__(self, upstream: Any, out: dict[str, str]) -> dict[str, str]:
        """A JSON success is read whole (and may change length: sent chunked); anything else passes as is."""
        self.read = 200 <= upstream.status < 300 and "json" in upstream.content_type
        if self.read:
            out.pop("Content-Length", None)
        return out

    def chunks(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return self._answered(chunks) if self.read else chunks

    async def _answered(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > _MAX_ANSWER:
                raise UpstreamError("the provider's answer about stored objects is too large to check its owner",
                                    status=502, code="upstream_too_large")
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        rewritten = await self._note(answer) if isinstance(answer, dict) else None
        yield rewritten or bytes(body)

    async def _note(self, answer: dict[str, Any]) -> bytes | None:
        """Record what the answer creates; a list's answer rewritten to the key's objects (else None)."""
        owners, key = self.owners, self.key
        if self.lists and answer.get("object") == "list" and isinstance(answer.get("data"), list):
            await self._filtered(answer)
            return orjson.dumps(answer)
        created = answer.get("id")
        if self.method == "POST" and self.object_id is None and isinstance(created, str):
            await owners.remember(created, key)
        if self.method == "DELETE" and self.object_id is not None and answer.get("deleted") is True:
            await owners.forget(self.object_id)
        for name in DERIVED:  # a batch's result files are its owner's
            if isinstance(answer.get(name), str):
                await owners.remember(answer[name], key)
        made = answer.get("file")
        if isinstance(made, dict) and isinstance(made.get("id"), str):  # a completed upload's file
            await owners.remember(made["id"], key)
        return None


    async def _filtered(self, answer: dict[str, Any]) -> None:
        """The list `answer` rewritten to a page of the key's own objects: as many as the client asked
        (`limit`, else as many as the provider's page held), from further provider pages when this one
        held others' (at most `_MAX_PAGES` more), with `first_id`/`last_id`/`has_more` of that page, so
        that paging `after` its last id reaches every object of the key's and none of another's."""
        items: list[Any] = answer["data"]
        target = _limit(self.pages.query if self.pages is not None else {}, len(items))
        more = answer.get("has_more") is True
        mine = await self._mine(items)
        pages = self.pages if self.pages is not None and "before" not in self.pages.query else None
        fetched = 0
        while len(mine) < target and more and pages is not None and fetched < _MAX_PAGES and items:
            last = items[-1].get("id") if isinstance(items[-1], dict) else None
            page = await pages.after(last) if isinstance(last, str) else None
            if page is None:
                break
            fetched += 1
            items, more = page["data"], page.get("has_more") is True
            mine += await self._mine(items)
        if len(mine) > target:
            mine, more = mine[:target], True
        answer["data"] = mine
        if "has_more" in answer:
            answer["has_more"] = more
        for field, at in (("first_id", 0), ("last_id", -1)):
            if field in answer:
                answer[field] = mine[at]["id"] if mine else None

    async def _mine(self, items: list[Any]) -> list[Any]:
        ids = [item["id"] for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)]
        owned = await self.owners.owners(ids)
        return [item for item in items if isinstance(item, dict) and owned.get(item.get("id")) == self.key]


def _limit(query: Mapping[str, str], provider_page: int) -> int:
    """How many objects the client asked a page to hold: its `limit`, else what the provider gave."""
    value = query.get("limit", "")
    return max(1, min(int(value), 10_000)) if value.isdigit() else max(1, provider_page)


async def guard(owners: ObjectOwners, key: str | None, method: str, path: str, body: bytes | None) -> Keep:
    """Before a pass-through call is sent: 404 when it names a stored object (in its path or its JSON
    body) that `key` did not create; the call's `Ownership` when its answer must be read; `as_is` when
    nothing here applies (no inbound keys, or not about stored objects)."""
    if key is None:
        return as_is
    found = _collection(path)
    if found is None:
        return as_is
    object_id = found[1]
    named = ([object_id] if object_id is not None else []) + _referenced(body)
    if named:
        known = await owners.owners(named)
        for name in named:
            if known.get(name) != key:
                raise _not_found(name)
    return Ownership(owners, key, method, object_id)
