"""Inbound keys as values: what a key is (its name, expiry, scopes, per-provider credentials), how a
secret is made and stored (its SHA-256 only, and a short prefix to know it by), and which calls a
key's scopes allow. No I/O: the keys come from the environment, the keys file or Postgres
(`keystore.py`), and the edge looks a presented key up here.

A key's scopes restrict what it may reach. A named route (`use_case:tier`, also reached by `model`,
the routing headers or an alias naming it) is allowed when it is in `routes`, or when its use case and
tier pass `use_cases` and `tiers` (either may be left open); a call naming a model directly (an alias,
a group, a `provider/model`, a plain name passed through) when that name is in `models`, where `provider/*`
allows every model of that provider and the calls passed through to it without a model (files,
batches, ...). A key with no scope at all reaches everything, as a key always has.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..types import ModelTier, PermissionDeniedError, UseCase

SECRET_PREFIX = "tg-"
SHOWN = 9  # characters of a secret `keys list` shows: tg- and six of its 256 random bits' 43 characters
KEY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
SCOPE_FIELDS = ("routes", "use_cases", "tiers", "models")
# what a key may send a provider instead of tiergate's own: the provider enforces ownership then
# (lower-case header names: the forwarded client headers are, and the key's must replace them)
CREDENTIAL_FIELDS = {"project": "openai-project", "organization": "openai-organization", "api_key_env": None}
_USE_CASES = frozenset(u.value for u in UseCase)
_TIERS = frozenset(t.value for t in ModelTier)
_NAMED_MODELS = ("alias:", "group:")  # decisions a model name of the table's makes


def new_secret() -> str:
    """A new key: `tg-` and 256 random bits, URL-safe."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str | bytes) -> bytes:
    """What is stored of a secret, and what a presented key is looked up by."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape") if isinstance(secret, str) else secret).digest()


def shown(prefix: str) -> str:
    """How `keys list` names a secret: its first characters and an ellipsis."""
    return f"{prefix}…"


@dataclass(frozen=True, slots=True)
class KeyScope:
    """What a key may reach (None: that field does not restrict)."""

    routes: frozenset[str] | None = None
    use_cases: frozenset[str] | None = None
    tiers: frozenset[str] | None = None
    models: frozenset[str] | None = None

    def allows(self, decision: Any) -> bool:
        """Whether a call resolved to `decision` (a RouteDecision) is inside this scope."""
        name = decision.name
        if name.startswith(_NAMED_MODELS):  # an alias (even one with a route of its own) or a group: a model name
            return self.models is not None and name.partition(":")[2] in self.models
        route = decision.route
        if route is not None:  # a named route, however it was named
            if self.routes is not None and route.name in self.routes:
                return True
            if self.use_cases is None and self.tiers is None:
                return False
            return ((self.use_cases is None or route.use_case.value in self.use_cases)
                    and (self.tiers is None or route.tier.value in self.tiers))
        if not decision.candidates:  # answered by tiergate itself (its model list)
            return True
        models = self.models
        if models is None:
            return False
        ref = decision.candidates[0]
        if f"{ref.provider}/*" in models:
            return True
        if ref.model == "-":  # passed through without a model
            return False
        return str(ref) in models or (name == "passthrough" and ref.model in models)

    def describe(self) -> str:
        """What is allowed, for a 403's message and `keys list`."""
        parts = [f"{f.replace('_', ' ')}: {', '.join(sorted(getattr(self, f)))}" for f in SCOPE_FIELDS
                 if getattr(self, f) is not None]
        return "; ".join(parts)

    def refusal(self, decision: Any, key_name: str | None) -> PermissionDeniedError:
        named = decision.name.startswith(_NAMED_MODELS)
        what = decision.route.name if decision.route is not None and not named else _named(decision)
        return PermissionDeniedError(f"the key {key_name or '(unnamed)'} may not use {what}; it may use "
                                     f"{self.describe() or 'nothing'}", code="key_scope")


def _named(decision: Any) -> str:
    if decision.name.startswith(_NAMED_MODELS):
        return f"the model {decision.name.partition(':')[2]!r}"
    ref = decision.candidates[0] if decision.candidates else None
    if ref is None or ref.model == "-":
        return f"calls passed through to {ref.provider if ref else 'a provider'} without a model"
    return f"the model {str(ref)!r}"


