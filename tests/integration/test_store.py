"""The routing table in Postgres: migrations, db init, loading rows, bad rows, discovery, the CLI.

Each test works in a schema of its own (tests/pg.py) on the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.engine.factory import get_llm_router
from proxy.engine.router import Router
from proxy.settings import DEFAULT_CONFIG_PATH
from proxy.table.routing import load_table, table_from_dict
from proxy.table.store import CHANNEL, StoreError, init_db, load_migrations, read_snapshot

from ..conftest import make_config, table_doc
from ..pg import (
    Forwarder,
    Schema,
    connect_or_skip,
    database_url,
    fresh_schema,
    poll,
    serve_router,
    with_search_path,
)
from ..upstream import MockUpstream


@pytest.fixture
async def schema() -> AsyncIterator[Schema]:
    async with fresh_schema() as s:
        yield s


def write_table(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


async def rows_with_versions(conn: Any) -> list[tuple[Any, ...]]:
    """Every row of tiergate's tables with its xmin: any write, even a no-op UPDATE, changes it."""
    out = []
    for table in ("schema_migrations", "llm_providers", "llm_models", "llm_routes", "llm_aliases"):
        out += [(table, *r) for r in await conn.fetch(f"SELECT xmin::text, * FROM {table} ORDER BY 2, 3")]
    return out


def test_migrations_are_numbered_files_in_order():
    migrations = load_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions)) and versions[0] == 1
    assert "CREATE TABLE IF NOT EXISTS llm_routes" in migrations[0].sql


async def test_db_init_twice_is_a_noop_the_second_time(schema: Schema):
    config = make_config(database_url=schema.url)
    first = await init_db(config, DEFAULT_CONFIG_PATH)
    assert first.applied == [m.version for m in load_migrations()]
    assert first.seeded == {"providers": 2, "routes": 24, "aliases": 5, "models": 12}

    before = await rows_with_versions(schema.conn)
    heard: list[str] = []
    sentinel = asyncio.Event()

    def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
        heard.append(payload)
        if payload == "sentinel":
            sentinel.set()

    await schema.conn.add_listener(CHANNEL, on_notify)
    second = await init_db(config, DEFAULT_CONFIG_PATH)
    await schema.conn.execute(f"SELECT pg_notify('{CHANNEL}', 'sentinel')")
    await asyncio.wait_for(sentinel.wait(), 5)

    assert not second.changed and second.applied == [] and second.seeded == {}
    assert await rows_with_versions(schema.conn) == before  # not one row written
    assert heard == ["sentinel"]  # and no change notified

    # the rows load back into the same table the file describes
    file_table = load_table(DEFAULT_CONFIG_PATH)
    db_table = (await read_snapshot(schema.conn, config)).table
    assert db_table.source == "database" and db_table.problems == ()
    def by_route(t: Any) -> list[dict[str, Any]]:
        return sorted(t.describe(), key=lambda r: r["route"])

    assert by_route(db_table) == by_route(file_table)
    assert db_table.aliases == file_table.aliases and db_table.pricing == file_table.pricing
    def specs(t: Any) -> dict[str, Any]:  # jsonb keeps header names in its own order
        return {n: dataclasses.replace(p, headers=tuple(sorted(p.headers))) for n, p in t.providers.items()}

    assert specs(db_table) == specs(file_table)
    assert db_table.embeddings == file_table.embeddings and db_table.embeddings  # a table-level setting


