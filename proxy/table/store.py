"""The routing table in Postgres (asyncpg): migrations, seeding, loading rows, live refresh.

A `RouteStore` loads `llm_providers`, `llm_routes`, `llm_aliases` and `llm_models` into a new
`RoutingTable` snapshot and hands it to the router, which swaps it in whole. Triggers on the
tables `NOTIFY tiergate_config`; the store LISTENs on its own connection (reconnecting with
backoff) and also refreshes every `refresh_interval`. When Postgres goes away the last good
table keeps serving. Every query has the `db_timeout` deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from ..settings import MIGRATIONS_DIR, RouterConfig
from ..types import ConfigError, ModelRef, TiergateError, cancel_and_wait
from ..urls import redact_credentials
from .routing import ANTHROPIC_KEY_HEADER, RoutingTable, table_from_dict

log = logging.getLogger("tiergate.store")

CHANNEL = "tiergate_config"
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 5.0
NOT_INITIALIZED = "the database has no tiergate tables: run `tiergate db init`"
UndefinedTableError = asyncpg.UndefinedTableError
# what a lost, refused, slow or failing database raises
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

_MIGRATION_FILE = re.compile(r"^(\d+)_([A-Za-z0-9_-]+)\.sql$")


class StoreError(TiergateError):
    """The database is not configured, not reachable or not initialized."""

    status = 503
    error_type = "service_unavailable"


# --- connecting ------------------------------------------------------------------------------


def require_dsn(config: RouterConfig) -> str:
    dsn = config.database_dsn
    if not dsn:
        raise StoreError("DATABASE_URL is not set: point it at PostgreSQL, e.g. "
                         "postgresql://user@127.0.0.1:5432/tiergate", code="database_not_configured")
    return dsn


def describe_dsn(dsn: str) -> str:
    """host:port/database, for messages: never the user's password."""
    try:
        parts = urlsplit(dsn)
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"
    except ValueError:
        where = "(unparsable DATABASE_URL)"
    return where


def describe_error(exc: BaseException, dsn: str | None = None) -> str:
    """A short reason for a database failure, with any password in it masked."""
    if isinstance(exc, TimeoutError):
        text = "timed out"
    else:
        text = str(exc) or type(exc).__name__
    password = _password(dsn)
    if password:
        text = text.replace(password, "***")
    text = redact_credentials(text)
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, TimeoutError) else text


def _password(dsn: str | None) -> str | None:
    if not dsn:
        return None
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None


async def connect(config: RouterConfig) -> asyncpg.Connection:
    """One connection (CLI and LISTEN). StoreError names host and database, never the password."""
    dsn = require_dsn(config)
    try:
        return await asyncpg.connect(dsn, timeout=config.db_timeout, command_timeout=config.db_timeout)
    except DB_ERRORS as exc:
        raise StoreError(f"cannot reach the database at {describe_dsn(dsn)}: {describe_error(exc, dsn)}",
                         code="database_unreachable") from None


@contextlib.asynccontextmanager
async def connected(config: RouterConfig) -> AsyncIterator[asyncpg.Connection]:
    """`connect`, closed when the block ends (a CLI command's one connection)."""
    conn = await connect(config)
    try:
        yield conn
    finally:
        await conn.close(timeout=config.db_timeout)


async def create_pool(config: RouterConfig) -> asyncpg.Pool:
    """A lazily connecting pool of up to `db_pool_size` connections (it does no I/O until used)."""
    return await asyncpg.create_pool(require_dsn(config), min_size=0, max_size=max(1, config.db_pool_size),
                               timeout=config.db_timeout, command_timeout=config.db_timeout)


