"""The `tiergate` commands that work on the Postgres routing table: db init, routes, discover.

They read `DATABASE_URL` like the server does and say plainly when it is unset or unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from ..settings import RouterConfig, check_service_urls
from ..table.groups import STRATEGY_NAMES, parse_groups
from ..table.routing import parse_strategy_route
from ..types import CACHE_SCOPES, ConfigError, ModelTier, UseCase


def add_db_commands(sub: Any) -> None:
    """Add `db`, `routes` and `discover` to the `tiergate` parser's subcommands."""
    db = sub.add_parser("db", help="the routing table in PostgreSQL (DATABASE_URL)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    init = db_sub.add_parser("init", help="create or upgrade the schema; seed it from a table file if empty")
    init.add_argument("--from", dest="source", metavar="FILE",
                      help="table file to seed from (default: config/routes.yaml or TIERGATE_CONFIG)")

    routes = sub.add_parser("routes", help="list or edit the routes in PostgreSQL")
    routes_sub = routes.add_subparsers(dest="routes_command", required=True)
    routes_sub.add_parser("list", help="print the routes and any rejected rows")
    set_ = routes_sub.add_parser("set", help="create or change a route (other fields keep their value)")
    set_.add_argument("use_case", choices=[u.value for u in UseCase], metavar="USE_CASE")
    set_.add_argument("tier", choices=[t.value for t in ModelTier], metavar="TIER")
    set_.add_argument("--model", required=True, help="provider/model-id")
    set_.add_argument("--fallbacks", nargs="*", metavar="MODEL", help="provider/model-id ... (none to clear)")
    set_.add_argument("--max-tokens", type=int)
    set_.add_argument("--temperature", type=float)
    set_.add_argument("--system-prompt")
    set_.add_argument("--timeout", type=float, help="seconds: the route's deadline")
    set_.add_argument("--first-byte-timeout", type=float, help="seconds a stream may take to its first chunk")
    set_.add_argument("--embeddings-model", nargs="*", metavar="MODEL",
                      help="provider/model-id ... of the route's /v1/embeddings calls (none to clear)")
    set_.add_argument("--strategy", choices=STRATEGY_NAMES, help="how its candidates are ordered per request")
    set_.add_argument("--weights", nargs="*", type=float, metavar="W",
                      help="under weighted: one per candidate, the model first (none to clear)")
    set_.add_argument("--cache-scope", choices=CACHE_SCOPES,
                      help="whose requests its cached answers and shared streams serve (default: key)")
    delete = routes_sub.add_parser("delete", help="remove a route")
    delete.add_argument("use_case", metavar="USE_CASE")
    delete.add_argument("tier", metavar="TIER")

    sub.add_parser("discover", help="list each provider's models into llm_models, with prices where given")


def load_config() -> RouterConfig:
    config = RouterConfig.load()
    check_service_urls(config)  # a malformed DATABASE_URL: one line naming what is wrong, no traceback
    return config


def cmd_db(args: argparse.Namespace) -> int:
    return run_db_command(_db_init(load_config(), args.source))


def cmd_routes(args: argparse.Namespace) -> int:
    config = load_config()
    action: Callable[[RouterConfig, argparse.Namespace], Any] = {
        "list": _routes_list, "set": _routes_set, "delete": _routes_delete}[args.routes_command]
    return run_db_command(action(config, args))


def cmd_discover(args: argparse.Namespace) -> int:
    return run_db_command(_discover(load_config()))


DB_COMMANDS = {"db": cmd_db, "routes": cmd_routes, "discover": cmd_discover}


def run_db_command(coro: Any) -> Any:
    """Run one command's coroutine; a database problem becomes a one-line message and exit 1."""
    from ..table import store  # asyncpg is loaded only for the database commands

    try:
        return asyncio.run(coro)
    except BrokenPipeError:
        raise  # stdout's reader went away (`tiergate routes list | head`): not a database error
    except store.StoreError as exc:
        print(f"tiergate: {exc.message}", file=sys.stderr)
        return 1
    except store.UndefinedTableError:
        print(f"tiergate: {store.NOT_INITIALIZED}", file=sys.stderr)
        return 1
    except store.DB_ERRORS as exc:
        print(f"tiergate: database error: {store.describe_error(exc)}", file=sys.stderr)
        return 1


async def _db_init(config: RouterConfig, source: str | None) -> int:
    from ..table import store  # asyncpg is loaded only for the database commands

    report = await store.init_db(config, source)
    where = store.describe_dsn(store.require_dsn(config))
    if not report.changed:
        print(f"{where}: schema up to date, tables not empty: nothing to do")
        return 0
    if report.applied:
        print(f"{where}: applied migration(s) {', '.join(map(str, report.applied))}")
    if report.seeded:
        print("seeded " + ", ".join(f"{n} {what}" for what, n in report.seeded.items()))
    else:
        print("tables not empty: not seeded")
    return 0


async def _routes_list(config: RouterConfig, args: argparse.Namespace) -> int:
    from ..table import store  # asyncpg is loaded only for the database commands

    conn = await store.connect(config)
    try:
        rows = await store.list_routes(conn, config.db_timeout)
        try:
            problems = list((await store.read_snapshot(conn, config)).table.problems)
        except ConfigError as exc:
            problems = [exc.message]
    finally:
        await conn.close(timeout=config.db_timeout)
    print(f"{'route':<32} {'model':<48} {'max_tokens':>10} {'temp':>5}  fallbacks")
    for r in rows:
        temp = "-" if r["temperature"] is None else f"{r['temperature']:.2f}"
        off = "" if r["enabled"] else "  (disabled)"
        print(f"{r['use_case'] + ':' + r['tier']:<32} {r['model']:<48} {r['max_tokens'] or '-':>10} {temp:>5}  "
              f"{', '.join(r['fallbacks']) or '-'}{off}")
    for problem in problems:
        print(f"rejected: {problem}")
    return 0


async def _routes_set(config: RouterConfig, args: argparse.Namespace) -> int:
    from ..table import store  # asyncpg is loaded only for the database commands

    conn = await store.connect(config)
    try:
        providers = await store.provider_names(conn, config.db_timeout)
        raw: dict[str, Any] = {"use_case": args.use_case, "tier": args.tier, "model": args.model}
        values: dict[str, Any] = {"model": args.model}
        for key, value in (("fallbacks", args.fallbacks), ("max_tokens", args.max_tokens),
                           ("temperature", args.temperature), ("system_prompt", args.system_prompt),
                           ("timeout", args.timeout), ("first_byte_timeout", args.first_byte_timeout),
                           ("embeddings_model", args.embeddings_model), ("strategy", args.strategy),
                           ("weights", args.weights), ("cache_scope", args.cache_scope)):
            if value is not None:
                raw[key] = values[key] = value
        if values.get("weights") == []:
            values["weights"] = None
            del raw["weights"]
        try:
            groups = parse_groups(await store.table_setting(conn, "groups", config.db_timeout),
                                  dict.fromkeys(providers), [])
            parse_strategy_route(raw, dict.fromkeys(providers), groups)
        except ValueError as exc:
            raise ConfigError(f"routes set {args.use_case} {args.tier}: {exc}") from None
        await store.set_route(conn, args.use_case, args.tier, values, config.db_timeout)
    finally:
        await conn.close(timeout=config.db_timeout)
    print(f"route {args.use_case}:{args.tier} -> {args.model}")
    return 0


async def _routes_delete(config: RouterConfig, args: argparse.Namespace) -> int:
    from ..table import store  # asyncpg is loaded only for the database commands

    async with store.connected(config) as conn:
        deleted = await store.delete_route(conn, args.use_case.lower(), args.tier.lower(), config.db_timeout)
    if not deleted:
        print(f"tiergate: no route {args.use_case}:{args.tier} in the database", file=sys.stderr)
        return 1
    print(f"route {args.use_case}:{args.tier} deleted")
    return 0


async def _discover(config: RouterConfig) -> int:
    from ..engine.router import Router
    from ..table import store  # asyncpg is loaded only for the database commands

    conn = await store.connect(config)
    try:
        table = (await store.read_snapshot(conn, config)).table
        router = Router(config, table=table)
        await router.initialize()
        try:
            found = await router.discover_available_models()
        finally:
            await router.close()
        vanished = await store.record_discovery(conn, found.models, config.db_timeout)
    finally:
        await conn.close(timeout=config.db_timeout)
    for provider, models in found.models.items():
        print(f"{provider}: {len(models)} model(s)")
        for m in models:
            price = "" if m.input_price is None or m.output_price is None else (
                f"  ${m.input_price:g} in / ${m.output_price:g} out per 1M tokens")
            print(f"  {m.ref}{price}")
    for provider, error in found.errors.items():
        print(f"{provider}: not listed ({error})", file=sys.stderr)
    if vanished:
        print(f"{vanished} model(s) no longer listed: marked unavailable")
    return 1 if found.errors and not found.models else 0
