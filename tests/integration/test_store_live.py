"""A running tiergate (real HTTP, mock upstreams) whose table lives in the real Postgres.

Shows: a plain-SQL UPDATE reaches the server through NOTIFY (the delay is printed); the database
going away and coming back with requests flowing and none failed; start-up with the database
unreachable serves the file table and picks the database up when it comes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from proxy.engine.router import Router
from proxy.table.routing import table_from_dict
from proxy.table.store import init_db

from ..conftest import make_config, table_doc
from ..pg import Forwarder, Schema, database_url, fresh_schema, poll, serve_router
from ..upstream import MockUpstream

CHAT = orjson.dumps({"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def schema() -> AsyncIterator[Schema]:
    async with fresh_schema() as s:
        yield s


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    fwd = await Forwarder.to(database_url()).open()
    yield fwd
    await fwd.close()


def two_provider_doc(upstream: MockUpstream, backup: MockUpstream) -> dict[str, Any]:
    """`primary` serves every route; `backup` is defined too, so a route can be moved to it."""
    doc = table_doc(upstream)
    doc["providers"]["backup"] = {"base_url": backup.url, "api_key": "sk-backup"}
    return doc


async def start(schema: Schema, doc: dict[str, Any], tmp_path: Path, url: str, **settings: Any) -> Any:
    """db init from `doc` (directly), then a dynamic tiergate whose DATABASE_URL is `url`."""
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    await init_db(make_config(database_url=schema.url), path)
    config = make_config(database_url=url, config_path=str(path), **settings)
    return await serve_router(Router(config, table=table_from_dict(doc, source=f"file:{path}"), dynamic=True))


async def answered_by(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(url + "/v1/chat/completions", data=CHAT,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-tiergate-model"]


async def health(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/health/details") as resp:
        return (await resp.json())["routing_table"]


async def test_plain_sql_update_reaches_a_running_server_through_notify(
        schema: Schema, upstream: MockUpstream, backup: MockUpstream, tmp_path: Path):
    # a refresh interval far longer than the wait below: only NOTIFY can bring the change in time
    served = await start(schema, two_provider_doc(upstream, backup), tmp_path, schema.url, refresh_interval=300)
    try:
        async with aiohttp.ClientSession() as http:
            assert await answered_by(http, served.url) == "primary/model-a"
            assert (await health(http, served.url))["source"] == "database"
            await poll(lambda: _listening(http, served.url), what="the LISTEN connection")

            changed_at = time.perf_counter()
            await schema.conn.execute("UPDATE llm_routes SET model = 'backup/model-b', fallbacks = '{}' "
                                      "WHERE use_case = 'general_purpose' AND tier = 'standard'")
            await poll(lambda: _answered_by_is(http, served.url, "backup/model-b"), timeout=10,
                       what="the server to route general_purpose:standard to backup/model-b")
            delay_ms = (time.perf_counter() - changed_at) * 1000
            print(f"\nplain-SQL UPDATE -> running tiergate routes to the new model after {delay_ms:.1f} ms "
                  "(contract: within 1 s; refresh interval 300 s)")
            assert backup.calls >= 1
    finally:
        await served.runner.cleanup()


async def test_database_outage_and_return_with_requests_flowing_none_failed(
        schema: Schema, upstream: MockUpstream, backup: MockUpstream, forwarder: Forwarder, tmp_path: Path):
    served = await start(schema, two_provider_doc(upstream, backup), tmp_path, schema.url_via(forwarder.port),
                         refresh_interval=0.5, db_timeout=1.0)
    results: list[tuple[int, str]] = []
    failures: list[str] = []
    stop = asyncio.Event()
    clients: list[asyncio.Task[None]] = []

    async def traffic(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with http.post(served.url + "/v1/chat/completions", data=CHAT,
                                 headers={"Content-Type": "application/json"}) as resp:
                body = await resp.read()
                results.append((resp.status, resp.headers.get("x-tiergate-model", "")))
                if resp.status != 200:
                    failures.append(f"{resp.status}: {body[:200]!r}")

    async def served_since(n: int) -> bool:
        return len(results) >= n

    try:
        async with aiohttp.ClientSession() as http:
            assert (await health(http, served.url))["database"]["state"] == "connected"
            clients += [asyncio.create_task(traffic(http)) for _ in range(4)]
            await poll(lambda: served_since(20), what="traffic before the outage")

            await forwarder.close()  # Postgres goes away: every connection cut, nothing listening
            await poll(lambda: _state_is(http, served.url, "unreachable"), what="the store to notice the outage")
            during = len(results)
            await poll(lambda: served_since(during + 50), what="traffic during the outage")
            table = await health(http, served.url)
            assert table["source"] == "database" and table["database"]["error"]  # the last good table
            # an operator changes the route while this sidecar cannot see the database
            await schema.conn.execute("UPDATE llm_routes SET model = 'backup/model-b', fallbacks = '{}' "
                                      "WHERE use_case = 'general_purpose' AND tier = 'standard'")
            changed = len(results)
            await poll(lambda: served_since(changed + 20), what="more traffic during the outage")
            assert all(model == "primary/model-a" for _, model in results[during:])

            await forwarder.open()  # Postgres is back on the same address
            await poll(lambda: _state_is(http, served.url, "connected"), what="the store to reconnect")
            await poll(lambda: _last_answer_is(results, "backup/model-b"), what="the change made during the outage")
            await poll(lambda: _listening(http, served.url), what="LISTEN again")
            back = len(results)
            await poll(lambda: served_since(back + 20), what="traffic after the return")
            stop.set()
            await asyncio.gather(*clients)
    finally:
        stop.set()
        for client in clients:
            client.cancel()
        await served.runner.cleanup()
    print(f"\n{len(results)} requests across a database outage and return: {len(failures)} failed")
    assert failures == []
    assert len(results) > 110


async def test_start_with_the_database_unreachable_then_pick_it_up(
        schema: Schema, upstream: MockUpstream, backup: MockUpstream, forwarder: Forwarder, tmp_path: Path):
    doc = two_provider_doc(upstream, backup)
    await forwarder.close()  # nothing listens on the forwarder's port: the database is unreachable
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    await init_db(make_config(database_url=schema.url), path)
    await schema.conn.execute("UPDATE llm_routes SET model = 'backup/model-b', fallbacks = '{}' "
                              "WHERE use_case = 'general_purpose' AND tier = 'standard'")
    config = make_config(database_url=schema.url_via(forwarder.port), refresh_interval=0.5, db_timeout=1.0)
    served = await serve_router(Router(config, table=table_from_dict(doc, source=f"file:{path}"), dynamic=True))
    try:
        async with aiohttp.ClientSession() as http:
            table = await health(http, served.url)
            assert table["source"] == "file (database unreachable)"
            assert table["database"]["state"] == "unreachable"
            assert "127.0.0.1" in table["database"]["error"]
            async with http.get(served.url + "/ready") as resp:
                assert resp.status == 200  # serving from the file
            assert await answered_by(http, served.url) == "primary/model-a"

            await forwarder.open()
            await poll(lambda: _answered_by_is(http, served.url, "backup/model-b"),
                       what="the database's table to be picked up")
            table = await health(http, served.url)
            assert table["source"] == "database" and table["database"]["state"] == "connected"
    finally:
        await served.runner.cleanup()


async def _answered_by_is(http: aiohttp.ClientSession, url: str, model: str) -> bool:
    return await answered_by(http, url) == model


async def _state_is(http: aiohttp.ClientSession, url: str, state: str) -> bool:
    return (await health(http, url))["database"]["state"] == state


async def _listening(http: aiohttp.ClientSession, url: str) -> bool:
    return bool((await health(http, url))["database"]["listening"])


async def _last_answer_is(results: list[tuple[int, str]], model: str) -> bool:
    return bool(results) and results[-1][1] == model


async def test_tiergate_serve_takes_its_table_from_database_url(
        schema: Schema, upstream: MockUpstream, backup: MockUpstream, tmp_path: Path):
    import openai

    from .test_cli import ENV, free_port, wait_healthy

    doc = two_provider_doc(upstream, backup)
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    await init_db(make_config(database_url=schema.url), path)
    await schema.conn.execute("UPDATE llm_routes SET model = 'backup/model-b', fallbacks = '{}' "
                              "WHERE use_case = 'general_purpose' AND tier = 'standard'")
    port = free_port()
    env = {**{k: v for k, v in ENV.items() if k != "DATABASE_URL"}, "DATABASE_URL": schema.url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", str(port), env=env,
        cwd=str(tmp_path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="general_purpose", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-tiergate-model"] == "backup/model-b"
        async with aiohttp.ClientSession() as http:
            table = await health(http, url)
            assert table["source"] == "database" and table["database"]["state"] == "connected"
            assert schema.url not in orjson.dumps(table).decode()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