# --- migrations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The `NNN_name.sql` files, in version order."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _MIGRATION_FILE.match(path.name)
        if m is None:
            raise ConfigError(f"{path}: a migration file is named NNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise ConfigError(f"{path}: migration version {version} appears twice")
        found[version] = Migration(version, m.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(conn: asyncpg.Connection, timeout: float,
                  migrations: Iterable[Migration] | None = None) -> list[int]:
    """Apply the migrations not yet in `schema_migrations`; returns the versions applied.

    The caller holds a transaction; an advisory lock keyed by schema serialises concurrent inits.
    """
    schema = await conn.fetchval("SELECT current_schema()", timeout=timeout)
    if schema is None:
        raise StoreError("the database has no schema to create tables in: create the schema named in "
                         "search_path first", code="database_no_schema")
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tiergate:migrate:' || current_schema()))",
                       timeout=timeout)
    await conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                              version integer PRIMARY KEY,
                              name text NOT NULL,
                              applied_at timestamptz NOT NULL DEFAULT now())""", timeout=timeout)
    applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations", timeout=timeout)}
    done = []
    for migration in load_migrations() if migrations is None else migrations:
        if migration.version in applied:
            continue
        await conn.execute(migration.sql, timeout=timeout)
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                           migration.version, migration.name, timeout=timeout)
        done.append(migration.version)
    return done


# --- seeding from the YAML file ------------------------------------------------------------------


@dataclass
class InitReport:
    """What `tiergate db init` did: migrations applied and rows seeded (empty on a second run)."""

    applied: list[int] = field(default_factory=list)
    seeded: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.seeded)


async def init_db(config: RouterConfig, source: str | Path | None = None) -> InitReport:
    """Create or upgrade the schema; seed it from the table file when it has no provider and no route."""
    import yaml

    from .routing import load_table

    path = Path(source) if source else config.table_path
    load_table(path)  # the file must be valid before anything is written
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    conn = await connect(config)
    try:
        async with conn.transaction():
            report = InitReport(applied=await migrate(conn, config.db_timeout))
            providers = await conn.fetchval("SELECT count(*) FROM llm_providers", timeout=config.db_timeout)
            routes = await conn.fetchval("SELECT count(*) FROM llm_routes", timeout=config.db_timeout)
            if providers == 0 and routes == 0:
                report.seeded = await seed(conn, doc, config.db_timeout)
                if doc.get("limits"):
                    report.seeded["limits"] = await seed_limits(conn, doc, config.db_timeout)
        return report
    except DB_ERRORS as exc:
        raise StoreError(f"db init failed: {describe_error(exc, config.database_dsn)}") from None
    finally:
        await conn.close(timeout=config.db_timeout)


async def seed(conn: asyncpg.Connection, doc: Mapping[str, Any], timeout: float) -> dict[str, int]:
    """Insert a table document's providers, routes, aliases and prices as rows."""
    providers = doc.get("providers") or {}
    for name, p in providers.items():
        await conn.execute(
            """INSERT INTO llm_providers (name, kind, base_url, api_key_env, api_key_header, api_key, headers,
                                          failure_threshold, recovery_timeout, max_concurrency, models,
                                          first_byte_timeout, pass_client_key, apis, stream_usage, continuation)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14, $15, $16)""",
            str(name), str(p.get("kind") or "openai"), str(p.get("base_url") or ""), p.get("api_key_env"),
            str(p.get("api_key_header") or _default_key_header(p.get("kind"))), p.get("api_key"),
            orjson.dumps({str(k): str(v) for k, v in (p.get("headers") or {}).items()}).decode(),
            p.get("failure_threshold"), p.get("recovery_timeout"), p.get("max_concurrency"),
            [str(m) for m in p.get("models") or ()], p.get("first_byte_timeout"), p.get("pass_client_key") is True,
            [str(a) for a in p["apis"]] if p.get("apis") is not None else None,
            p.get("stream_usage") if isinstance(p.get("stream_usage"), bool) else None, p.get("continuation"),
            timeout=timeout)
    routes = doc.get("routes") or []
    for r in routes:
        await conn.execute(
            """INSERT INTO llm_routes (use_case, tier, model, fallbacks, max_tokens, temperature, system_prompt,
                                       cache, cache_ttl, enabled, timeout, first_byte_timeout, embeddings_model,
                                       completions_model, stream_recovery, shadow)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16::jsonb)""",
            str(r["use_case"]).lower(), str(r["tier"]).lower(), str(r["model"]),
            [_fallback_model(f) for f in r.get("fallbacks") or ()], r.get("max_tokens"), r.get("temperature"),
            r.get("system_prompt"), str(r.get("cache") or "auto"), r.get("cache_ttl"),
            r.get("enabled") is not False, r.get("timeout"), r.get("first_byte_timeout"),
            _models(r.get("embeddings_model")), _models(r.get("completions_model")), r.get("stream_recovery"),
            orjson.dumps(r["shadow"]).decode() if r.get("shadow") is not None else None,
            timeout=timeout)
    for r in routes:  # whose requests its cached answers serve (migration 005), when the route says
        if r.get("cache_scope") is not None:
            await conn.execute("UPDATE llm_routes SET cache_scope = $3 WHERE use_case = $1 AND tier = $2",
                               str(r["use_case"]).lower(), str(r["tier"]).lower(), str(r["cache_scope"]),
                               timeout=timeout)
    for r in routes:  # how the route orders its candidates (migration 007), when it says
        if r.get("strategy") is not None or r.get("weights") is not None:
            await conn.execute("UPDATE llm_routes SET strategy = $3, weights = $4 WHERE use_case = $1 AND tier = $2",
                               str(r["use_case"]).lower(), str(r["tier"]).lower(), r.get("strategy"),
                               [float(w) for w in r["weights"]] if r.get("weights") is not None else None,
                               timeout=timeout)
    for r in routes:  # the failure policy's settings (migration 008), when the route says
        continuations = {_fallback_model(f): f["continuation"] for f in r.get("fallbacks") or ()
                         if isinstance(f, dict) and f.get("continuation") is not None}
        if r.get("retry_same") is not None or continuations:
            await conn.execute("UPDATE llm_routes SET retry_same = $3, fallback_continuations = $4::jsonb "
                               "WHERE use_case = $1 AND tier = $2", str(r["use_case"]).lower(),
                               str(r["tier"]).lower(), r.get("retry_same"),
                               orjson.dumps(continuations).decode() if continuations else None, timeout=timeout)
    for key in TABLE_SETTINGS:
        if doc.get(key) is not None:
            await conn.execute("INSERT INTO llm_table_settings (key, value) VALUES ($1, $2::jsonb)", key,
                               orjson.dumps(doc[key]).decode(), timeout=timeout)
    aliases = doc.get("aliases") or {}
    for alias, ref in aliases.items():
        if isinstance(ref, dict):  # an alias naming a route: its spec as JSON, its model beside it
            await conn.execute("INSERT INTO llm_aliases (alias, model, route) VALUES ($1, $2, $3::jsonb)", str(alias),
                               str(ref.get("model") or ref.get("route") or ""), orjson.dumps(ref).decode(),
                               timeout=timeout)
            continue
        await conn.execute("INSERT INTO llm_aliases (alias, model) VALUES ($1, $2)", str(alias), str(ref),
                           timeout=timeout)
    prices = 0
    for ref, price in (doc.get("pricing") or {}).items():
        provider, _, model = str(ref).partition("/")
        if provider not in providers or not model:
            continue
        await conn.execute(
            """INSERT INTO llm_models (provider, model, input_price_per_million, output_price_per_million)
               VALUES ($1, $2, $3, $4)""", provider, model, price.get("input"), price.get("output"),
            timeout=timeout)
        prices += 1
    return {"providers": len(providers), "routes": len(routes), "aliases": len(aliases), "models": prices}


