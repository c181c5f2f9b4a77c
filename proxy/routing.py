"""The routing table: an immutable snapshot mapping (use case, tier) to models, and its YAML loader.

A request is resolved with one or two dict lookups on precomputed keys; a new table (from the
file or from Postgres) is a new snapshot swapped in whole, so a request never sees a mix.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .quotas import LimitIndex, parse_limits
from .types import (
    CACHE_POLICIES,
    DEFAULT_TIER,
    DEFAULT_USE_CASE,
    ConfigError,
    ModelRef,
    ModelTier,
    Route,
    UnknownRouteError,
    UseCase,
)

PROVIDER_KINDS = ("openai", "mock")
DEFAULT_MODEL_NAMES = frozenset({"", "auto", "default", "tiergate"})
_KEYED = re.compile(r"^[a-z_]+(\[\d+\])?: ")
_USE_CASES = {u.value: u for u in UseCase}
_TIERS = {t.value: t for t in ModelTier}


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """How to reach one provider. The key itself is resolved when the provider starts."""

    name: str
    base_url: str = ""
    kind: str = "openai"
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    api_key_header: str = "Authorization"
    headers: tuple[tuple[str, str], ...] = ()
    failure_threshold: int | None = None
    recovery_timeout: float | None = None
    max_concurrency: int | None = None
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one request goes: the route's name, its candidates in order, and its defaults."""

    name: str
    candidates: tuple[ModelRef, ...]
    route: Route | None = None


@dataclass(frozen=True)
class Pricing:
    """USD per million tokens."""

    input: float
    output: float


class RoutingTable:
    """An immutable snapshot of providers, aliases and routes with O(1) resolution."""

    def __init__(
        self,
        providers: Mapping[str, ProviderSpec],
        routes: Iterable[Route],
        aliases: Mapping[str, ModelRef] | None = None,
        pricing: Mapping[str, Pricing] | None = None,
        *,
        source: str = "memory",
        problems: Iterable[str] = (),
        allow_model_override: bool = True,
        limits: LimitIndex | None = None,
    ):
        self.providers: dict[str, ProviderSpec] = dict(providers)
        self.routes: dict[tuple[UseCase, ModelTier], Route] = {(r.use_case, r.tier): r for r in routes}
        if not self.routes:
            raise ConfigError(f"{source}: routes: the table has no route")
        self.aliases: dict[str, ModelRef] = dict(aliases or {})
        self.pricing: dict[str, Pricing] = dict(pricing or {})
        self.source = source
        self.problems: tuple[str, ...] = tuple(problems)
        self.allow_model_override = allow_model_override
        self.loaded_at = time.time()
        # rate limits and budgets (quotas.py); None when the table has none: one falsy check per request
        self.limits: LimitIndex | None = limits if limits else None

        default = self.routes.get((DEFAULT_USE_CASE, DEFAULT_TIER)) or next(iter(self.routes.values()))
        self.default = RouteDecision(default.name, default.candidates, default)
        decisions = {key: RouteDecision(r.name, r.candidates, r) for key, r in self.routes.items()}
        # header lookups: (use_case, tier) strings -> decision, for every valid pair
        self._by_pair: dict[tuple[str, str], RouteDecision] = {}
        for uc in UseCase:
            for tier in ModelTier:
                self._by_pair[(uc.value, tier.value)] = decisions.get((uc, tier), self.default)
        # body `model` lookups: "use_case:tier", "use_case", aliases, default names
        self._by_model: dict[str, RouteDecision] = {name: self.default for name in DEFAULT_MODEL_NAMES}
        for (uc, tier), decision in self._by_pair.items():
            self._by_model[f"{uc}:{tier}"] = decision
        for uc in UseCase:
            self._by_model[uc.value] = self._by_pair[(uc.value, DEFAULT_TIER.value)]
        for alias, ref in self.aliases.items():
            self._by_model[alias] = RouteDecision(f"alias:{alias}", (ref,))

    # -- resolution (hot path) ------------------------------------------------------------

    def resolve(self, use_case: str | None, tier: str | None, model: Any) -> RouteDecision:
        """Headers first, then the body's `model`, then the default route."""
        if use_case is not None or tier is not None:
            key = ((use_case or DEFAULT_USE_CASE.value).strip().lower(),
                   (tier or DEFAULT_TIER.value).strip().lower())
            decision = self._by_pair.get(key)
            if decision is None:
                raise self._unknown_pair(*key)
            return decision
        if model is None:
            return self.default
        decision = self._by_model.get(model)
        if decision is not None:
            return decision
        return self._resolve_model(model)

    def _resolve_model(self, model: str) -> RouteDecision:
        decision = self._by_model.get(model.strip().lower())
        if decision is not None:
            return decision
        provider, sep, model_id = model.partition("/")
        if sep and model_id and provider in self.providers:
            if not self.allow_model_override:
                raise UnknownRouteError(
                    f"model override {model!r} is not allowed here; use a route ({self._route_names()})",
                    param="model")
            return RouteDecision("override", (ModelRef(provider, model_id),))
        raise UnknownRouteError(
            f"unknown model {model!r}. Use a route name ({self._route_names()}), "
            f"a use case ({', '.join(_USE_CASES)}), an alias ({', '.join(self.aliases) or 'none'}) "
            f"or provider/model with a provider of {', '.join(self.providers)}",
            param="model")

    def _unknown_pair(self, use_case: str, tier: str) -> UnknownRouteError:
        if use_case not in _USE_CASES:
            return UnknownRouteError(
                f"unknown use case {use_case!r} in X-Use-Case; valid values: {', '.join(_USE_CASES)}",
                param="X-Use-Case", code="unknown_use_case")
        return UnknownRouteError(
            f"unknown tier {tier!r} in X-Model-Tier; valid values: {', '.join(_TIERS)}",
            param="X-Model-Tier", code="unknown_tier")

    def _route_names(self) -> str:
        return ", ".join(r.name for r in self.routes.values())

    # -- inspection ------------------------------------------------------------------------

    def models(self) -> list[ModelRef]:
        """Every concrete model the table can send to, in table order, without repeats."""
        seen: dict[str, ModelRef] = {}
        for route in self.routes.values():
            for ref in route.candidates:
                seen.setdefault(str(ref), ref)
        for ref in self.aliases.values():
            seen.setdefault(str(ref), ref)
        return list(seen.values())

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "route": r.name,
                "model": str(r.model),
                "fallbacks": [str(f) for f in r.fallbacks],
                "max_tokens": r.max_tokens,
                "temperature": r.temperature,
                "system_prompt": r.system_prompt,
                "cache": r.cache,
                "cache_ttl": r.cache_ttl,
            }
            for r in self.routes.values()
        ]

    def age(self) -> float:
        return max(0.0, time.time() - self.loaded_at)


