"""`tiergate keys create | list | rotate | revoke`: inbound keys stored hashed in Postgres (`DATABASE_URL`).

A secret is printed once, by `create` and `rotate`, and stored nowhere: only its SHA-256 and its
first characters (`tg-abcdef…`, to tell keys apart in `list`). Every running tiergate with
`TIERGATE_DATABASE_KEYS=true` picks a change up within moments, without a restart.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from ..types import ConfigError
from .db import load_config, run_db_command

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_keys_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="inbound keys in PostgreSQL (TIERGATE_DATABASE_KEYS)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key and print its secret (once)")
    create.add_argument("name", metavar="NAME", help="what limits, logs and metrics call the key")
    create.add_argument("--expires", metavar="WHEN", help="a duration (90d, 12h, 30m) or an ISO date/time")
    create.add_argument("--routes", nargs="+", metavar="USE_CASE:TIER", help="routes the key may use")
    create.add_argument("--use-cases", nargs="+", metavar="USE_CASE", help="use cases (any tier unless --tiers)")
    create.add_argument("--tiers", nargs="+", metavar="TIER", help="tiers (any use case unless --use-cases)")
    create.add_argument("--models", nargs="+", metavar="MODEL",
                        help="aliases, provider/model, provider/* the key may name directly")
    create.add_argument("--project", action="append", metavar="PROVIDER=PROJECT",
                        help="the OpenAI-Project this key's calls send PROVIDER")
    create.add_argument("--organization", action="append", metavar="PROVIDER=ORG",
                        help="the OpenAI-Organization this key's calls send PROVIDER")
    create.add_argument("--provider-key-env", action="append", metavar="PROVIDER=ENV_VAR",
                        help="the environment variable holding this key's own key for PROVIDER")
    keys_sub.add_parser("list", help="every key: name, prefix, state, expiry, scopes (never a secret)").add_argument(
        "--json", action="store_true", help="one JSON object per key")
    rotate = keys_sub.add_parser("rotate", help="a new secret for a key (printed once); the old one stops working")
    rotate.add_argument("name", metavar="NAME")
    rotate.add_argument("--grace", metavar="DURATION", default="0s",
                        help="how long the old secret keeps working (e.g. 1h; default: it stops now)")
    revoke = keys_sub.add_parser("revoke", help="stop a key for good")
    revoke.add_argument("name", metavar="NAME")


def cmd_keys(args: argparse.Namespace) -> int:
    config = load_config()
    action = {"create": _create, "list": _list, "rotate": _rotate, "revoke": _revoke}[args.keys_command]
    return run_db_command(action(config, args))


KEYS_COMMANDS = {"keys": cmd_keys}


def seconds(text: str) -> float:
    m = _DURATION.match(text.strip().lower())
    if m is None:
        raise ConfigError(f"{text!r} is not a duration: a number and s, m, h, d or w (e.g. 90d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def expiry(text: str) -> datetime:
    """A duration from now, or an ISO date/time (UTC unless it says otherwise)."""
    if _DURATION.match(text.strip().lower()):
        return datetime.now(UTC) + timedelta(seconds=seconds(text))
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--expires {text!r}: a duration (90d, 12h) or an ISO date/time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def credentials(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for option, field in (("project", "project"), ("organization", "organization"),
                          ("provider_key_env", "api_key_env")):
        for entry in getattr(args, option) or ():
            provider, sep, value = entry.partition("=")
            if not sep or not provider or not value:
                raise ConfigError(f"--{option.replace('_', '-')} {entry!r}: PROVIDER=VALUE")
            out.setdefault(provider, {})[field] = value
    return out


async def _create(config: Any, args: argparse.Namespace) -> int:
    from ..table import store
    from ..table.keystore import create_key

    values: dict[str, Any] = {"routes": args.routes, "use_cases": args.use_cases, "tiers": args.tiers,
                              "models": args.models, "credentials": credentials(args) or None}
    if args.expires:
        values["expires_at"] = expiry(args.expires)
    async with store.connected(config) as conn:
        try:
            secret = await create_key(conn, args.name, values, config.db_timeout)
        except ValueError as exc:
            raise ConfigError(f"keys create {args.name}: {exc}") from None
    print(f"key {args.name} created; its secret (shown only now, store it safely):", file=sys.stderr)
    print(secret)
    return 0


async def _list(config: Any, args: argparse.Namespace) -> int:
    from ..table import store
    from ..table.keys import SCOPE_FIELDS, shown
    from ..table.keystore import list_keys, state_of

    async with store.connected(config) as conn:
        rows = await list_keys(conn, config.db_timeout)
    for row in rows:
        scope = {f: list(row[f]) for f in SCOPE_FIELDS if row[f] is not None}
        providers = sorted(orjson.loads(row["credentials"])) if row["credentials"] else []
        entry = {"name": row["name"], "key": shown(row["prefix"]), "state": state_of(row),
                 "created": _when(row["created_at"]), "expires": _when(row["expires_at"]),
                 "scopes": scope, "own_credentials_for": providers}
        if args.json:
            sys.stdout.write(orjson.dumps(entry).decode() + "\n")
            continue
        what = "; ".join(f"{f}: {','.join(v)}" for f, v in scope.items()) or "everything"
        own = f"  own credentials: {','.join(providers)}" if providers else ""
        print(f"{entry['name']:<24} {entry['key']:<12} {entry['state']:<8} expires {entry['expires'] or 'never':<20} "
              f"{what}{own}")
    if not rows and not args.json:
        print("no keys in the database (tiergate keys create NAME)")
    return 0


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _rotate(config: Any, args: argparse.Namespace) -> int:
    from ..table import store
    from ..table.keystore import rotate_key

    grace = seconds(args.grace)
    async with store.connected(config) as conn:
        secret = await rotate_key(conn, args.name, grace, config.db_timeout)
    if secret is None:
        print(f"tiergate: no active key named {args.name!r}", file=sys.stderr)
        return 1
    old = f"the old one works for {args.grace} more" if grace > 0 else "the old one no longer works"
    print(f"key {args.name} rotated ({old}); its new secret (shown only now):", file=sys.stderr)
    print(secret)
    return 0


async def _revoke(config: Any, args: argparse.Namespace) -> int:
    from ..table import store
    from ..table.keystore import revoke_key

    async with store.connected(config) as conn:
        done = await revoke_key(conn, args.name, config.db_timeout)
    if not done:
        print(f"tiergate: no active key named {args.name!r}", file=sys.stderr)
        return 1
    print(f"key {args.name} revoked")
    return 0
