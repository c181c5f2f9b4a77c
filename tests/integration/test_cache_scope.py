"""The cache answers only within a key: cached answers, coalesced requests and shared streams stay among
the requests of one inbound key (and, on a `pass_client_key` provider, of one provider credential);
`cache_scope: shared` on a route shares them across keys."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from ..conftest import table_doc, until
from ..upstream import Ok

KEYS = ("team-a=sk-team-a-SECRET-123", "team-b=sk-team-b-SECRET-456")
TEAM_A = {"Authorization": "Bearer sk-team-a-SECRET-123"}
TEAM_B = {"Authorization": "Bearer sk-team-b-SECRET-456"}
CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "what did team a ask?"}],
        "temperature": 0}


async def post(http, url, body, headers):
    async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_an_answer_cached_for_one_key_is_not_served_to_another(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), api_keys=KEYS)
    url = running.v1 + "/chat/completions"
    assert (await post(http, url, CHAT, TEAM_A))[1]["x-tiergate-cache"] == "miss"
    status, headers, _ = await post(http, url, CHAT, TEAM_B)
    assert status == 200 and headers["x-tiergate-cache"] == "miss"  # B's own call, on B's budget
    assert upstream.calls == 2
    for team in (TEAM_A, TEAM_B):  # each key's own answer is cached for it
        assert (await post(http, url, CHAT, team))[1]["x-tiergate-cache"] == "hit"
    assert upstream.calls == 2


async def test_a_route_may_share_its_cache_across_keys(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, cache_scope="shared"), api_keys=KEYS)
    url = running.v1 + "/chat/completions"
    assert (await post(http, url, CHAT, TEAM_A))[1]["x-tiergate-cache"] == "miss"
    assert (await post(http, url, CHAT, TEAM_B))[1]["x-tiergate-cache"] == "hit"
    assert upstream.calls == 1


async def test_a_bad_cache_scope_is_refused_at_load(upstream, start_tiergate):
    with pytest.raises(Exception, match="cache_scope"):
        await start_tiergate(table_doc(upstream, cache_scope="everyone"))


@pytest.mark.parametrize("stream", [False, True])
async def test_requests_in_flight_are_not_joined_across_keys(upstream, start_tiergate, http, stream):
    running = await start_tiergate(table_doc(upstream), api_keys=KEYS)
    url = running.v1 + "/chat/completions"
    gate = asyncio.Event()
    upstream.default = Ok(gate=gate)
    body = {**CHAT, "stream": stream}
    first = asyncio.ensure_future(post(http, url, body, TEAM_A))
    await until(lambda: upstream.calls == 1)
    second = asyncio.ensure_future(post(http, url, body, TEAM_B))
    await until(lambda: upstream.calls == 2)  # B's request went upstream itself: not joined to A's
    third = asyncio.ensure_future(post(http, url, body, TEAM_A))  # A's twin joins A's flight
    await until(lambda: running.router.cache.coalesced == 1 or third.done())
    gate.set()
    answers = await asyncio.gather(first, second, third)
    assert [a[1]["x-tiergate-cache"] for a in answers] == ["miss", "miss", "coalesced"]
    assert upstream.calls == 2


async def test_bring_your_own_key_answers_are_scoped_to_the_credential(upstream, start_tiergate, http):
    doc = table_doc(upstream)
    doc["providers"]["primary"]["pass_client_key"] = True
    running = await start_tiergate(doc)  # a sidecar: no inbound keys, each client's Authorization is its own
    url = running.v1 + "/chat/completions"
    alice, mallory = {"Authorization": "Bearer sk-alice-own"}, {"Authorization": "Bearer sk-mallory-own"}
    assert (await post(http, url, CHAT, alice))[1]["x-tiergate-cache"] == "miss"
    assert (await post(http, url, CHAT, mallory))[1]["x-tiergate-cache"] == "miss"
    assert (await post(http, url, CHAT, alice))[1]["x-tiergate-cache"] == "hit"
    assert upstream.calls == 2
    sent = [r.headers.get("Authorization") for r in upstream.requests]
    assert sent == ["Bearer sk-alice-own", "Bearer sk-mallory-own"]  # each credential reached the provider
