"""The failure policy's route settings in Postgres as in the file: `retry_same`, a fallback entry's
`continuation` and `stream_recovery: off`; migration 008 adds their columns to a database made before it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from proxy.table.routing import table_from_dict
from proxy.table.store import init_db, load_migrations, migrate, read_snapshot
from proxy.types import ModelRef

from ..conftest import make_config, table_doc
from ..pg import Schema, fresh_schema
from ..upstream import MockUpstream


@pytest.fixture
async def schema() -> AsyncIterator[Schema]:
    async with fresh_schema() as s:
        yield s


def policy_doc() -> dict[str, Any]:
    primary, backup = MockUpstream("primary"), MockUpstream("backup")
    primary.port = backup.port = 9  # never called
    doc = table_doc(primary, backup)
    doc["routes"][0].update(retry_same=2, fallbacks=[{"model": "backup/model-b", "continuation": "prefix"}])
    doc["routes"][1].update(stream_recovery="off")
    return doc


def general(table: Any) -> Any:
    return next(r for r in table.routes.values() if r.name == "general_purpose:standard")


async def test_retry_same_and_a_fallbacks_continuation_load_from_the_database_as_from_the_file(
        schema: Schema, tmp_path: Path):
    doc = policy_doc()
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    config = make_config(database_url=schema.url)
    await init_db(config, path)
    db_table = (await read_snapshot(schema.conn, config)).table
    file_route, db_route = general(table_from_dict(doc, source="file")), general(db_table)
    assert db_table.problems == ()
    assert db_route.retry_same == file_route.retry_same == 2
    assert db_route.continuations == file_route.continuations == ((ModelRef("backup", "model-b"), "prefix"),)
    assert db_route.fallbacks == (ModelRef("backup", "model-b"),) and db_route.stream_recovery == "continue"
    other = next(r for r in db_table.routes.values() if r.name == "code_generation:premium")
    assert other.stream_recovery == "off" and other.retry_same is None and other.continuations == ()


async def test_migration_008_adds_its_columns_to_an_existing_database(schema: Schema, tmp_path: Path):
    before = [m for m in load_migrations() if m.version < 8]
    await migrate(schema.conn, 5, before)
    await schema.conn.execute(
        "INSERT INTO llm_providers (name, base_url, api_key) VALUES ('primary', 'http://127.0.0.1:9/v1', 'sk-p'),"
        " ('backup', 'http://127.0.0.1:9/v1', 'sk-b')")
    await schema.conn.execute("INSERT INTO llm_routes (use_case, tier, model, fallbacks) VALUES "
                              "('general_purpose', 'standard', 'primary/model-a', '{backup/model-b}')")
    config = make_config(database_url=schema.url)
    assert general((await read_snapshot(schema.conn, config)).table).retry_same is None  # no column yet
    report = await init_db(config, None)
    assert 8 in report.applied
    await schema.conn.execute("UPDATE llm_routes SET retry_same = 1, fallback_continuations = "
                              "'{\"backup/model-b\": \"none\"}'::jsonb")
    conn = await asyncpg.connect(schema.url)  # a statement cached before the migration would be stale
    try:
        route = general((await read_snapshot(conn, config)).table)
    finally:
        await conn.close()
    assert route.retry_same == 1 and route.continuations == ((ModelRef("backup", "model-b"), "none"),)


def test_a_fallback_entry_is_checked_by_its_keys(upstream, backup):
    doc = table_doc(upstream, backup)
    doc["routes"][0]["fallbacks"] = [{"model": "backup/model-b", "continuation": "magic"}]
    with pytest.raises(Exception, match=r"fallbacks\[0\]\.continuation: 'magic' is not one of"):
        table_from_dict(doc, source="t")
    doc["routes"][0]["fallbacks"] = [{"model": "backup/model-b", "weight": 2}]
    with pytest.raises(Exception, match=r"fallbacks\[0\]\.weight: unknown key"):
        table_from_dict(doc, source="t")
    doc["routes"][0]["fallbacks"] = [{"model": "nowhere/model-b"}]
    with pytest.raises(Exception, match=r"fallbacks\[0\]\.model: 'nowhere/model-b' names provider"):
        table_from_dict(doc, source="t")
