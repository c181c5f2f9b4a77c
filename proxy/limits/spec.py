"""What a limit is: the `limits:` entries of the table (`llm_limits` in Postgres), parsed and checked,
the counters each one needs, which of them apply to a request, and the errors a refusal raises.

A limit caps requests per minute, tokens per minute (input + output) and/or USD per day and per
month, for the requests its scope matches: an inbound key's name, a use case, a tier, a route, a
model (the route's first candidate), or a combination (every field given must match).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..types import ModelRef, ModelTier, RateLimitError, TiergateError, UseCase

# kind -> (window code, unit for messages)
KINDS: dict[str, tuple[str, str]] = {
    "requests_per_minute": ("w", "requests per minute"),
    "tokens_per_minute": ("w", "tokens per minute"),
    "usd_per_day": ("d", "USD per day"),
    "usd_per_month": ("m", "USD per month"),
}
SCOPE_FIELDS = ("key", "use_case", "tier", "route", "model")
LIMIT_KEYS = frozenset({"name", *SCOPE_FIELDS, *KINDS, "on_budget_exceeded", "enabled"})
_NAME = re.compile(r"^[A-Za-z0-9_.:=,/@+-]{1,128}$")
_USE_CASES = {u.value: u for u in UseCase}
_TIERS = {t.value: t for t in ModelTier}
_MEMO_LIMIT = 4096


class BudgetExceededError(RateLimitError):
    """A spend budget is used up until its window rolls."""

    code = "budget_exceeded"


class LimitExceededError(RateLimitError):
    code = "rate_limit_exceeded"


class LimitsUnavailableError(TiergateError):
    """Redis is unreachable and the policy is `fail_closed`."""

    status = 503
    error_type = "service_unavailable"
    code = "limits_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class FleetUnavailable(Exception):
    """The shared backend could not answer in time (raised by `fleet.FleetLimits`)."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One entry of `limits:`. Scope fields that are None match anything."""

    name: str
    key: str | None = None
    use_case: UseCase | None = None
    tier: ModelTier | None = None
    route: str | None = None
    model: ModelRef | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    usd_per_day: float | None = None
    usd_per_month: float | None = None
    on_budget_exceeded: ModelTier | None = None

    def scope(self) -> dict[str, str]:
        return {f: str(getattr(self, f)) for f in SCOPE_FIELDS if getattr(self, f) is not None}

    def matches(self, key: str | None, route_name: str, use_case: UseCase | None, tier: ModelTier | None,
                model: ModelRef | None) -> bool:
        return ((self.key is None or self.key == key)
                and (self.route is None or self.route == route_name)
                and (self.use_case is None or self.use_case == use_case)
                and (self.tier is None or self.tier == tier)
                and (self.model is None or self.model == model))


class Check(NamedTuple):
    """One counter of one limit: `kind` of `spec`, capped at `limit`, counted under `key` in Redis."""

    spec: LimitSpec
    kind: str
    window: str  # w (sliding minute), d (UTC day), m (UTC month)
    limit: float
    key: str  # the counter's name (the backend prefixes its namespace)

    def __hash__(self) -> int:
        # the counter's name is unique in a table; hashing the spec would hash its twelve fields
        # each time a tuple of checks keys a memo (every admission)
        return hash(self.key)

    @property
    def is_budget(self) -> bool:
        return self.window != "w"

    @property
    def label(self) -> str:
        return f"{self.spec.name}/{self.kind}"