@dataclass(frozen=True, slots=True)
class InboundKey:
    """One key tiergate accepts. `expires_at`: a time.time() after which it is refused (None: never).
    `credentials`: per provider name, the headers the key's calls send it instead of the client's and
    tiergate's (OpenAI-Project, OpenAI-Organization, Authorization with the key's own provider key)."""

    name: str | None
    expires_at: float | None = None
    scope: KeyScope | None = None
    credentials: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def check(self, decision: Any) -> None:
        """Raise PermissionDeniedError (403) unless `decision` is inside the key's scope."""
        scope = self.scope
        if scope is not None and not scope.allows(decision):
            raise scope.refusal(decision, self.name)


def parse_scope(raw: Mapping[str, Any]) -> KeyScope | None:
    """Scope fields (lists of names, or comma-separated strings) -> a KeyScope; None when none is set.
    ValueError names the field and the bad value."""
    values: dict[str, frozenset[str]] = {}
    for name in SCOPE_FIELDS:
        given = raw.get(name)
        if given is None:
            continue
        items = [s.strip() for s in (given.split(",") if isinstance(given, str) else given) if str(s).strip()]
        if name != "models":
            items = [s.lower() for s in items]
        for item in items:
            _check_scope_item(name, item)
        values[name] = frozenset(items)
    return KeyScope(**values) if values else None


def _check_scope_item(field_name: str, item: str) -> None:
    if field_name == "use_cases" and item not in _USE_CASES:
        raise ValueError(f"use_cases: {item!r} is not one of {', '.join(sorted(_USE_CASES))}")
    if field_name == "tiers" and item not in _TIERS:
        raise ValueError(f"tiers: {item!r} is not one of {', '.join(sorted(_TIERS))}")
    if field_name == "routes":
        use_case, sep, tier = item.partition(":")
        if not sep or use_case not in _USE_CASES or tier not in _TIERS:
            raise ValueError(f"routes: {item!r} is not use_case:tier")
    if field_name == "models" and (len(item) > 256 or any(c in item for c in "\r\n\0")):
        raise ValueError(f"models: {item[:40]!r}... is not a model name")


def parse_credentials(raw: Any) -> dict[str, dict[str, str]]:
    """`{provider: {project, organization, api_key_env}}`, checked: ValueError names what is wrong."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError("credentials: a mapping of provider name to {project, organization, api_key_env}")
    out: dict[str, dict[str, str]] = {}
    for provider, entry in raw.items():
        if not isinstance(entry, Mapping) or not entry:
            raise ValueError(f"credentials.{provider}: a mapping with project, organization and/or api_key_env")
        unknown = set(entry) - CREDENTIAL_FIELDS.keys()
        if unknown:
            raise ValueError(f"credentials.{provider}.{sorted(unknown)[0]}: unknown (allowed: "
                             f"{', '.join(CREDENTIAL_FIELDS)})")
        for key, value in entry.items():
            if not isinstance(value, str) or not value or any(c in value for c in "\r\n\0"):
                raise ValueError(f"credentials.{provider}.{key}: a non-empty string on one line")
        out[str(provider)] = {str(k): str(v) for k, v in entry.items()}
    return out


def credential_headers(credentials: Mapping[str, Mapping[str, str]], env: Mapping[str, str]
                       ) -> dict[str, dict[str, str]]:
    """Per provider, the headers a key's calls carry: OpenAI-Project / OpenAI-Organization as given, and
    `Authorization: Bearer <key>` from the environment variable `api_key_env` names (left out, with the
    provider's own key used, when that variable is unset; an OpenAI-compatible provider's header)."""
    out: dict[str, dict[str, str]] = {}
    for provider, entry in credentials.items():
        headers: dict[str, str] = {}
        for key, value in entry.items():
            header = CREDENTIAL_FIELDS[key]
            if header is not None:
                headers[header] = value
            elif env.get(value):
                headers["authorization"] = f"Bearer {env[value]}"
        if headers:
            out[provider] = headers
    return out


def check_name(name: str) -> str:
    if not KEY_NAME.match(name):
        raise ValueError(f"key name {name!r}: letters, digits and _.- (starting with a letter, at most 64)")
    return name


def secrets_of_credentials(credentials: Mapping[str, Mapping[str, str]]) -> list[str]:
    """What a key sends providers in tiergate's place, for redaction (its provider keys without their
    `Bearer `, projects and organizations: none is ever echoed to a client)."""
    return [value.partition(" ")[2] if name == "authorization" else value
            for headers in credentials.values() for name, value in headers.items()]
