"""Inbound keys in Postgres (`llm_api_keys`, migration 006): created, listed, rotated and revoked by
`tiergate keys ...`, and read by a running tiergate into the map the edge looks keys up in.

Only a secret's SHA-256 is stored, with a short prefix to know it by; the secret is shown once, when
it is made. The rows change under the same trigger as the routing tables (NOTIFY `tiergate_config`),
so the route store's LISTEN and periodic refresh read them too (`RouteStore(keys=...)`): a created,
rotated or revoked key takes effect in every running tiergate within moments, without a restart.
An expiry is checked when a key is presented, so an expired key is refused on time whatever the
refresh interval.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from .keys import (
    SCOPE_FIELDS,
    SHOWN,
    InboundKey,
    check_name,
    credential_headers,
    digest,
    new_secret,
    parse_credentials,
    parse_scope,
)

KEY_COLUMNS = ("name", "prefix", "expires_at", "revoked", "revoked_at", "previous_expires_at", *SCOPE_FIELDS,
               "credentials", "created_at", "updated_at")


@dataclass(frozen=True)
class KeyRing:
    """The database's keys as the edge looks them up: a secret's digest -> the key (a rotated key's
    previous secret too, until its grace ends); `fingerprint` changes when any row does."""

    by_digest: Mapping[bytes, InboundKey]
    fingerprint: bytes
    problems: tuple[str, ...] = ()


async def read_key_ring(conn: asyncpg.Connection, timeout: float, env: Mapping[str, str]) -> KeyRing:
    """The keys that may be presented now (not revoked; a rotated one's previous secret within its
    grace); none in a database that predates the table. A row that does not parse is left out (it
    authenticates nothing) and named in `problems`."""
    if await conn.fetchval("SELECT to_regclass('llm_api_keys') IS NULL", timeout=timeout):
        return KeyRing({}, b"")
    rows = await conn.fetch(
        f"""SELECT secret_hash, previous_hash, {', '.join(KEY_COLUMNS)} FROM llm_api_keys
            WHERE NOT revoked ORDER BY name""", timeout=timeout)
    by_digest: dict[bytes, InboundKey] = {}
    problems = []
    seen = hashlib.sha256()
    for row in rows:
        seen.update(orjson.dumps([str(row[c]) for c in ("name", "secret_hash", "previous_hash", "expires_at",
                                                        "previous_expires_at", *SCOPE_FIELDS, "credentials")]))
        try:
            key = key_from_row(row, env)
        except ValueError as exc:
            problems.append(f"llm_api_keys ({row['name']}).{exc}")
            continue
        by_digest[bytes(row["secret_hash"])] = key
        grace = row["previous_expires_at"]
        if row["previous_hash"] is not None and grace is not None:
            until = grace.timestamp() if key.expires_at is None else min(grace.timestamp(), key.expires_at)
            by_digest[bytes(row["previous_hash"])] = InboundKey(key.name, until, key.scope, key.credentials)
    return KeyRing(by_digest, seen.digest(), tuple(problems))


def key_from_row(row: Mapping[str, Any], env: Mapping[str, str]) -> InboundKey:
    """One `llm_api_keys` row as the key the edge accepts. ValueError names the bad column."""
    scope = parse_scope({f: list(row[f]) for f in SCOPE_FIELDS if row[f] is not None})
    raw = row["credentials"]
    credentials = parse_credentials(orjson.loads(raw) if isinstance(raw, (str, bytes)) else raw)
    expires = row["expires_at"]
    return InboundKey(row["name"], None if expires is None else expires.timestamp(), scope,
                      credential_headers(credentials, env))


# --- the CLI's writes ---------------------------------------------------------------------------------


def _new() -> tuple[str, bytes, str]:
    secret = new_secret()
    return secret, digest(secret), secret[:SHOWN]


async def create_key(conn: asyncpg.Connection, name: str, values: Mapping[str, Any], timeout: float) -> str:
    """A new key named `name` with `values` (expires_at, scope fields, credentials); returns its secret,
    which is not stored anywhere. ValueError when the name is taken or a value is bad."""
    check_name(name)
    scope = parse_scope(values)
    credentials = parse_credentials(values.get("credentials"))
    secret, hashed, prefix = _new()
    status = await conn.execute(
        """INSERT INTO llm_api_keys (name, secret_hash, prefix, expires_at, routes, use_cases, tiers, models,
                                     credentials)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb) ON CONFLICT (name) DO NOTHING""",
        name, hashed, prefix, values.get("expires_at"),
        *(None if scope is None or getattr(scope, f) is None else sorted(getattr(scope, f)) for f in SCOPE_FIELDS),
        orjson.dumps(credentials).decode() if credentials else None, timeout=timeout)
    if status == "INSERT 0 0":
        raise ValueError(f"a key named {name!r} exists already: rotate it, or revoke it and use another name")
    return secret


async def list_keys(conn: asyncpg.Connection, timeout: float) -> list[asyncpg.Record]:
    """Every key's row without its hashes (the prefix names the secret)."""
    return await conn.fetch(f"SELECT {', '.join(KEY_COLUMNS)} FROM llm_api_keys ORDER BY name", timeout=timeout)


async def rotate_key(conn: asyncpg.Connection, name: str, grace_s: float, timeout: float) -> str | None:
    """A new secret for `name`; the old one keeps working `grace_s` seconds more (0: stops now).
    Returns the new secret, or None when there is no such key (or it is revoked)."""
    secret, hashed, prefix = _new()
    grace = datetime.now(UTC) + timedelta(seconds=grace_s) if grace_s > 0 else None
    status = await conn.execute(
        """UPDATE llm_api_keys SET previous_hash = CASE WHEN $4::timestamptz IS NULL THEN NULL ELSE secret_hash END,
                                   previous_expires_at = $4, secret_hash = $2, prefix = $3
           WHERE name = $1 AND NOT revoked""", name, hashed, prefix, grace, timeout=timeout)
    return secret if status != "UPDATE 0" else None


async def revoke_key(conn: asyncpg.Connection, name: str, timeout: float) -> bool:
    """Revoke `name` for good (both its secrets); whether such a key was there to revoke."""
    status = await conn.execute(
        """UPDATE llm_api_keys SET revoked = true, revoked_at = now(), previous_hash = NULL,
                                   previous_expires_at = NULL WHERE name = $1 AND NOT revoked""",
        name, timeout=timeout)
    return status != "UPDATE 0"


def state_of(row: Mapping[str, Any], now: float | None = None) -> str:
    """active, expired or revoked (for `keys list`)."""
    if row["revoked"]:
        return "revoked"
    expires = row["expires_at"]
    if expires is not None and expires.timestamp() <= (time.time() if now is None else now):
        return "expired"
    return "active"