def parse_limits(raw: Any, providers: Iterable[str]) -> tuple[list[LimitSpec], list[str]]:
    """The `limits:` section: valid entries, and a problem per bad entry (naming its index and key)."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], ["limits: must be a list of {name, scope fields, requests_per_minute, ...}"]
    specs: list[LimitSpec] = []
    problems: list[str] = []
    names: dict[str, int] = {}
    known = set(providers)
    for i, entry in enumerate(raw):
        try:
            spec = parse_limit(entry, known)
        except ValueError as exc:
            problems.append(f"limits[{i}].{exc}")
            continue
        if spec is None:
            continue
        if spec.name in names:
            problems.append(f"limits[{i}].name: {spec.name!r} is used twice (first at limits[{names[spec.name]}])")
            continue
        names[spec.name] = i
        specs.append(spec)
    return specs, problems


def parse_limit(raw: Any, providers: set[str]) -> LimitSpec | None:
    """One limit; None when `enabled: false`. ValueError names the key."""
    if not isinstance(raw, dict):
        raise ValueError("name: a limit is a mapping with scope fields and at least one of "
                         + ", ".join(KINDS))
    unknown = set(raw) - LIMIT_KEYS
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (allowed: {', '.join(sorted(LIMIT_KEYS))})")
    if raw.get("enabled") is False:
        return None
    values: dict[str, Any] = {}
    if raw.get("key") is not None:
        values["key"] = str(raw["key"])
    if raw.get("use_case") is not None:
        use_case = _USE_CASES.get(str(raw["use_case"]).lower())
        if use_case is None:
            raise ValueError(f"use_case: {raw['use_case']!r} is not one of {', '.join(_USE_CASES)}")
        values["use_case"] = use_case
    if raw.get("tier") is not None:
        values["tier"] = _tier(raw["tier"], "tier")
    if raw.get("route") is not None:
        values["route"] = str(raw["route"]).strip().lower()
    if raw.get("model") is not None:
        try:
            ref = ModelRef.parse(str(raw["model"]))
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from None
        if ref.provider not in providers:
            raise ValueError(f"model: {raw['model']!r} names provider {ref.provider!r}, which is not defined")
        values["model"] = ref
    for kind in KINDS:
        value = raw.get(kind)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{kind}: {value!r} is not a number of zero or more")
        if kind in ("requests_per_minute", "tokens_per_minute"):
            if float(value) != int(value):
                raise ValueError(f"{kind}: {value!r} is not a whole number")
            value = int(value)
        values[kind] = value
    if not any(k in values for k in KINDS):
        raise ValueError(f"name: a limit needs at least one of {', '.join(KINDS)}")
    if raw.get("on_budget_exceeded") is not None:
        target = str(raw["on_budget_exceeded"]).strip().lower()
        if target not in ("reject", "429"):
            values["on_budget_exceeded"] = _tier(target, "on_budget_exceeded")
    name = raw.get("name")
    if name is None:  # named by its scope: stable while the scope is
        scope = ",".join(f"{f}={values[f]}" for f in SCOPE_FIELDS if f in values)
        name = scope or "global"
    name = str(name)
    if not _NAME.match(name):
        raise ValueError(f"name: {name!r} may hold letters, digits and _.:=,/@+- (at most 128)")
    return LimitSpec(name=name, **values)


def _tier(raw: Any, field: str) -> ModelTier:
    tier = _TIERS.get(str(raw).strip().lower())
    if tier is None:
        raise ValueError(f"{field}: {raw!r} is not one of {', '.join(_TIERS)}")
    return tier


def limit_rows(specs: Iterable[LimitSpec]) -> list[dict[str, Any]]:
    """Limits as plain rows (the table's `describe`, the CLI, `llm_limits` seeding)."""
    rows = []
    for spec in specs:
        row: dict[str, Any] = {"name": spec.name, **spec.scope()}
        for kind in KINDS:
            if getattr(spec, kind) is not None:
                row[kind] = getattr(spec, kind)
        if spec.on_budget_exceeded is not None:
            row["on_budget_exceeded"] = spec.on_budget_exceeded.value
        rows.append(row)
    return rows


class LimitIndex:
    """The limits of one table snapshot, and which counters apply to a request (memoised)."""

    def __init__(self, specs: Iterable[LimitSpec]):
        self.specs = tuple(specs)
        self.checks: tuple[Check, ...] = tuple(
            Check(spec, kind, KINDS[kind][0], float(getattr(spec, kind)), f"{spec.name}:{kind}")
            for spec in self.specs for kind in KINDS if getattr(spec, kind) is not None)
        self._memo: dict[tuple[Any, ...], tuple[Check, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def applicable(self, key: str | None, decision: Any) -> tuple[Check, ...]:
        route = decision.route
        first = decision.candidates[0] if decision.candidates else None
        memo_key = (key, decision.name, first)
        found = self._memo.get(memo_key)
        if found is None:
            use_case = route.use_case if route is not None else None
            tier = route.tier if route is not None else None
            found = tuple(c for c in self.checks if c.spec.matches(key, decision.name, use_case, tier, first))
            if len(self._memo) >= _MEMO_LIMIT:  # clients may name any model: stay bounded
                self._memo.clear()
            self._memo[memo_key] = found
        return found
