"""Inbound keys and provider credentials kept apart.

A provider key that is also one of tiergate's inbound keys (or holds one, or is held in one) hands
whoever holds the inbound key the provider account, and every answer tiergate masks for the provider's
sake would mask the client's own key too. Such a table, or such a keys file, is refused: at start-up,
and on a live reload, which then keeps what is running. Neither key is ever quoted, only the key's
name and the provider's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..settings import RouterConfig
from ..table.routing import ProviderSpec
from ..types import ConfigError
from .providers import provider_secrets

# an entry of TIERGATE_API_KEYS: `name=key` or a bare key (the form the edge's parse_key reads)
_NAMED = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]{0,63})=(?!=)(.+)$")
_MIN_OVERLAP = 8  # shorter values are compared whole only (a substring that short is no secret of either)


def check_keys_apart(inbound: Iterable[str], providers: Mapping[str, ProviderSpec], config: RouterConfig) -> None:
    """Raise ConfigError when an inbound key equals, contains or is contained in a credential tiergate
    sends a provider (its key, the table's secret header values)."""
    keys = [_key(entry) for entry in inbound if entry and entry.strip()]
    if not keys:
        return
    for name, spec in providers.items():
        for secret in provider_secrets(spec, config):
            if not secret:
                continue
            for key_name, key in keys:
                if _overlap(key, secret):
                    raise ConfigError(
                        f"provider {name!r}: a credential tiergate sends it is also the inbound key "
                        f"{_label(key_name)}, or part of it: give tiergate's clients keys of their own "
                        "(an inbound key must never be a provider's key)", param=f"providers.{name}")


def check_stored_keys_apart(by_digest: Mapping[bytes, Any], providers: Mapping[str, ProviderSpec],
                            config: RouterConfig) -> None:
    """The same for the keys stored in Postgres, which are known by their SHA-256 only: a provider
    credential equal to one of them is refused (a part of one cannot be told from a digest)."""
    if not by_digest:
        return
    for name, spec in providers.items():
        for secret in provider_secrets(spec, config):
            if secret:
                key = by_digest.get(hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest())
                if key is not None:
                    raise ConfigError(
                        f"provider {name!r}: a credential tiergate sends it is also the stored inbound key "
                        f"{_label(getattr(key, 'name', None))}: give tiergate's clients keys of their own (an "
                        "inbound key must never be a provider's key)", param=f"providers.{name}")


def _key(entry: str) -> tuple[str | None, str]:
    found = _NAMED.match(entry.strip())
    return (found.group(1), found.group(2).strip()) if found else (None, entry.strip())


def _overlap(key: str, secret: str) -> bool:
    if key == secret:
        return True
    if len(key) < _MIN_OVERLAP or len(secret) < _MIN_OVERLAP:
        return False
    return key in secret or secret in key


def _label(name: str | None) -> str:
    return repr(name) if name else "(unnamed)"
