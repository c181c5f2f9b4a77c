"""Inbound authentication: bearer keys a client must present on `/v1/*` when keys are configured.

Keys come from `TIERGATE_API_KEYS` (comma list) and/or `TIERGATE_API_KEYS_FILE` (one a line), and,
with `TIERGATE_DATABASE_KEYS`, from Postgres (`llm_api_keys`, managed by `tiergate keys ...`, stored
hashed, with expiry and scopes). An entry may name its key, `team-a=sk-...`: the name (never the key)
is what limits are scoped by. A presented key is looked up by its SHA-256: one hash and one dict get
whatever the number of keys, and no comparison of secret bytes, so neither the timing nor anything
else tells a caller which key came close.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time
from collections.abc import Iterable, Mapping

from aiohttp import web

from ..table.keys import InboundKey, digest
from ..types import AuthenticationError, ConfigError, InvalidRequestError

# Where a client sends its own key for a `pass_client_key` provider (bring-your-own-key). Its own
# header, not Authorization, which carries tiergate's key when keys are set; an `x-tiergate-*` name,
# so that it never goes upstream under its own name (only as the provider's Authorization).
PROVIDER_KEY_HEADER = "X-Tiergate-Provider-Key"

_KEY_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]{0,63})=(?!=)(.+)$")


def parse_key(entry: str) -> tuple[str | None, str]:
    """`name=key` -> (name, key); an entry without a name (or a key ending in base64 `=` padding,
    whose `=` follows no name) -> (None, entry)."""
    m = _KEY_NAME.match(entry.strip())
    return (m.group(1), m.group(2).strip()) if m else (None, entry.strip())


class InboundAuth:
    """Checks an `Authorization: Bearer <key>` header against the keys tiergate accepts: those given
    in the environment or the keys file (`replace`) and those stored in Postgres (`replace_stored`).
    `required`: keys come from the database, so authentication is on even while it has given none
    (a database not reachable at start-up must not open the gateway)."""

    __slots__ = ("_given", "_stored", "_keys", "_required")

    def __init__(self, keys: Iterable[str], *, required: bool = False):
        self._required = required
        self._stored: Mapping[bytes, InboundKey] = {}
        self.replace(keys)

    def replace(self, keys: Iterable[str]) -> None:
        """Take `keys` in place of the current ones (a watched keys file changed), in one step."""
        found: dict[bytes, InboundKey] = {}
        for entry in keys:
            if not entry:
                continue
            name, key = parse_key(entry)
            if key:
                found.setdefault(digest(key), InboundKey(name))  # a key listed twice keeps its first name
        self._given = found
        self._merge()

    def replace_stored(self, keys: Mapping[bytes, InboundKey]) -> None:
        """Take the database's keys (by their secrets' digests) in place of the ones it gave before."""
        self._stored = keys
        self._merge()

    def _merge(self) -> None:
        keys = {**self._stored, **self._given}
        if len(keys) > 1:  # several tenants: each needs an identity, or unnamed keys would share
            keys = _name_unnamed(keys)
        # one assignment: a request in between sees the old keys or the new, never a mix
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return self._required or bool(self._keys)

    def names(self) -> list[str]:
        """The names given to keys (for `/health/details`; never the keys)."""
        return sorted({k.name for k in self._keys.values() if k.name})

    def is_inbound(self, value: str) -> bool:
        """Whether `value` is one of the accepted keys (looked up as `check` does)."""
        return digest(value.strip()) in self._keys

    def authenticate(self, authorization: str | None) -> InboundKey | None:
        """Raise AuthenticationError (401) unless `authorization` carries an accepted key that has not
        expired; return that key (None when no keys are configured)."""
        if not self.enabled:
            return None
        if not authorization:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: "
                                      "<key>') with one of tiergate's keys")
        scheme, _, presented = authorization.partition(" ")
        key = self._keys.get(digest(presented.strip()))
        if key is None or scheme.lower() != "bearer":
            raise AuthenticationError("invalid API key: the bearer key is not one of tiergate's keys")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise AuthenticationError("invalid API key: the bearer key has expired", code="expired_api_key")
        return key

    def check(self, authorization: str | None) -> str | None:
        """As `authenticate`, returning the key's name."""
        key = self.authenticate(authorization)
        return None if key is None else key.name


def _name_unnamed(keys: Mapping[bytes, InboundKey]) -> dict[bytes, InboundKey]:
    """Name each unnamed key by its place among the unnamed ones (`unnamed-1`, ...): what its stored
    objects, cache entries and limits are scoped by when it shares tiergate with other keys. A place,
    never anything derived from the key, so no log or label holds a clue to it; name keys
    (`team-a=sk-...`) for a name that survives a reordering of the list."""
    named: dict[bytes, InboundKey] = {}
    place = 0
    for key_digest, key in keys.items():
        if key.name is None:
            place += 1
            key = dataclasses.replace(key, name=f"unnamed-{place}")
        named[key_digest] = key
    return named


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client presents: its `Authorization`, else an `x-api-key` (as the Anthropic SDKs send
    it), read as a bearer key."""
    authorization = headers.get("Authorization")
    if authorization is None:
        api_key = headers.get("x-api-key")
        if api_key is not None:
            return f"Bearer {api_key}"
    return authorization


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so treat it as reachable


def check_bind(host: str, api_keys: tuple[str, ...], insecure: bool, database_keys: bool = False) -> None:
    """Refuse to listen where others can reach the port with no keys, unless told `--insecure`."""
    if api_keys or database_keys or insecure or is_loopback(host):
        return
    raise ConfigError(f"refusing to listen on {host} without inbound keys: set TIERGATE_API_KEYS "
                      "(or TIERGATE_API_KEYS_FILE, or TIERGATE_DATABASE_KEYS), bind 127.0.0.1, or pass --insecure",
                      param="host")


AUTH_KEY = web.AppKey("auth", InboundAuth)


def client_provider_key(headers: Mapping[str, str], auth: InboundAuth) -> str | None:
    """The client's own key for a `pass_client_key` provider: `X-Tiergate-Provider-Key` (a bare key or
    `Bearer <key>`), or, when tiergate has no inbound keys (a sidecar), the client's Authorization (or
    `x-api-key`, where the Anthropic SDKs put it). Never one of tiergate's inbound keys: that would hand a
    working gateway credential to a provider."""
    value = headers.get(PROVIDER_KEY_HEADER)
    if value is None and not auth.enabled:
        value = headers.get("Authorization") or headers.get("x-api-key")
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" and rest.strip() else value.strip()
    if auth.enabled and auth.is_inbound(key):
        raise InvalidRequestError(f"{PROVIDER_KEY_HEADER} holds one of tiergate's own keys: send the "
                                  "provider's key there (tiergate's key goes in Authorization)",
                                  param=PROVIDER_KEY_HEADER.lower(), code="invalid_provider_key")
    return key