async def test_route_kinds_deadlines_and_table_settings_live_in_the_database_too(schema: Schema, tmp_path: Path):
    upstream = MockUpstream("primary")
    upstream.port = 9  # never called
    doc = table_doc(upstream)
    doc["providers"]["primary"].update(first_byte_timeout=42.0, pass_client_key=True, stream_usage=False,
                                       continuation="prefix")
    doc["routes"][0].update(timeout=120.0, first_byte_timeout=90.0, stream_recovery="continue",
                            embeddings_model=["primary/text-embedding-3-small"])
    doc["model_rules"] = {"my-reasoner*": {"drop": ["temperature"], "rename": {"max_tokens": "max_completion_tokens"}}}
    doc["embeddings_model"] = "primary/text-embed"
    config = make_config(database_url=schema.url)
    await init_db(config, write_table(tmp_path, doc))
    file_table = table_from_dict(doc, source="file")
    db_table = (await read_snapshot(schema.conn, config)).table
    assert db_table.problems == ()
    route = next(r for r in db_table.routes.values() if r.name == "general_purpose:standard")
    assert route.timeout == 120.0 and route.first_byte_timeout == 90.0 and route.stream_recovery == "continue"
    assert [str(m) for m in route.embeddings] == ["primary/text-embedding-3-small"]
    spec = db_table.providers["primary"]
    assert spec.first_byte_timeout == 42.0 and spec.pass_client_key is True
    assert spec.stream_usage is False and spec.continuation == "prefix"
    assert db_table.model_rules == file_table.model_rules and db_table.embeddings == file_table.embeddings
    # `routes set` writes the new columns
    from proxy.table.store import set_route
    await set_route(schema.conn, "debugging", "economy", {"model": "primary/m", "timeout": 5.0,
                                                        "embeddings_model": ["primary/e"]}, 5)
    table = (await read_snapshot(schema.conn, config)).table
    decision = table.resolve("debugging", "economy", None, "embeddings")
    assert [str(m) for m in decision.candidates] == ["primary/e"]


async def test_init_on_a_missing_schema_says_so():
    await (await connect_or_skip(database_url())).close()
    config = make_config(database_url=with_search_path(database_url(), "tg_no_such_schema"))
    with pytest.raises(StoreError, match="no schema"):
        await init_db(config, DEFAULT_CONFIG_PATH)


async def test_bad_rows_are_rejected_one_by_one(schema: Schema, upstream: MockUpstream, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture):
    doc = table_doc(upstream)
    config = make_config(database_url=schema.url, refresh_interval=60)
    await init_db(config, write_table(tmp_path, doc))
    await schema.conn.execute("""
        INSERT INTO llm_routes (use_case, tier, model) VALUES
            ('debugging', 'premium', 'nowhere/model-x'),      -- unknown provider
            ('debugging', 'ultra', 'primary/model-a'),        -- bad tier
            ('documentation', 'economy', '');                 -- empty model
        INSERT INTO llm_routes (use_case, tier, model, fallbacks) VALUES
            ('chat_conversation', 'economy', 'primary/model-c', '{}');  -- good
        INSERT INTO llm_providers (name, base_url) VALUES ('broken', 'ftp://example');""")

    caplog.set_level(logging.WARNING, logger="tiergate.store")
    router = Router(config, table=table_from_dict(doc, source="file:test.yaml"), dynamic=True)
    await router.initialize()
    try:
        health = await router.get_health_status()
        table = health["routing_table"]
        assert table["source"] == "database" and table["database"]["state"] == "connected"
        problems = table["problems"]
        assert len(problems) == 4, problems
        assert any(p.startswith("llm_routes (debugging, premium).model:") and "'nowhere'" in p for p in problems)
        assert any(p.startswith("llm_routes (debugging, ultra).tier:") for p in problems)
        assert any(p.startswith("llm_routes (documentation, economy).model:") for p in problems)
        assert any(p.startswith("llm_providers broken:") and "base_url" in p for p in problems)
        assert health["status"] == "degraded"
        # the rest of the table loaded
        assert table["routes"] == 3
        assert str(router.table.resolve("chat_conversation", "economy", None).route.model) == "primary/model-c"
        assert str(router.table.resolve("general_purpose", "standard", None).route.model) == "primary/model-a"
        rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert len(rejected) == 4
    finally:
        await router.close()


async def test_a_static_router_never_touches_the_database(schema: Schema):
    forwarder = await Forwarder.to(database_url()).open()
    try:
        config = make_config(database_url=schema.url_via(forwarder.port))
        router = await get_llm_router(dynamic=False, config=config)
        try:
            assert router.table.source.startswith("file:")
            assert "database" not in (await router.get_health_status())["routing_table"]
        finally:
            await router.close()
        assert forwarder.accepted == 0
        # a dynamic router with the same settings does connect (so the forwarder does see it)
        dynamic = Router(config, dynamic=True)
        await dynamic.initialize()
        await dynamic.close()
        assert forwarder.accepted > 0
    finally:
        await forwarder.close()


