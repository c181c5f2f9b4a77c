"""`tiergate limits list`: the table's rate limits and budgets, with their use across the fleet.

The limits come from the table tiergate would serve (Postgres when `DATABASE_URL` is set, else the
file); their current use from Redis when `TIERGATE_REDIS_URL` is set (else it is per process and
only a running tiergate knows it: see `/health/details`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from ..limits.spec import KINDS, LimitIndex
from ..settings import RouterConfig
from ..table.routing import RoutingTable, load_table


def add_limits_commands(sub: Any) -> None:
    limits = sub.add_parser("limits", help="rate limits and budgets of the routing table")
    limits_sub = limits.add_subparsers(dest="limits_command", required=True)
    listing = limits_sub.add_parser("list", help="print each limit, its scope and its current use")
    listing.add_argument("--config", help="routing table file (when DATABASE_URL is not set)")
    listing.add_argument("--json", action="store_true", help="one JSON object per limit")


def cmd_limits(args: argparse.Namespace) -> int:
    config = RouterConfig.load(overrides={"config_path": args.config})
    if config.database_dsn:
        from .db import run_db_command  # a database problem: one line and exit 1

        found = run_db_command(_rows(config))
        if isinstance(found, int):
            return found
        rows, note = found
    else:
        rows, note = asyncio.run(_rows(config))
    if args.json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return 0
    if not rows:
        print("no limits in the routing table")
        return 0
    print(f"{'limit':<28} {'scope':<44} {'kind':<20} {'cap':>10} {'used':>12} {'remaining':>12}  on budget")
    for row in rows:
        scope = ", ".join(f"{k}={v}" for k, v in row["scope"].items()) or "every request"
        used = "-" if row["used"] is None else _num(row["used"])
        remaining = "-" if row["remaining"] is None else _num(row["remaining"])
        print(f"{row['name']:<28} {scope:<44} {row['kind']:<20} {_num(row['limit']):>10} {used:>12} "
              f"{remaining:>12}  {row['on_budget_exceeded'] or '-'}")
    print(note)
    return 0


async def _rows(config: RouterConfig) -> tuple[list[dict[str, Any]], str]:
    table = await _table(config)
    index = table.limits or LimitIndex(())
    usage: dict[str, float] | None = None
    note = f"limits from {table.source}; "
    if config.redis_url and index.checks:
        from ..fleet.cluster_link import open_link
        from ..fleet.state import FleetLimits
        from ..limits.spec import FleetUnavailable

        link = open_link(config.redis_url, timeout=max(config.redis_timeout, 1.0))
        try:
            usage = await FleetLimits(link, config.cache_namespace).usage(index.checks)
            note += f"use across the fleet from redis at {link.where()}"
        except FleetUnavailable as exc:
            note += f"use unknown: {exc}"
        finally:
            await link.close()
    else:
        note += "use is counted per process without TIERGATE_REDIS_URL: see each tiergate's /health/details"
    rows = []
    for check in index.checks:
        used = usage.get(check.key) if usage is not None else None
        rows.append({"name": check.spec.name, "scope": check.spec.scope(), "kind": check.kind,
                     "unit": KINDS[check.kind][1], "limit": check.limit, "used": used,
                     "remaining": None if used is None else max(0.0, check.limit - used),
                     "on_budget_exceeded": (check.spec.on_budget_exceeded.value
                                            if check.is_budget and check.spec.on_budget_exceeded else None)})
    return rows, note


async def _table(config: RouterConfig) -> RoutingTable:
    if not config.database_dsn:
        return load_table(config.table_path, allow_model_override=config.allow_model_override)
    from ..table.store import connect, read_snapshot

    conn = await connect(config)
    try:
        return (await read_snapshot(conn, config)).table
    finally:
        await conn.close(timeout=config.db_timeout)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"


LIMITS_COMMANDS = {"limits": cmd_limits}
