"""Inbound authentication: bearer keys a client must present on `/v1/*` when keys are configured.

Keys come from `TIERGATE_API_KEYS` (comma list) and/or `TIERGATE_API_KEYS_FILE` (one a line).
An entry may name its key, `team-a=sk-...`: the name (never the key) is what limits are scoped by.
Every configured key is compared in constant time, and all of them are always compared, so
neither the timing nor the number of comparisons tells a caller which key came close.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping

from aiohttp import web

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
    """Checks an `Authorization: Bearer <key>` header against the configured keys; returns the
    matched key's name (None for an unnamed key)."""

    __slots__ = ("_keys", "_names")

    def __init__(self, keys: Iterable[str]):
        self.replace(keys)

    def replace(self, keys: Iterable[str]) -> None:
        """Take `keys` in place of the current ones (a watched keys file changed), in one step."""
        found: dict[bytes, str | None] = {}
        for entry in keys:
            if not entry:
                continue
            name, key = parse_key(entry)
            if key:
                found.setdefault(key.encode(), name)  # a key listed twice keeps its first name
        # both at once: a request in between sees the old keys or the new, never a mix
        self._keys, self._names = tuple(found), (None, *found.values())  # names' index 0: no match

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def names(self) -> list[str]:
        """The names given to keys (for `/health/details`; never the keys)."""
        return [n for n in self._names if n]

    def is_inbound(self, value: str) -> bool:
        """Whether `value` is one of the configured keys (compared as `check` does)."""
        candidate = value.strip().encode("utf-8", "surrogateescape")
        found = 0
        for key in self._keys:
            found |= hmac.compare_digest(key, candidate)
        return bool(found)

    def check(self, authorization: str | None) -> str | None:
        """Raise AuthenticationError (401) unless `authorization` carries a configured key;
        return that key's name."""
        if not self._keys:
            return None
        if not authorization:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: "
                                      "<key>') with one of the keys in TIERGATE_API_KEYS")
        scheme, _, presented = authorization.partition(" ")
        candidate = presented.strip().encode("utf-8", "surrogateescape")
        found = 0
        for i, key in enumerate(self._keys, 1):  # no early exit, no branch: every key compared every time
            found |= i * hmac.compare_digest(key, candidate)  # keys are distinct: at most one matches
        if scheme.lower() != "bearer" or not found:
            raise AuthenticationError("invalid API key: the bearer key is not one of TIERGATE_API_KEYS")
        return self._names[found]


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


def check_bind(host: str, api_keys: tuple[str, ...], insecure: bool) -> None:
    """Refuse to listen where others can reach the port with no keys, unless told `--insecure`."""
    if api_keys or insecure or is_loopback(host):
        return
    raise ConfigError(f"refusing to listen on {host} without inbound keys: set TIERGATE_API_KEYS "
                      "(or TIERGATE_API_KEYS_FILE), bind 127.0.0.1, or pass --insecure", param="host")


AUTH_KEY = web.AppKey("auth", InboundAuth)


def client_provider_key(headers: Mapping[str, str], auth: InboundAuth) -> str | None:
    """The client's own key for a `pass_client_key` provider: `X-Tiergate-Provider-Key` (a bare key or
    `Bearer <key>`), or, when tiergate has no inbound keys (a sidecar), the client's Authorization.
    Never one of tiergate's inbound keys: that would hand a working gateway credential to a provider."""
    value = headers.get(PROVIDER_KEY_HEADER)
    if value is None and not auth.enabled:
        value = headers.get("Authorization")
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" and rest.strip() else value.strip()
    if auth.enabled and auth.is_inbound(key):
        raise InvalidRequestError(f"{PROVIDER_KEY_HEADER} holds one of tiergate's own keys: send the "
                                  "provider's key there (tiergate's key goes in Authorization)",
                                  param=PROVIDER_KEY_HEADER.lower(), code="invalid_provider_key")
    return key
