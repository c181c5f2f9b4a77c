"""Inbound authentication: bearer keys a client must present on `/v1/*` when keys are configured.

Keys come from `TIERGATE_API_KEYS` (comma list) and/or `TIERGATE_API_KEYS_FILE` (one a line).
Every configured key is compared in constant time, and all of them are always compared, so
neither the timing nor the number of comparisons tells a caller which key came close.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from .types import AuthenticationError, ConfigError


class InboundAuth:
    """Checks an `Authorization: Bearer <key>` header against the configured keys."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str]):
        self._keys = tuple(k.encode() for k in keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise AuthenticationError (401) unless `authorization` carries a configured key."""
        if not self._keys:
            return
        if not authorization:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>' "
                                      "with one of the keys in TIERGATE_API_KEYS")
        scheme, _, presented = authorization.partition(" ")
        candidate = presented.strip().encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(key, candidate)
        if scheme.lower() != "bearer" or not matched:
            raise AuthenticationError("invalid API key: the bearer key is not one of TIERGATE_API_KEYS")


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