# --- building from plain data (the YAML file, or rows from Postgres) -------------------------


def load_table(path: str | Path, *, allow_model_override: bool = True) -> RoutingTable:
    """Load and validate a routing table file; a problem raises ConfigError naming file and key."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the routing table: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return table_from_dict(doc, source=f"file:{p}", strict=True,
                           allow_model_override=allow_model_override)


def table_from_dict(
    doc: Any,
    *,
    source: str,
    strict: bool = True,
    allow_model_override: bool = True,
) -> RoutingTable:
    """Build a table from `{providers, aliases, routes, pricing}`.

    strict: every problem is collected and raised together as one ConfigError (the file).
    not strict: a bad route or provider is left out and noted in `table.problems` (Postgres rows).
    """
    label = source.removeprefix("file:")
    if not isinstance(doc, dict):
        raise ConfigError(f"{label}: the routing table must be a mapping with providers and routes")
    problems: list[str] = []

    providers: dict[str, ProviderSpec] = {}
    raw_providers = doc.get("providers") or {}
    if not isinstance(raw_providers, dict):
        raise ConfigError(f"{label}: providers: must be a mapping of name to settings", param="providers")
    for name, raw in raw_providers.items():
        try:
            providers[str(name)] = parse_provider(str(name), raw)
        except ValueError as exc:
            problems.append(f"providers.{name}: {exc}")

    aliases: dict[str, ModelRef] = {}
    raw_aliases = doc.get("aliases") or {}
    if not isinstance(raw_aliases, dict):
        problems.append("aliases: must be a mapping of alias to provider/model")
        raw_aliases = {}
    for alias, ref in raw_aliases.items():
        try:
            aliases[str(alias)] = _model_ref(ref, providers)
        except ValueError as exc:
            problems.append(f"aliases.{alias}: {exc}")

    pricing: dict[str, Pricing] = {}
    raw_pricing = doc.get("pricing") or {}
    if not isinstance(raw_pricing, dict):
        problems.append("pricing: must be a mapping of provider/model to {input, output}")
        raw_pricing = {}
    for ref, price in raw_pricing.items():
        try:
            if not isinstance(price, dict):
                raise ValueError("must be {input: USD per 1M tokens, output: USD per 1M tokens}")
            pricing[str(ref)] = Pricing(float(price.get("input", 0)), float(price.get("output", 0)))
        except (TypeError, ValueError) as exc:
            problems.append(f"pricing.{ref}: {exc}")

    routes: list[Route] = []
    seen: dict[tuple[UseCase, ModelTier], int] = {}
    raw_routes = doc.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        problems.append("routes: must be a non-empty list of {use_case, tier, model, ...}")
        raw_routes = []
    for i, raw in enumerate(raw_routes):
        where = f"routes[{i}]"
        try:
            route = parse_route(raw, providers)
        except ValueError as exc:
            sep = "." if _KEYED.match(str(exc)) else ": "
            problems.append(f"{where}{sep}{exc}")
            continue
        if route is None:  # disabled
            continue
        key = (route.use_case, route.tier)
        if key in seen:
            problems.append(f"{where}: duplicate route {route.name} (first at routes[{seen[key]}])")
            continue
        seen[key] = i
        routes.append(route)

    limits, limit_problems = parse_limits(doc.get("limits"), providers)
    problems += limit_problems

    if problems and strict:
        raise ConfigError(f"{label}: " + f"\n{label}: ".join(problems))
    if not routes:
        raise ConfigError(f"{label}: routes: no valid route" + (f" ({'; '.join(problems)})" if problems else ""))
    return RoutingTable(providers, routes, aliases, pricing, source=source, problems=problems,
                        allow_model_override=allow_model_override, limits=LimitIndex(limits))


def parse_provider(name: str, raw: Any) -> ProviderSpec:
    if not isinstance(raw, dict):
        raise ValueError("must be a mapping with base_url (or kind: mock)")
    allowed = {"base_url", "kind", "api_key", "api_key_env", "api_key_header", "headers",
               "failure_threshold", "recovery_timeout", "max_concurrency", "models"}
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(allowed))})")
    if "/" in name or not name:
        raise ValueError("a provider name may not be empty or contain '/'")
    kind = str(raw.get("kind", "openai"))
    if kind not in PROVIDER_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(PROVIDER_KINDS)}")
    base_url = str(raw.get("base_url") or "").rstrip("/")
    if kind == "openai":
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url: {base_url!r} is not an http(s) URL")
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise ValueError("headers: must be a mapping of header name to value")
    models = raw.get("models") or ()
    if not isinstance(models, (list, tuple)):
        raise ValueError("models: must be a list of model ids")
    return ProviderSpec(
        name=name,
        base_url=base_url,
        kind=kind,
        api_key=_opt_str(raw.get("api_key")),
        api_key_env=_opt_str(raw.get("api_key_env")),
        api_key_header=str(raw.get("api_key_header") or "Authorization"),
        headers=tuple((str(k), str(v)) for k, v in headers.items()),
        failure_threshold=_opt_int(raw, "failure_threshold"),
        recovery_timeout=_opt_float(raw, "recovery_timeout"),
        max_concurrency=_opt_int(raw, "max_concurrency"),
        models=tuple(str(m) for m in models),
    )


ROUTE_KEYS = frozenset({"use_case", "tier", "model", "fallbacks", "max_tokens", "temperature",
                        "system_prompt", "cache", "cache_ttl", "enabled"})


def parse_route(raw: Any, providers: Mapping[str, ProviderSpec]) -> Route | None:
    """One route from a mapping; None when `enabled: false`. ValueError names the key."""
    if not isinstance(raw, dict):
        raise ValueError("must be a mapping with use_case, tier and model")
    unknown = set(raw) - ROUTE_KEYS
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (allowed: {', '.join(sorted(ROUTE_KEYS))})")
    use_case = _USE_CASES.get(str(raw.get("use_case", "")).lower())
    if use_case is None:
        raise ValueError(f"use_case: {raw.get('use_case')!r} is not one of {', '.join(_USE_CASES)}")
    tier = _TIERS.get(str(raw.get("tier", "")).lower())
    if tier is None:
        raise ValueError(f"tier: {raw.get('tier')!r} is not one of {', '.join(_TIERS)}")
    if raw.get("enabled") is False:
        return None
    try:
        model = _model_ref(raw.get("model"), providers)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None
    fallbacks_raw = raw.get("fallbacks") or []
    if not isinstance(fallbacks_raw, (list, tuple)):
        raise ValueError("fallbacks: must be a list of provider/model")
    fallbacks = []
    for j, ref in enumerate(fallbacks_raw):
        try:
            fallbacks.append(_model_ref(ref, providers))
        except ValueError as exc:
            raise ValueError(f"fallbacks[{j}]: {exc}") from None
    max_tokens = _opt_int(raw, "max_tokens")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError("max_tokens: must be a positive whole number")
    temperature = _opt_float(raw, "temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise ValueError("temperature: must be between 0 and 2")
    cache = str(raw.get("cache") or "auto")
    if cache not in CACHE_POLICIES:
        raise ValueError(f"cache: {cache!r} is not one of {', '.join(CACHE_POLICIES)}")
    cache_ttl = _opt_int(raw, "cache_ttl")
    if cache_ttl is not None and cache_ttl < 0:
        raise ValueError("cache_ttl: must be zero or more seconds")
    return Route(use_case, tier, model, tuple(fallbacks), max_tokens, temperature,
                 _opt_str(raw.get("system_prompt")), cache, cache_ttl)


def _model_ref(raw: Any, providers: Mapping[str, ProviderSpec]) -> ModelRef:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{raw!r} is not a provider/model reference")
    ref = ModelRef.parse(raw.strip())
    if ref.provider not in providers:
        raise ValueError(f"{raw!r} names provider {ref.provider!r}, which is not defined "
                         f"(providers: {', '.join(providers) or 'none'})")
    return ref


def _opt_str(raw: Any) -> str | None:
    return None if raw is None or raw == "" else str(raw)


def _opt_int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key}: {value!r} is not a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: {value!r} is not a whole number") from None


def _opt_float(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{key}: {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: {value!r} is not a number") from None
