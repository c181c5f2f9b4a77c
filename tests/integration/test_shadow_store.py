"""A route's shadow in Postgres: `llm_routes.shadow` (jsonb, migration 004), seeded from the file, added to
a database made before it, and read back into `Route.shadow`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from proxy.table.store import init_db, read_snapshot
from proxy.types import ModelRef, Shadow

from ..conftest import make_config, table_doc
from ..pg import Schema, fresh_schema
from ..upstream import MockUpstream


@pytest.fixture
async def schema() -> AsyncIterator[Schema]:
    async with fresh_schema() as s:
        yield s


def _doc() -> dict:
    upstream, backup = MockUpstream("primary"), MockUpstream("backup")
    upstream.port = backup.port = 9  # never called
    return table_doc(upstream, backup)


def _route(table, name: str = "general_purpose:standard"):
    return next(r for r in table.routes.values() if r.name == name)


async def test_a_shadow_is_seeded_from_the_file_and_read_back(schema: Schema, tmp_path: Path):
    doc = _doc()
    doc["routes"][0]["shadow"] = {"model": "backup/candidate", "share": 0.25, "max_concurrency": 3}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    config = make_config(database_url=schema.url)
    await init_db(config, path)
    table = (await read_snapshot(schema.conn, config)).table
    assert table.problems == ()
    assert _route(table).shadow == Shadow(ModelRef("backup", "candidate"), 0.25, 3)
    assert _route(table, "code_generation:premium").shadow is None


async def test_a_database_made_before_the_column_gets_it_and_loads_meanwhile(schema: Schema, tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(_doc()), encoding="utf-8")
    config = make_config(database_url=schema.url)
    await init_db(config, path)
    # as a database initialised by the previous release: no column, no migration 004 recorded
    await schema.conn.execute("ALTER TABLE llm_routes DROP COLUMN shadow")
    await schema.conn.execute("DELETE FROM schema_migrations WHERE version = 4")
    await schema.conn.reload_schema_state()  # the test's own connection read the table before the change
    table = (await read_snapshot(schema.conn, config)).table
    assert table.problems == () and _route(table).shadow is None
    report = await init_db(config, path)
    assert report.applied == [4] and report.seeded == {}
    await schema.conn.reload_schema_state()
    await schema.conn.execute("""UPDATE llm_routes SET shadow = '{"model": "backup/candidate", "share": 1}'
                                 WHERE use_case = 'general_purpose' AND tier = 'standard'""")
    table = (await read_snapshot(schema.conn, config)).table
    assert _route(table).shadow == Shadow(ModelRef("backup", "candidate"), 1.0, 4)
    # a bad value is one bad row, named, not a table that fails to load
    await schema.conn.execute("""UPDATE llm_routes SET shadow = '{"model": "backup/candidate", "share": 3}'
                                 WHERE use_case = 'general_purpose' AND tier = 'standard'""")
    table = (await read_snapshot(schema.conn, config)).table
    assert any("llm_routes (general_purpose, standard).shadow.share" in p for p in table.problems)