async def test_discovery_upserts_prices_marks_vanished_and_lists_models(
        schema: Schema, upstream: MockUpstream, tmp_path: Path):
    gone = await MockUpstream("gone").start()
    doc = table_doc(upstream)
    doc["providers"]["gone"] = {"base_url": gone.url, "api_key": "sk-gone"}
    await gone.stop()  # a provider that cannot be asked keeps its rows
    upstream.models = ("model-a", "extra-1", "openai/gpt-4o")
    upstream.model_pricing = {"openai/gpt-4o": {"prompt": "0.0000025", "completion": "0.00001"}}
    config = make_config(database_url=schema.url, refresh_interval=60)
    await init_db(config, write_table(tmp_path, doc))
    await schema.conn.execute("INSERT INTO llm_models (provider, model) VALUES ('gone', 'old-model')")

    served = await serve_router(Router(config, table=table_from_dict(doc, source="file:t"), dynamic=True))
    try:
        router = served.router
        found = await router.discover_available_models()
        assert sorted(m.model for m in found.models["primary"]) == ["extra-1", "model-a", "openai/gpt-4o"]
        assert "gone" in found.errors and "gone" not in found.models
        rows = {r["model"]: r for r in await schema.conn.fetch(
            "SELECT * FROM llm_models WHERE provider = 'primary'")}
        assert rows["openai/gpt-4o"]["input_price_per_million"] == 2.5
        assert rows["openai/gpt-4o"]["output_price_per_million"] == 10.0
        assert rows["extra-1"]["available"] and rows["extra-1"]["discovered_at"] is not None
        assert await schema.conn.fetchval(
            "SELECT available FROM llm_models WHERE provider = 'gone' AND model = 'old-model'")

        async with aiohttp.ClientSession() as http:
            async def listed() -> set[str]:
                async with http.get(served.url + "/v1/models") as resp:
                    return {m["id"] for m in (await resp.json())["data"]}

            await poll(lambda: _has(listed, "primary/extra-1"), what="GET /v1/models to list primary/extra-1")
            # the new prices reach the running table through NOTIFY
            await poll(lambda: _ready(lambda: "primary/openai/gpt-4o" in router.table.pricing),
                       what="discovered prices in the table")
            assert router.table.pricing["primary/openai/gpt-4o"].output == 10.0

            upstream.models = ("model-a",)
            again = await router.discover_available_models()
            assert [m.model for m in again.models["primary"]] == ["model-a"]
            vanished = await schema.conn.fetch(
                "SELECT model FROM llm_models WHERE provider = 'primary' AND NOT available ORDER BY model")
            assert [r["model"] for r in vanished] == ["extra-1", "openai/gpt-4o"]
            await poll(lambda: _has_not(listed, "primary/extra-1"), what="primary/extra-1 to leave GET /v1/models")
    finally:
        await served.runner.cleanup()


async def _has(listed: Any, model: str) -> bool:
    return model in await listed()


async def _has_not(listed: Any, model: str) -> bool:
    return model not in await listed()


async def _ready(check: Any) -> bool:
    return bool(check())


# --- the CLI, as a user runs it ------------------------------------------------------------------

BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("TIERGATE_", "OPENROUTER", "PORTKEY", "DATABASE_URL"))}
ROOT = str(Path(__file__).resolve().parents[2])


