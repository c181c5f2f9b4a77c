"""Embedding batching: concurrent requests for one model go upstream as one and are split back."""

from __future__ import annotations

import asyncio

import orjson

from ..conftest import table_doc
from ..upstream import Fail

NO_CACHE = {"Cache-Control": "no-cache, no-store"}


async def embed(http, running, body, headers=None):
    async with http.post(running.v1 + "/embeddings", data=orjson.dumps(body), headers=headers or {}) as resp:
        return resp.status, resp.headers, orjson.loads(await resp.read())


async def test_concurrent_requests_are_split_back_in_order(upstream, start_tiergate, http):
    inputs = [["a"], ["bb", "ccc"], "dddd", ["eeeee", "ffffff", "ggggggg"], ["hhhhhhhh"]]
    total = sum(1 if isinstance(x, str) else len(x) for x in inputs)
    # the batch goes when it is full: no reliance on the window's timing
    running = await start_tiergate(table_doc(upstream), enable_batching=True, batch_window_ms=60_000,
                                   batch_max_inputs=total)
    results = await asyncio.gather(*[embed(http, running, {"model": "embed-small", "input": x}) for x in inputs])
    assert upstream.calls == 1
    sent = upstream.requests[0].json
    assert sorted(sent["input"]) == sorted(s for x in inputs for s in ([x] if isinstance(x, str) else x))
    usage_total = 0
    for given, (status, headers, body) in zip(inputs, results, strict=True):
        own = [given] if isinstance(given, str) else given
        assert status == 200 and headers["x-tiergate-model"] == "primary/text-embed"
        assert [d["index"] for d in body["data"]] == list(range(len(own)))
        # the mock's first dimension is the length of the input: each client got its own, in order
        assert [d["embedding"][0] for d in body["data"]] == [float(len(s)) for s in own]
        assert body["model"] == "text-embed" and body["object"] == "list"
        usage_total += body["usage"]["total_tokens"]
    assert usage_total == total  # the mock's usage is one token per input: the shares add up
    assert (await running.router.get_health_status())["batching"]["batches"] == 1


async def test_different_options_or_models_are_not_mixed(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), enable_batching=True, batch_window_ms=60_000,
                                   batch_max_inputs=2)
    results = await asyncio.gather(
        embed(http, running, {"model": "embed-small", "input": "x", "dimensions": 8}, NO_CACHE),
        embed(http, running, {"model": "embed-small", "input": "yy", "dimensions": 4}, NO_CACHE),
        embed(http, running, {"model": "primary/other-embed", "input": "zzz"}, NO_CACHE),
        embed(http, running, {"model": "embed-small", "input": "w", "dimensions": 8}, NO_CACHE),
        embed(http, running, {"model": "embed-small", "input": "vv", "dimensions": 4}, NO_CACHE),
        embed(http, running, {"model": "primary/other-embed", "input": "uuu"}, NO_CACHE),
    )
    assert all(status == 200 for status, _, _ in results)
    assert upstream.calls == 3
    batches = {(r.json["model"], r.json.get("dimensions")): r.json["input"] for r in upstream.requests}
    assert {k: sorted(v) for k, v in batches.items()} == {
        ("text-embed", 8): ["w", "x"], ("text-embed", 4): ["vv", "yy"], ("other-embed", None): ["uuu", "zzz"]}


async def test_a_lone_request_goes_after_the_window_unchanged(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), enable_batching=True, batch_window_ms=1)
    status, _, body = await embed(http, running, {"model": "embed-small", "input": ["one", "three"]})
    assert status == 200 and [d["embedding"][0] for d in body["data"]] == [3.0, 5.0]
    assert upstream.requests[0].json["input"] == ["one", "three"]
    assert running.router.batcher.batches == 0  # sent as it came


async def test_a_failure_reaches_every_member(upstream, start_tiergate, http):
    upstream.default = Fail(400)
    running = await start_tiergate(table_doc(upstream), enable_batching=True, batch_window_ms=60_000,
                                   batch_max_inputs=3)
    results = await asyncio.gather(*[embed(http, running, {"model": "embed-small", "input": s}) for s in "abc"])
    assert [status for status, _, _ in results] == [400, 400, 400]
    assert upstream.calls == 1


async def test_token_array_inputs_are_not_batched(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), enable_batching=True, batch_window_ms=60_000)
    status, _, body = await embed(http, running, {"model": "embed-small", "input": [1, 2, 3]})
    assert status == 200 and upstream.requests[0].json["input"] == [1, 2, 3]
