"""Routing strategies, model groups and aliases that name routes, through a real tiergate over loopback
with the mock upstreams as providers (set latencies, failures on command) and the openai SDK."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import openai
import orjson
import pytest

from ..conftest import table_doc
from ..upstream import Fail, Ok

LONG = "word " * 400  # about 500 tokens by the usual estimate


def chat(model: str = "general_purpose", content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def post(http, url, body):
    async with http.post(url + "/chat/completions", data=orjson.dumps(body)) as resp:
        return resp.status, resp.headers, await resp.read()


def two_providers(upstream, backup, **extra: Any) -> dict[str, Any]:
    doc = table_doc(upstream, backup)
    doc.update(extra)
    return doc


async def test_a_90_10_weighted_split_lands_within_3_points_and_a_user_stays_put(upstream, backup,
                                                                                   start_tiergate, http):
    doc = two_providers(upstream, backup)
    doc["routes"][0].update(strategy="weighted", weights=[90, 10])
    running = await start_tiergate(doc)
    sem = asyncio.Semaphore(16)
    headers: list[str] = []

    async def one() -> None:
        async with sem:
            status, h, _ = await post(http, running.v1, chat())
            assert status == 200
            headers.append(h["x-tiergate-strategy"])

    await asyncio.gather(*(one() for _ in range(2000)))
    assert upstream.calls + backup.calls == 2000
    assert 0.87 <= upstream.calls / 2000 <= 0.93
    assert set(headers) == {"weighted primary/model-a", "weighted backup/model-b"}
    # one user (the request's `user` field) stays on one deployment
    before = upstream.calls, backup.calls
    for _ in range(20):
        await post(http, running.v1, chat(user="alice"))
    moved = upstream.calls - before[0], backup.calls - before[1]
    assert sorted(moved) == [0, 20]


async def test_least_latency_follows_the_fast_deployment_and_leaves_it_when_it_slows(upstream, backup,
                                                                                     start_tiergate, http):
    doc = two_providers(upstream, backup, groups={"gpt": {"strategy": "least_latency",
                                                          "deployments": ["primary/model-a", "backup/model-a"]}})
    doc["routes"][0].update(model="gpt", fallbacks=[])
    running = await start_tiergate(doc)
    upstream.default, backup.default = Ok(delay=0.02), Ok(delay=0.2)
    for _ in range(10):  # warm-up: each measured at least once
        assert (await post(http, running.v1, chat()))[0] == 200
    assert backup.calls >= 1 and upstream.calls >= 1
    fast, slow = upstream.calls, backup.calls
    sem = asyncio.Semaphore(4)

    async def one() -> str:
        async with sem:
            status, headers, _ = await post(http, running.v1, chat())
            assert status == 200
            return headers["x-tiergate-provider"]

    answered = Counter(await asyncio.gather(*(one() for _ in range(100))))
    assert answered["primary"] >= 80 and upstream.calls - fast == answered["primary"]
    assert (await post(http, running.v1, chat()))[1]["x-tiergate-strategy"].startswith("ordered+gpt:least_latency ")
    # the fast one slows down: traffic moves to the other after it is seen
    upstream.default = Ok(delay=0.4)
    for _ in range(3):
        await post(http, running.v1, chat())
    slow = backup.calls
    later = Counter([await one() for _ in range(15)])
    assert later["backup"] >= 12 and backup.calls - slow == later["backup"]
    details = await running.router.get_health_status()
    a = details["deployments"]["primary/model-a"]
    assert a["latency_ms"] >= 300 and a["outstanding"] == 0 and a["weights"] == {"group:gpt": 1.0}


async def test_an_alias_naming_a_route_falls_back_with_the_sdk(upstream, backup, start_tiergate):
    doc = two_providers(upstream, backup)
    doc["aliases"]["gpt-4o"] = {"model": "primary/model-a", "fallbacks": ["backup/model-b"], "max_tokens": 77}
    running = await start_tiergate(doc)
    upstream.default = Fail(500)
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="x", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    answer = raw.parse()
    assert answer.choices[0].message.content == "backup answered model-b"
    assert raw.headers["x-tiergate-route"] == "alias:gpt-4o" and raw.headers["x-tiergate-attempts"] == "2"
    assert backup.requests[-1].json["max_tokens"] == 77  # the alias's route defaults apply
    # no route chooses per request: no load is kept (the ordered path costs what it did)
    assert "deployments" not in await running.router.get_health_status()
    assert running.router.loop.sender.load is None


async def test_too_large_for_the_cheaper_window_goes_to_the_larger_without_a_failed_call(
        upstream, backup, start_tiergate, http, caplog):
    caplog.set_level(logging.INFO)
    doc = two_providers(upstream, backup, context_windows={"primary/model-a": 100, "backup/model-b": 128000},
                        pricing={"primary/model-a": {"input": 0.1, "output": 0.2},
                                 "backup/model-b": {"input": 5, "output": 15}})
    doc["routes"][0].update(strategy="cheapest")
    running = await start_tiergate(doc, request_log="logging")
    status, headers, _ = await post(http, running.v1, chat())
    assert status == 200 and headers["x-tiergate-provider"] == "primary"  # the cheaper, when it fits
    status, headers, _ = await post(http, running.v1, chat(content=LONG))
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    assert headers["x-tiergate-attempts"] == "1" and upstream.calls == 1  # never sent the long prompt
    running.router.telemetry.drain()
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tiergate.requests"]
    assert lines[-1]["strategy"] == "cheapest primary/model-a"
    assert lines[-1]["candidates"] == ["primary/model-a", "backup/model-b"]
    assert lines[-1]["attempt_outcomes"] == ["primary/model-a:context_window", "backup/model-b:ok"]


@pytest.mark.parametrize("strategy", ["weighted", "least_latency"])
async def test_a_group_member_that_fails_is_followed_by_the_rest_of_its_group_first(
        strategy, upstream, backup, start_tiergate, http):
    third = {"base_url": backup.url, "api_key": "sk-third"}
    doc = two_providers(upstream, backup, groups={"g": {"strategy": strategy,
                                                        "deployments": ["primary/model-a", "third/model-a"]}})
    doc["providers"]["third"] = third
    doc["routes"][0].update(model="g", fallbacks=["backup/model-b"])
    running = await start_tiergate(doc)
    upstream.default = Fail(500)
    for _ in range(6):
        status, headers, _ = await post(http, running.v1, chat())
        assert status == 200 and headers["x-tiergate-model"] == "third/model-a"


async def test_strategies_groups_and_alias_routes_live_in_postgres(upstream, backup, tmp_path):
    import yaml

    from proxy.table.store import init_db, read_snapshot

    from ..conftest import make_config
    from ..pg import fresh_schema

    doc = two_providers(upstream, backup, groups={"gpt": {"strategy": "least_latency", "deployments": [
        {"model": "primary/model-a", "weight": 9}, "backup/model-a"]}})
    doc["routes"][0].update(strategy="weighted", weights=[90, 10])
    doc["routes"][1].update(model="gpt")
    doc["aliases"]["gpt-4o"] = {"model": "gpt", "fallbacks": ["backup/model-b"], "strategy": "cheapest"}
    doc["aliases"]["coder"] = {"route": "code_generation:premium"}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    async with fresh_schema() as schema:
        config = make_config(database_url=schema.url)
        await init_db(config, path)
        table = (await read_snapshot(schema.conn, config)).table
        assert table.problems == ()
        route = table.resolve(None, None, "general_purpose").route
        assert route.strategy == "weighted" and [g.weight for g in route.layout] == [90, 10]
        premium = table.resolve(None, None, "code_generation:premium")
        assert premium.layout[0].name == "gpt" and premium.layout[0].strategy == "least_latency"
        assert [m.weight for m in premium.layout[0].members] == [9, 1]
        alias = table.resolve(None, None, "gpt-4o")
        assert alias.name == "alias:gpt-4o" and alias.strategy == "cheapest" and len(alias.candidates) == 3
        assert table.resolve(None, None, "coder") is premium
        # plain SQL changes a route's strategy
        await schema.conn.execute("UPDATE llm_routes SET strategy = 'least_latency', weights = NULL "
                                  "WHERE use_case = 'general_purpose' AND tier = 'standard'")
        table = (await read_snapshot(schema.conn, config)).table
        assert table.resolve(None, None, "general_purpose").strategy == "least_latency"


async def test_a_stream_on_a_route_that_chooses_says_how_and_is_measured_at_its_first_chunk(
        upstream, backup, start_tiergate):
    doc = two_providers(upstream, backup)
    doc["routes"][0].update(strategy="least_latency")
    running = await start_tiergate(doc)
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="x", max_retries=0) as client:
        async with client.chat.completions.with_streaming_response.create(
                model="general_purpose", messages=[{"role": "user", "content": "hi"}], stream=True) as resp:
            assert resp.headers["x-tiergate-strategy"].startswith("least_latency ")
            text = "".join([c.choices[0].delta.content or "" async for c in await resp.parse() if c.choices])
    assert text.endswith("model-a") or text.endswith("model-b")
    load = (await running.router.get_health_status())["deployments"]
    measured = [d for d in load.values() if d["samples"]]
    assert len(measured) == 1 and measured[0]["outstanding"] == 0