# --- reading the table -----------------------------------------------------------------------------


async def _table_settings(conn: asyncpg.Connection, timeout: float) -> list[asyncpg.Record]:
    """The table-level settings; none in a database not yet migrated to them (`db init` adds them)."""
    exists = await conn.fetchval("SELECT to_regclass('llm_table_settings') IS NOT NULL", timeout=timeout)
    if not exists:
        return []
    return await conn.fetch("SELECT key, value FROM llm_table_settings ORDER BY key", timeout=timeout)


@dataclass(frozen=True)
class Snapshot:
    """One consistent read of the tables: the table built from it and what else the rows say."""

    table: RoutingTable
    fingerprint: bytes
    available_models: tuple[ModelRef, ...]
    keys: Any = None  # the inbound keys (keystore.KeyRing), when the store was asked to read them


async def read_snapshot(conn: asyncpg.Connection, config: RouterConfig) -> Snapshot:
    """Read every table in one read-only transaction and build a (lenient) RoutingTable from it."""
    timeout = config.db_timeout
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            providers = await conn.fetch("SELECT * FROM llm_providers WHERE enabled ORDER BY name",
                                         timeout=timeout)
            routes = await conn.fetch("SELECT * FROM llm_routes WHERE enabled ORDER BY use_case, tier",
                                      timeout=timeout)
            aliases = await conn.fetch("SELECT * FROM llm_aliases ORDER BY alias", timeout=timeout)
            settings = await _table_settings(conn, timeout)
            models = await conn.fetch(
                """SELECT provider, model, input_price_per_million, output_price_per_million, available,
                          context_window FROM llm_models ORDER BY provider, model""", timeout=timeout)
            limits = await read_limits(conn, timeout)
    except asyncpg.UndefinedTableError:
        raise StoreError(NOT_INITIALIZED, code="database_not_initialized") from None
    doc = rows_to_doc(providers, routes, aliases, models, settings)
    doc["limits"] = limit_rows_to_doc(limits)
    fingerprint = hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).digest()
    labels = [f"llm_routes ({r['use_case']}, {r['tier']})" for r in routes]
    try:
        table = table_from_dict(doc, source="database", strict=False,
                                allow_model_override=config.allow_model_override)
    except ConfigError as exc:
        raise ConfigError(_relabel(exc.message, labels)) from None
    limit_labels = [f"llm_limits ({r['name']})" for r in limits]
    table.problems = tuple(_LIMIT_INDEX.sub(lambda m: limit_labels[int(m.group(1))], _relabel(p, labels))
                           for p in table.problems)
    available = tuple(ModelRef(m["provider"], m["model"]) for m in models if m["available"])
    return Snapshot(table, fingerprint, available)


