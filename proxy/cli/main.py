"""The `tiergate` command: serve, check (and the database and discovery commands)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..edge.auth import check_bind
from ..settings import DEMO_CONFIG_PATH, SERVE_DEFAULTS, RouterConfig, check_service_urls
from ..table.routing import load_table
from ..types import ConfigError
from .db import DB_COMMANDS, add_db_commands
from .keys import KEYS_COMMANDS, add_keys_commands
from .limits import LIMITS_COMMANDS, add_limits_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiergate", description="OpenAI-compatible LLM routing sidecar")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", help="routing table file (default: config/routes.yaml or TIERGATE_CONFIG)")
    serve.add_argument("--demo", action="store_true", help="use the in-process mock table (no keys needed)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8100)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (default 1)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback bind without TIERGATE_API_KEYS")

    check = sub.add_parser("check", help="validate a routing table and print it")
    check.add_argument("--config", help="routing table file")
    check.add_argument("--demo", action="store_true", help="check the demo table")
    add_db_commands(sub)  # db init, routes list|set|delete, discover (DATABASE_URL)
    add_limits_commands(sub)  # limits list
    add_keys_commands(sub)  # keys create|list|rotate|revoke
    return parser


def load_config(args: argparse.Namespace) -> RouterConfig:
    config_path = str(DEMO_CONFIG_PATH) if getattr(args, "demo", False) else getattr(args, "config", None)
    overrides: dict[str, Any] = {"config_path": config_path}
    if getattr(args, "demo", False):
        overrides["database_url"] = ""  # the demo never touches a database, even with DATABASE_URL set
    for name in ("host", "port", "workers"):
        overrides[name] = getattr(args, name, None)
    return RouterConfig.load(overrides=overrides, defaults=SERVE_DEFAULTS)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..edge.app import serve

    config = load_config(args)
    try:
        logging.getLogger().setLevel(config.log_level.upper())  # TIERGATE_LOG_LEVEL
    except ValueError:
        raise ConfigError(f"log_level = {config.log_level!r}: expected DEBUG, INFO, WARNING or ERROR",
                          param="log_level") from None
    load_table(config.table_path)  # fail fast, naming the file and key, before binding
    check_service_urls(config)  # a malformed DATABASE_URL / Redis URL: one line, not a traceback
    if config.database_keys and not config.database_dsn:
        raise ConfigError("TIERGATE_DATABASE_KEYS needs DATABASE_URL: the keys are in PostgreSQL",
                          param="database_keys")
    check_bind(config.host, config.api_keys, args.insecure, config.database_keys)  # no open port without inbound keys
    if config.workers > 1:
        from ..edge.workers import run_workers
        return run_workers(config)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        pass
    asyncio.run(serve(config))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args)
    table = load_table(config.table_path, allow_model_override=config.allow_model_override)
    print(f"{config.table_path}: OK, {len(table.routes)} routes, {len(table.providers)} providers, "
          f"{len(table.aliases) + len(table.alias_routes)} aliases, {len(table.groups)} groups, "
          f"{len(table.limits.specs) if table.limits else 0} limits")
    print(f"{'route':<32} {'model':<48} fallbacks")
    for row in table.describe():
        shadow = row.get("shadow")
        mirrored = f"  (shadow: {shadow['model']}, {shadow['share']:.0%})" if shadow else ""
        if row.get("strategy", "ordered") != "ordered" or row.get("groups"):  # chooses per request: say how
            groups = f", groups {', '.join(row['groups'])}" if row.get("groups") else ""
            mirrored += f"  (strategy {row['strategy']}{groups})"
        print(f"{row['route']:<32} {row['model']:<48} {', '.join(row['fallbacks']) or '-'}{mirrored}")
    from ..engine.providers import provider_has_key
    missing = [name for name, spec in table.providers.items() if not provider_has_key(spec, config)]
    if missing:
        print(f"note: no API key configured for provider(s): {', '.join(missing)}")
    return 0


COMMANDS = {"serve": cmd_serve, "check": cmd_check, **DB_COMMANDS, **LIMITS_COMMANDS, **KEYS_COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe (`tiergate check | head`) shows up here, inside the try
        return code
    except ConfigError as exc:
        print(f"tiergate: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away: nothing left to say. Point stdout at /dev/null so the interpreter's
        # own flush at exit does not raise again (the recipe of Python's `signal` docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