async def cli(*args: str, database_url: str | None, cwd: Path) -> tuple[int, str, str]:
    """`python -m proxy ARGS` from `cwd` (no .env there), importing this checkout."""
    env = dict(BASE_ENV)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", *args, env=env, cwd=cwd,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_db_init_routes_and_discover(schema: Schema, upstream: MockUpstream, tmp_path: Path):
    upstream.models = ("model-a", "model-z")
    path = write_table(tmp_path, table_doc(upstream))
    url = schema.url.replace("postgresql://", "postgresql+asyncpg://", 1)

    code, out, err = await cli("db", "init", "--from", str(path), database_url=url, cwd=tmp_path)
    assert code == 0, err
    assert "applied migration(s) 1" in out and "2 routes" in out
    # (commands that do not depend on each other run side by side to keep the test short)
    (code, out, err), (bad_code, _, bad_err), (scope_code, _, scope_err) = await asyncio.gather(
        cli("routes", "set", "debugging", "economy", "--model", "primary/model-z", "--fallbacks", "primary/model-a",
            "--max-tokens", "64", "--temperature", "0.2", "--strategy", "weighted", "--weights", "3", "1",
            "--cache-scope", "shared", database_url=url, cwd=tmp_path),
        cli("routes", "set", "debugging", "economy", "--model", "nowhere/x", database_url=url, cwd=tmp_path),
        cli("routes", "set", "debugging", "economy", "--model", "primary/model-z", "--cache-scope", "everyone",
            database_url=url, cwd=tmp_path))
    assert code == 0, err
    assert bad_code == 2 and "nowhere" in bad_err and "not defined" in bad_err
    assert scope_code == 2 and "--cache-scope" in scope_err  # argparse names the choices
    row = await schema.conn.fetchrow("SELECT * FROM llm_routes WHERE use_case = 'debugging' AND tier = 'economy'")
    assert row["model"] == "primary/model-z" and row["fallbacks"] == ["primary/model-a"]
    assert row["max_tokens"] == 64 and abs(row["temperature"] - 0.2) < 1e-6
    assert row["strategy"] == "weighted" and row["weights"] == [3.0, 1.0]
    assert row["cache_scope"] == "shared"  # and the table read from the rows says so
    route = (await read_snapshot(schema.conn, make_config(database_url=schema.url))).table.routes
    assert next(r for r in route.values() if r.name == "debugging:economy").cache_scope == "shared"

    (code, out, err), (dcode, dout, derr) = await asyncio.gather(
        cli("routes", "list", database_url=url, cwd=tmp_path), cli("discover", database_url=url, cwd=tmp_path))
    assert code == 0, err
    assert "debugging:economy" in out and "primary/model-z" in out and "code_generation:premium" in out
    assert dcode == 0, derr
    assert "primary/model-z" in dout
    assert await schema.conn.fetchval(
        "SELECT available FROM llm_models WHERE provider = 'primary' AND model = 'model-z'")

    code, out, err = await cli("routes", "delete", "debugging", "economy", database_url=url, cwd=tmp_path)
    assert code == 0, err
    code, out, err = await cli("routes", "delete", "debugging", "economy", database_url=url, cwd=tmp_path)
    assert code == 1 and "no route debugging:economy" in err



async def test_cli_says_clearly_when_the_database_is_unset_or_unreachable(tmp_path: Path):
    code, out, err = await cli("routes", "list", database_url=None, cwd=tmp_path)
    assert code == 1 and "DATABASE_URL is not set" in err

    closed = Forwarder("127.0.0.1", 9)
    await closed.open()
    port = closed.port
    await closed.close()  # nothing listens on `port` now
    code, out, err = await cli("db", "init", database_url=f"postgresql://admin:hunter2-secret@127.0.0.1:{port}/x",
                               cwd=tmp_path)
    assert code == 1 and f"cannot reach the database at 127.0.0.1:{port}/x" in err
    assert "hunter2" not in err + out and "Traceback" not in err


async def test_cli_against_a_database_without_tables_says_run_db_init(schema: Schema, tmp_path: Path):
    commands = [("routes", "list"), ("routes", "delete", "debugging", "premium"),
                ("routes", "set", "debugging", "premium", "--model", "openrouter/x"), ("discover",)]
    for code, _out, err in await asyncio.gather(*(cli(*args, database_url=schema.url, cwd=tmp_path)
                                                 for args in commands)):
        assert code == 1 and err == "tiergate: the database has no tiergate tables: run `tiergate db init`\n", err
