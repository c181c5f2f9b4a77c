"""Limits in Postgres (`llm_limits`): seeded by `db init`, loaded with the table, changed by plain SQL
and enforced by a running tiergate within a second (NOTIFY), a bad row skipped and listed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from proxy.engine.router import Router
from proxy.table.routing import table_from_dict
from proxy.table.store import init_db, read_snapshot

from ..conftest import make_config, table_doc
from ..pg import Schema, fresh_schema, poll, serve_router

CHAT = orjson.dumps({"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def schema() -> AsyncIterator[Schema]:
    async with fresh_schema() as s:
        yield s


async def test_limits_live_in_postgres_and_reload_on_notify(schema: Schema, upstream, tmp_path: Path):
    doc = table_doc(upstream)
    doc["limits"] = [{"name": "code-premium", "route": "code_generation:premium", "usd_per_day": 5,
                      "on_budget_exceeded": "economy", "key": "team-a"}]
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    report = await init_db(make_config(database_url=schema.url), path)
    assert 2 in report.applied and report.seeded["limits"] == 1
    row = await schema.conn.fetchrow("SELECT * FROM llm_limits")
    assert (row["name"], row["key_name"], row["route"], row["usd_per_day"], row["on_budget_exceeded"]) == \
        ("code-premium", "team-a", "code_generation:premium", 5.0, "economy")
    table = (await read_snapshot(schema.conn, make_config(database_url=schema.url))).table
    (spec,) = table.limits.specs
    assert spec.key == "team-a" and spec.usd_per_day == 5 and spec.on_budget_exceeded.value == "economy"

    config = make_config(database_url=schema.url, config_path=str(path), refresh_interval=300,
                         enable_caching=False)
    served = await serve_router(Router(config, table=table_from_dict(doc, source=f"file:{path}"), dynamic=True))
    try:
        async with aiohttp.ClientSession() as http:
            async def status() -> int:
                async with http.post(served.url + "/v1/chat/completions", data=CHAT) as resp:
                    return resp.status

            assert await status() == 200
            # plain SQL: a limit of 0 requests a minute for everyone, and a row that cannot load
            await schema.conn.execute("INSERT INTO llm_limits (name, requests_per_minute) VALUES ('stop', 0), "
                                      "('broken', -5)")
            await poll(lambda: _is(status, 429), what="the new limit to be enforced")
            problems = (await served.router.get_health_status())["routing_table"]["problems"]
            assert any(p.startswith("llm_limits (broken).requests_per_minute") for p in problems), problems
            await schema.conn.execute("UPDATE llm_limits SET enabled = false WHERE name = 'stop'")
            await poll(lambda: _is(status, 200), what="the disabled limit to be lifted")
    finally:
        await served.runner.cleanup()


async def _is(status, expected: int) -> bool:
    return await status() == expected
