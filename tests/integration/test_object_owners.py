"""Stored objects belong to the inbound key that created them: another key is answered 404 (in OpenAI's
shape) for a stored response, a file, a batch or a vector store, and never makes tiergate forget it; lists
show a key only its own; `previous_response_id` of another key's response is a 404; a fleet agrees
through Redis; without inbound keys nothing changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from ..conftest import REDIS_URL, table_doc
from ..upstream import MockUpstream

KEYS = ("team-a=sk-team-a-SECRET-123", "team-b=sk-team-b-SECRET-456")
TEAM_A = {"Authorization": "Bearer sk-team-a-SECRET-123"}
TEAM_B = {"Authorization": "Bearer sk-team-b-SECRET-456"}


@pytest.fixture
async def provider() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("primary", responses=True, objects=True).start()
    yield server
    await server.stop()


def doc(provider: MockUpstream) -> dict[str, Any]:
    table = table_doc(provider)
    table["passthrough_provider"] = "primary"
    return table


async def call(http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
               **body: Any) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, **body) as resp:
        return resp.status, orjson.loads(await resp.read())


def upload(name: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b'{"custom_id": "1"}\n', filename=name, content_type="application/jsonl")
    return form


def not_found(status: int, answer: Any) -> bool:
    return status == 404 and set(answer["error"]) == {"message", "type", "param", "code"} \
        and answer["error"]["type"] == "invalid_request_error"


async def test_files_and_batches_belong_to_their_key(provider, start_tiergate, http):
    running = await start_tiergate(doc(provider), api_keys=KEYS)
    v1 = running.v1
    status, a_file = await call(http, "POST", v1 + "/files", TEAM_A, data=upload("a.jsonl"))
    assert status == 200
    status, b_file = await call(http, "POST", v1 + "/files", TEAM_B, data=upload("b.jsonl"))
    assert status == 200
    # lists: each key sees its own (the official SDK reads the filtered page)
    for headers, own in ((TEAM_A, a_file["id"]), (TEAM_B, b_file["id"])):
        client = openai.AsyncOpenAI(base_url=v1, api_key=headers["Authorization"].split()[1], max_retries=0)
        assert [f.id async for f in client.files.list()] == [own]
        await client.close()
    calls = provider.calls
    for method, path in (("GET", f"/files/{a_file['id']}"), ("GET", f"/files/{a_file['id']}/content"),
                         ("DELETE", f"/files/{a_file['id']}")):
        assert not_found(*await call(http, method, v1 + path, TEAM_B)), path
    # a batch of another key's file is refused too
    batch = {"input_file_id": a_file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert not_found(*await call(http, "POST", v1 + "/batches", TEAM_B, json=batch))
    assert provider.calls == calls  # nothing refused reached the provider
    # B's DELETE did not make tiergate forget A's file
    assert (await call(http, "GET", v1 + f"/files/{a_file['id']}", TEAM_A))[0] == 200
    status, a_batch = await call(http, "POST", v1 + "/batches", TEAM_A, json=batch)
    assert status == 200
    for method, path in (("GET", f"/batches/{a_batch['id']}"), ("POST", f"/batches/{a_batch['id']}/cancel")):
        assert not_found(*await call(http, method, v1 + path, TEAM_B)), path
    status, listed = await call(http, "GET", v1 + "/batches", TEAM_B)
    assert status == 200 and listed["data"] == []
    # the batch's results are a file the provider made: its owner's
    output = a_batch["output_file_id"]
    assert (await call(http, "GET", v1 + f"/files/{output}/content", TEAM_A))[0] == 200
    assert not_found(*await call(http, "GET", v1 + f"/files/{output}", TEAM_B))
    # the owner deletes its file: forgotten, for it too
    assert (await call(http, "DELETE", v1 + f"/files/{a_file['id']}", TEAM_A))[0] == 200
    assert not_found(*await call(http, "GET", v1 + f"/files/{a_file['id']}", TEAM_A))


async def test_stored_responses_belong_to_their_key(provider, start_tiergate, http):
    running = await start_tiergate(doc(provider), api_keys=KEYS, enable_caching=False)
    v1 = running.v1
    status, created = await call(http, "POST", v1 + "/responses", TEAM_A,
                                 json={"model": "general_purpose", "input": "hi"})
    assert status == 200
    rid = created["id"]
    calls = provider.calls
    for method, path in (("GET", f"/responses/{rid}"), ("DELETE", f"/responses/{rid}"),
                         ("POST", f"/responses/{rid}/cancel"), ("GET", f"/responses/{rid}/input_items")):
        assert not_found(*await call(http, method, v1 + path, TEAM_B)), path
    status, answer = await call(http, "POST", v1 + "/responses", TEAM_B,
                                json={"model": "general_purpose", "input": "go on", "previous_response_id": rid})
    assert not_found(status, answer) and answer["error"]["param"] == "previous_response_id"
    assert provider.calls == calls
    # A still reaches its response (B's DELETE forgot nothing) and continues it
    assert (await call(http, "GET", v1 + f"/responses/{rid}", TEAM_A))[0] == 200
    status, _ = await call(http, "POST", v1 + "/responses", TEAM_A,
                           json={"model": "general_purpose", "input": "go on", "previous_response_id": rid})
    assert status == 200


async def test_a_fleet_agrees_on_owners_through_redis(provider, start_tiergate, http, namespace):
    settings = {"api_keys": KEYS, "redis_url": REDIS_URL, "cache_namespace": namespace, "enable_caching": False}
    first = await start_tiergate(doc(provider), **settings)
    second = await start_tiergate(doc(provider), **settings)
    status, a_file = await call(http, "POST", first.v1 + "/files", TEAM_A, data=upload("a.jsonl"))
    assert status == 200
    status, created = await call(http, "POST", first.v1 + "/responses", TEAM_A,
                                 json={"model": "general_purpose", "input": "hi"})
    assert status == 200
    assert (await call(http, "GET", second.v1 + f"/files/{a_file['id']}", TEAM_A))[0] == 200
    assert not_found(*await call(http, "GET", second.v1 + f"/files/{a_file['id']}", TEAM_B))
    assert (await call(http, "GET", second.v1 + f"/responses/{created['id']}", TEAM_A))[0] == 200
    assert not_found(*await call(http, "GET", second.v1 + f"/responses/{created['id']}", TEAM_B))


async def test_without_inbound_keys_nothing_is_scoped(provider, start_tiergate, http):
    running = await start_tiergate(doc(provider))
    v1 = running.v1
    status, made = await call(http, "POST", v1 + "/files", {}, data=upload("a.jsonl"))
    assert status == 200
    status, listed = await call(http, "GET", v1 + "/files", {})
    assert status == 200 and [f["id"] for f in listed["data"]] == [made["id"]]
    assert (await call(http, "GET", v1 + f"/files/{made['id']}", {}))[0] == 200


async def test_unnamed_keys_are_tenants_of_their_own(provider, start_tiergate, http):
    """Several keys listed without names are still one tenant each: an unnamed key cannot read another
    unnamed key's file, nor a named key's."""
    running = await start_tiergate(doc(provider), api_keys=("sk-plain-ONE-111", "sk-plain-TWO-222", KEYS[0]))
    v1 = running.v1
    one = {"Authorization": "Bearer sk-plain-ONE-111"}
    two = {"Authorization": "Bearer sk-plain-TWO-222"}
    status, one_file = await call(http, "POST", v1 + "/files", one, data=upload("one.jsonl"))
    assert status == 200
    status, a_file = await call(http, "POST", v1 + "/files", TEAM_A, data=upload("a.jsonl"))
    assert status == 200
    assert not_found(*await call(http, "GET", v1 + f"/files/{one_file['id']}", two))
    assert not_found(*await call(http, "GET", v1 + f"/files/{a_file['id']}", two))
    assert not_found(*await call(http, "GET", v1 + f"/files/{one_file['id']}", TEAM_A))
    assert (await call(http, "GET", v1 + f"/files/{one_file['id']}", one))[0] == 200