_COLUMN_KEY_HEADER = "Authorization"  # llm_providers.api_key_header's default


def _default_key_header(kind: Any) -> str:
    """The header a provider's key goes in when the table names none: its kind's."""
    return ANTHROPIC_KEY_HEADER if kind == "anthropic" else _COLUMN_KEY_HEADER


TABLE_SETTINGS = ("embeddings_model", "model_rules", "passthrough_provider", "passthrough_paths", "groups")


def rows_to_doc(providers: Iterable[Mapping[str, Any]], routes: Iterable[Mapping[str, Any]],
                aliases: Iterable[Mapping[str, Any]], models: Iterable[Mapping[str, Any]],
                settings: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Rows as the same document the YAML file holds, for `table_from_dict`."""
    doc_providers: dict[str, Any] = {}
    for p in providers:
        entry: dict[str, Any] = {"kind": p["kind"], "base_url": p["base_url"]}
        if p["kind"] != "anthropic" or p["api_key_header"] != _COLUMN_KEY_HEADER:
            # the column's default is OpenAI's header: on a row of kind anthropic it stands for that kind's
            # own (x-api-key), as a row inserted by hand with no header means (`authorization` in lower case
            # sends the key as a Bearer token all the same)
            entry["api_key_header"] = p["api_key_header"]
        for key in ("api_key_env", "api_key", "failure_threshold", "recovery_timeout", "max_concurrency",
                    "first_byte_timeout", "apis", "stream_usage", "continuation"):
            if p.get(key) is not None:
                entry[key] = list(p[key]) if key == "apis" else p[key]
        if p.get("pass_client_key"):
            entry["pass_client_key"] = True
        headers = orjson.loads(p["headers"]) if p["headers"] else {}
        if headers:
            entry["headers"] = headers
        if p["models"]:
            entry["models"] = list(p["models"])
        doc_providers[p["name"]] = entry
    doc_routes = []
    for r in routes:
        entry = {"use_case": r["use_case"], "tier": r["tier"], "model": r["model"],
                 "fallbacks": list(r["fallbacks"] or ()), "cache": r["cache"]}
        for key in ("max_tokens", "system_prompt", "cache_ttl", "timeout", "first_byte_timeout", "stream_recovery",
                    "retry_same"):
            if r.get(key) is not None:
                entry[key] = r[key]
        for key in ("embeddings_model", "completions_model"):
            if r.get(key):
                entry[key] = list(r[key])
        continuations = r.get("fallback_continuations")  # jsonb (migration 008): {provider/model: how}
        if continuations:
            continuations = orjson.loads(continuations) if isinstance(continuations, str) else continuations
            entry["fallbacks"] = [{"model": f, "continuation": continuations[f]} if f in continuations else f
                                  for f in entry["fallbacks"]]
        if r.get("shadow") is not None:  # jsonb, as the file's mapping (a database before 004 has no column)
            entry["shadow"] = orjson.loads(r["shadow"]) if isinstance(r["shadow"], str) else r["shadow"]
        if r.get("strategy") is not None:  # migration 007; NULL: ordered
            entry["strategy"] = r["strategy"]
        if r.get("weights") is not None:
            entry["weights"] = list(r["weights"])
        if r.get("cache_scope") is not None:  # migration 005; NULL: the inbound key's own
            entry["cache_scope"] = r["cache_scope"]
        if r["temperature"] is not None:  # `real` holds 0.2 as 0.200000003
            entry["temperature"] = round(float(r["temperature"]), 6)
        doc_routes.append(entry)
    pricing = {f"{m['provider']}/{m['model']}": {"input": m["input_price_per_million"],
                                                "output": m["output_price_per_million"]}
               for m in models
               if m["input_price_per_million"] is not None and m["output_price_per_million"] is not None}
    doc = {"providers": doc_providers, "routes": doc_routes,
           "aliases": {a["alias"]: _alias_value(a) for a in aliases}, "pricing": pricing}
    windows = {f"{m['provider']}/{m['model']}": m["context_window"] for m in models if m.get("context_window")}
    if windows:  # what discovery found: a prompt too long for a model is not sent to it
        doc["context_windows"] = windows
    for row in settings:
        if row["key"] in TABLE_SETTINGS:
            doc[row["key"]] = orjson.loads(row["value"]) if isinstance(row["value"], str) else row["value"]
    return doc


def _alias_value(row: Mapping[str, Any]) -> Any:
    """An alias as the file says it: its model, or the route it names (`route` jsonb, migration 007)."""
    route = row.get("route")
    if route is None:
        return row["model"]
    return orjson.loads(route) if isinstance(route, str) else route


# --- limits (llm_limits, from migration 002) ---------------------------------------------------------

_LIMIT_INDEX = re.compile(r"^limits\[(\d+)\]")
LIMIT_COLUMNS = ("name", "key_name", "use_case", "tier", "route", "model", "requests_per_minute",
                 "tokens_per_minute", "usd_per_day", "usd_per_month", "on_budget_exceeded")


async def read_limits(conn: asyncpg.Connection, timeout: float) -> list[asyncpg.Record]:
    """The enabled rows of `llm_limits`; none when the database predates the table."""
    if await conn.fetchval("SELECT to_regclass('llm_limits') IS NULL", timeout=timeout):
        return []
    return await conn.fetch(f"SELECT {', '.join(LIMIT_COLUMNS)} FROM llm_limits WHERE enabled ORDER BY name",
                            timeout=timeout)


def limit_rows_to_doc(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`llm_limits` rows as the file's `limits:` entries (`key_name` is the file's `key`)."""
    out = []
    for row in rows:
        entry = {("key" if column == "key_name" else column): row[column] for column in LIMIT_COLUMNS
                 if row[column] is not None}
        out.append(entry)
    return out


async def seed_limits(conn: asyncpg.Connection, doc: Mapping[str, Any], timeout: float) -> int:
    """Insert a table document's `limits:` as `llm_limits` rows (those already there are kept)."""
    from ..limits.spec import limit_rows, parse_limits

    specs, _ = parse_limits(doc.get("limits"), (doc.get("providers") or {}).keys())
    rows = limit_rows(specs)
    for row in rows:
        values = [row.get("key" if column == "key_name" else column) for column in LIMIT_COLUMNS]
        placeholders = ", ".join(f"${i}" for i in range(1, len(LIMIT_COLUMNS) + 1))
        await conn.execute(f"INSERT INTO llm_limits ({', '.join(LIMIT_COLUMNS)}) VALUES ({placeholders}) "
                           "ON CONFLICT (name) DO NOTHING", *values, timeout=timeout)
    return len(rows)


_ROUTE_INDEX = re.compile(r"routes\[(\d+)\]")
_SECTION = re.compile(r"^(providers|aliases|pricing)\.")
_TABLES = {"providers": "llm_providers ", "aliases": "llm_aliases ", "pricing": "llm_models "}


def _relabel(problem: str, labels: list[str]) -> str:
    """`routes[3].model: ...` -> `llm_routes (debugging, premium).model: ...`: name the row, not a list index."""
    def route(m: re.Match[str]) -> str:
        i = int(m.group(1))
        return labels[i] if i < len(labels) else m.group(0)

    problem = _ROUTE_INDEX.sub(route, problem)
    return _SECTION.sub(lambda m: _TABLES[m.group(1)], problem)


# --- writing rows (CLI, discovery) ---------------------------------------------------------------------


async def provider_names(conn: asyncpg.Connection, timeout: float) -> list[str]:
    return [r["name"] for r in await conn.fetch("SELECT name FROM llm_providers ORDER BY name", timeout=timeout)]


async def list_routes(conn: asyncpg.Connection, timeout: float) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM llm_routes ORDER BY use_case, tier", timeout=timeout)


ROUTE_COLUMNS = ("model", "fallbacks", "max_tokens", "temperature", "system_prompt", "timeout",
                 "first_byte_timeout", "embeddings_model", "strategy", "weights", "cache_scope")


async def table_setting(conn: asyncpg.Connection, key: str, timeout: float) -> Any:
    """One table-level setting of `llm_table_settings` as the file's value; None when it is not set."""
    value = await conn.fetchval("SELECT value FROM llm_table_settings WHERE key = $1", key, timeout=timeout)
    return orjson.loads(value) if isinstance(value, str) else value


def _fallback_model(raw: Any) -> str:
    """A fallback entry's provider/model (the entry may be `{model: ..., continuation: ...}`)."""
    return str(raw.get("model") if isinstance(raw, dict) else raw)


def _models(raw: Any) -> list[str]:
    """A route's models of one kind as the column holds them (one provider/model or a list)."""
    if not raw:
        return []
    return [str(m) for m in (raw if isinstance(raw, (list, tuple)) else [raw])]


async def set_route(conn: asyncpg.Connection, use_case: str, tier: str, values: Mapping[str, Any],
                    timeout: float) -> None:
    """Insert or update one route; columns not in `values` keep their current value. Enables it."""
    columns = [c for c in ROUTE_COLUMNS if c in values]
    names = ["use_case", "tier", *columns]
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    updates = ", ".join([*(f"{c} = EXCLUDED.{c}" for c in columns), "enabled = true"])
    await conn.execute(f"INSERT INTO llm_routes ({', '.join(names)}) VALUES ({placeholders}) "
                       f"ON CONFLICT (use_case, tier) DO UPDATE SET {updates}",
                       use_case, tier, *(values[c] for c in columns), timeout=timeout)


async def delete_route(conn: asyncpg.Connection, use_case: str, tier: str, timeout: float) -> bool:
    status = await conn.execute("DELETE FROM llm_routes WHERE use_case = $1 AND tier = $2", use_case, tier,
                                timeout=timeout)
    return status != "DELETE 0"


async def record_discovery(conn: asyncpg.Connection, found: Mapping[str, Iterable[Any]], timeout: float) -> int:
    """Upsert each provider's discovered models and mark the ones it no longer lists unavailable.

    `found` maps a provider that answered to its models (objects with model, context_window,
    input_price, output_price); providers that failed are not in it and keep their rows.
    Returns how many rows turned unavailable.
    """
    vanished = 0
    async with conn.transaction():
        for provider, models in found.items():
            rows = [(provider, m.model, m.context_window, m.input_price, m.output_price) for m in models]
            await conn.executemany(
                """INSERT INTO llm_models AS t (provider, model, context_window, input_price_per_million,
                                                output_price_per_million, available, discovered_at)
                   VALUES ($1, $2, $3, $4, $5, true, now())
                   ON CONFLICT (provider, model) DO UPDATE SET
                     context_window = COALESCE(EXCLUDED.context_window, t.context_window),
                     input_price_per_million = COALESCE(EXCLUDED.input_price_per_million,
                                                        t.input_price_per_million),
                     output_price_per_million = COALESCE(EXCLUDED.output_price_per_million,
                                                         t.output_price_per_million),
                     available = true, discovered_at = now()""", rows, timeout=timeout)
            status = await conn.execute(
                """UPDATE llm_models SET available = false
                   WHERE provider = $1 AND available AND NOT (model = ANY($2::text[]))""",
                provider, [r[1] for r in rows], timeout=timeout)
            vanished += int(status.split()[-1])
    return vanished


# --- the live store ----------------------------------------------------------------------------------

ApplyTable = Callable[[RoutingTable], Awaitable[None]]
ApplyKeys = Callable[[Any], None]  # a keystore.KeyRing, each time the keys' rows change

_FALLBACK_REASON = {
    "connecting": "database not loaded yet",
    "unreachable": "database unreachable",
    "uninitialized": "database not initialized",
    "invalid": "database table invalid",
    "stopped": "database store stopped",
}


def _discard_connection(connecting: asyncio.Future[asyncpg.Connection]) -> None:
    """A connect whose caller left: its connection closed, its failure taken (and so never reported)."""
    if connecting.cancelled():
        return
    if connecting.exception() is None:
        connecting.result().terminate()


class RouteStore:
    """Keeps the router's table in step with Postgres: first load, LISTEN, periodic refresh, retries."""

    def __init__(self, config: RouterConfig, apply: ApplyTable, *, keys: ApplyKeys | None = None):
        self.config = config
        self._apply = apply
        self._apply_keys = keys  # inbound keys from llm_api_keys, read with the table
        self._keys_fingerprint: bytes | None = None
        self._dsn = require_dsn(config)
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[asyncpg.Connection] | None = None  # the LISTEN connection's connect
        self._wake = asyncio.Event()
        self._stopping = False
        self._fingerprint: bytes | None = None
        self.schema: str | None = None
        self.state = "connecting"
        self.last_error: str | None = None
        self.last_refresh: float | None = None  # time.time() of the last successful read
        self.checked_at: float | None = None  # time.time() of the last query that set `state`, either way
        self._waiting_since: float | None = None  # a query has been waiting for the server since then
        self.reloads = 0  # tables swapped in from the database
        self.available_models: tuple[ModelRef, ...] = ()

    # -- lifetime ----------------------------------------------------------------------------

    async def load_initial(self, fallback: RoutingTable) -> RoutingTable:
        """The database's table if it can be read now, else `fallback` (the background loop retries)."""
        self._pool = await create_pool(self.config)
        try:
            snapshot = await self._read()
        except (StoreError, ConfigError, *DB_ERRORS) as exc:
            self._note_failure(exc, quiet=True)
            log.warning("routing table: starting from %s (%s); retrying the database in the background",
                        fallback.source, self.last_error)
            return fallback
        self._accept(snapshot)
        log.info("routing table: %d routes from the database at %s", len(snapshot.table.routes),
                 describe_dsn(self._dsn))
        return snapshot.table

    def start(self) -> None:
        """Run the LISTEN + refresh loop in the background until `stop()`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tiergate-route-store")

    async def stop(self) -> None:
        # Let the loop leave at its next step rather than cancelling it mid-connect: asyncpg, cancelled
        # during its SSL negotiation, leaves a failed future behind ("Future exception was never
        # retrieved"). Every step is bounded by db_timeout; past that it is cancelled anyway.
        self._stopping = True
        self._wake.set()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=self.config.db_timeout)  # neither raises nor cancels
        await cancel_and_wait(self._task)
        self._task = None
        if self._connecting is not None:  # a connect the loop left when cancelled ends by its own timeout
            await asyncio.wait({self._connecting})
            self._connecting = None
        await self._close_listener()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self.config.db_timeout)
            except (TimeoutError, *DB_ERRORS):
                self._pool.terminate()
            self._pool = None
        self.state = "stopped"

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = FIRST_BACKOFF
        cap = max(FIRST_BACKOFF, min(MAX_BACKOFF, self.config.refresh_interval))
        while not self._stopping:
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
                    if self._stopping:
                        break
                    await self.refresh()  # catch up with whatever changed while not listening
                    backoff = FIRST_BACKOFF
                ticked = await self._wait(self.config.refresh_interval)
                if self._stopping or self._listener is None or self._listener.is_closed():
                    continue
                if ticked:  # a quiet interval: make sure the LISTEN connection still answers
                    with self._querying():
                        await self._listener.execute("SELECT 1", timeout=self.config.db_timeout)
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except (StoreError, *DB_ERRORS) as exc:
                self._note_failure(exc)
            except Exception:  # a bug must not end live refresh for the life of the process
                log.exception("routing table: refresh from the database failed")
                self.state, self.last_error = "unreachable", "internal error (see the log)"
            else:
                continue
            await self._close_listener()
            await self._wait(backoff)  # retry with backoff; stop() wakes it
            backoff = min(cap, backoff * 2)

    async def _wait(self, interval: float) -> bool:
        """Wait for a notification (False) or the refresh interval (True)."""
        try:
            await asyncio.wait_for(self._wake.wait(), interval)
        except TimeoutError:
            return True
        finally:
            self._wake.clear()
        return False

    async def _listen(self) -> None:
        with self._querying():
            conn = await self._connect_whole()
        try:
            with self._querying():
                self.schema = await conn.fetchval("SELECT current_schema()", timeout=self.config.db_timeout)
                await conn.add_listener(CHANNEL, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_lost)
        self._listener = conn

    async def _connect_whole(self) -> asyncpg.Connection:
        """`connect`, never cancelled half way (asyncpg cancelled during its SSL negotiation leaves a failed
        future behind, "exception was never retrieved"): the loop cancelled meanwhile leaves the connect to
        end by its own timeout, and `stop()` waits for it; a connection it makes then is closed."""
        self._connecting = connecting = asyncio.ensure_future(connect(self.config))
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            connecting.add_done_callback(_discard_connection)
            raise
        finally:
            if connecting.done():
                self._connecting = None

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            conn.terminate()  # no goodbye needed; the server drops LISTEN with the session

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        schema = payload.partition(".")[0]
        if self.schema is None or schema == self.schema:
            self._wake.set()

    def _on_lost(self, conn: Any) -> None:
        if conn is self._listener:
            self._wake.set()  # the loop sees the closed connection and reconnects

    # -- reading ------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Read the tables and swap the table in if it changed. Returns whether it was swapped."""
        try:
            snapshot = await self._read()
        except ConfigError as exc:  # connected, but no valid route: keep serving the current table
            self._note_failure(exc)
            return False
        try:
            return await self._accept_and_apply(snapshot)
        except ConfigError as exc:  # valid alone, refused beside what runs (a provider key that is an inbound key)
            self._note_failure(exc)
            return False

    async def _read(self) -> Snapshot:
        assert self._pool is not None, "load_initial() first"
        with self._querying():
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                snapshot = await read_snapshot(conn, self.config)
                if self._apply_keys is None:
                    return snapshot
                from .keystore import read_key_ring

                ring = await read_key_ring(conn, self.config.db_timeout, self.config.env)
                return dataclasses.replace(snapshot, keys=ring)

    @contextlib.contextmanager
    def _querying(self) -> Iterator[None]:
        """Mark a query to the server as waiting, for health: a stopped (not closed) server shows
        as a query waiting this long, not as the last answer's `connected`."""
        self._waiting_since = time.time()
        try:
            yield
        finally:
            self._waiting_since = None

    async def _accept_and_apply(self, snapshot: Snapshot) -> bool:
        changed = snapshot.fingerprint != self._fingerprint
        if changed:
            await self._apply(snapshot.table)
        self._accept(snapshot)
        return changed

    def _accept(self, snapshot: Snapshot) -> None:
        if snapshot.fingerprint != self._fingerprint:
            self.reloads += 1
            for problem in snapshot.table.problems:
                log.warning("routing table from the database: rejected %s", problem)
            log.info("routing table: loaded %d routes from the database", len(snapshot.table.routes))
        if self.state != "connected":
            log.info("routing table: database at %s is reachable", describe_dsn(self._dsn))
        self._fingerprint = snapshot.fingerprint
        self.available_models = snapshot.available_models
        ring = snapshot.keys
        if ring is not None and self._apply_keys is not None and ring.fingerprint != self._keys_fingerprint:
            for problem in ring.problems:
                log.warning("inbound keys from the database: rejected %s", problem)
            self._apply_keys(ring)
            self._keys_fingerprint = ring.fingerprint
        self.state = "connected"
        self.last_error = None
        self.last_refresh = self.checked_at = time.time()

    def _note_failure(self, exc: BaseException, *, quiet: bool = False) -> None:
        if isinstance(exc, StoreError) and exc.code == "database_not_initialized":
            state = "uninitialized"
        elif isinstance(exc, ConfigError):
            state = "invalid"
        else:
            state = "unreachable"
        if isinstance(exc, TiergateError):
            message = exc.message
        else:
            message = f"lost the database at {describe_dsn(self._dsn)}: {describe_error(exc, self._dsn)}"
        if not quiet and (state != self.state or message != self.last_error):
            log.warning("routing table: database %s (%s); serving the last good table", state, message)
        self.state = state
        self.last_error = message
        self.checked_at = time.time()

    # -- writing --------------------------------------------------------------------------------

    async def record_discovery(self, found: Mapping[str, Iterable[Any]]) -> int:
        assert self._pool is not None, "load_initial() first"
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                return await record_discovery(conn, found, self.config.db_timeout)
        except DB_ERRORS as exc:
            raise StoreError(f"cannot record discovered models: {describe_error(exc, self._dsn)}",
                             code="database_unreachable") from None

    @property
    def _acquire_timeout(self) -> float:
        """A pool connection's wait: longer than its connect's own timeout (db_timeout), so a connect
        ends by that timeout rather than cancelled half way (asyncpg, cancelled during its SSL
        negotiation, leaves a failed task behind: "exception was never retrieved")."""
        return 2 * self.config.db_timeout

    # -- inspection ---------------------------------------------------------------------------

    def last_refresh_age(self) -> float | None:
        """Seconds since the tables were last read successfully (None: not yet)."""
        return None if self.last_refresh is None else max(0.0, time.time() - self.last_refresh)

    def health(self, table: RoutingTable) -> dict[str, Any]:
        """What `/health/details` says about the table's source and the database."""
        source = table.source
        if source != "database":
            source = f"{source.partition(':')[0]} ({_FALLBACK_REASON.get(self.state, 'database ' + self.state)})"
        now = time.time()
        return {
            "source": source,
            "database": {
                # what the last query that finished saw, and how long ago; `waiting_s`: a query sent
                # since has had no answer for this long (a stopped server answers nothing, not an error)
                "state": self.state,
                "state_age_s": _age(self.checked_at, now),
                "waiting_s": _age(self._waiting_since, now),
                "listening": self._listener is not None and not self._listener.is_closed(),
                "last_refresh_age_s": _age(self.last_refresh, now),
                "reloads": self.reloads,
                "error": self.last_error,
            },
        }


def _age(since: float | None, now: float) -> float | None:
    return None if since is None else round(max(0.0, now - since), 3)
