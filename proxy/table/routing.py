"""The routing table: an immutable snapshot mapping (use case, tier) to models, and its YAML loader.

A request is resolved with one or two dict lookups on precomputed keys; a new table (from the
file or from Postgres) is a new snapshot swapped in whole, so a request never sees a mix.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..limits.spec import LimitIndex, parse_limits
from ..protocol.usage import Usage, cost_usd, price_for
from ..types import (
    CACHE_POLICIES,
    CACHE_SCOPES,
    DEFAULT_TIER,
    DEFAULT_USE_CASE,
    ConfigError,
    Group,
    InvalidRequestError,
    ModelRef,
    ModelTier,
    Route,
    Shadow,
    UnknownRouteError,
    UseCase,
)
from ..urls import parse_url, redact_credentials
from .groups import alias_target, expand_route, parse_groups

PROVIDER_KINDS = ("openai", "mock", "anthropic")
# what a provider may serve; an `openai` provider serves OpenAI's APIs unless its `apis` says otherwise
# (`messages` added: it speaks Anthropic's Messages API too), the in-process `mock` kind speaks no
# Responses API (its Responses calls are translated to chat), an `anthropic` provider speaks Messages
API_NAMES = ("chat", "completions", "embeddings", "responses", "messages")
DEFAULT_APIS = {"openai": API_NAMES[:4], "mock": API_NAMES[:3], "anthropic": ("messages",)}
# the header an `anthropic` provider reads its key from, unless the table names another
ANTHROPIC_KEY_HEADER = "x-api-key"
DEFAULT_MODEL_NAMES = frozenset({"", "auto", "default", "tiergate"})
# the longest `model` a client may send: a name past it is no model of anyone's, and would otherwise
# reach the request log, response headers and traces as sent
MAX_MODEL_NAME = 256
_KEYED = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+)*: ")
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
    first_byte_timeout: float | None = None
    pass_client_key: bool = False  # bring-your-own-key: the client's own key goes upstream, in api_key_header
    # streams: ask for the usage event (`stream_options.include_usage`) even when the client does not
    stream_usage: bool = True
    # how it continues an assistant message it is given (a stream recovered mid-answer): `prefix`
    # (`"prefix": true` on the last assistant message), `continue_final_message` (vLLM), `instruction`
    continuation: str = "instruction"
    apis: tuple[str, ...] = API_NAMES[:4]  # OpenAI's: chat, completions, embeddings, responses

    @property
    def serves_responses(self) -> bool:
        return "responses" in self.apis

    @property
    def serves_messages(self) -> bool:
        return "messages" in self.apis


@dataclass(frozen=True, slots=True)
class ParamRule:
    """What a model does not accept: request fields dropped, fields renamed, and how long it may
    think before its first chunk. Applied per attempt, so a fallback of another family gets its own.
    `continuation`: how the model continues an answer a recovery hands it (one of CONTINUATIONS, or
    `none`: never asked to); None takes its provider's."""

    drop: frozenset[str] = frozenset()
    rename: tuple[tuple[str, str], ...] = ()
    first_byte_timeout: float | None = None
    continuation: str | None = None
    context_window: int | None = None  # tokens the model takes, prompt and answer; None: not known

    def apply(self, payload: dict[str, Any]) -> dict[str, Any]:
        if not self.drop and not self.rename:
            return payload
        out = {k: v for k, v in payload.items() if k not in self.drop}
        for old, new in self.rename:
            if old in out:
                value = out.pop(old)
                out.setdefault(new, value)
        return out


# What the common reasoning families refuse (OpenAI o-series, gpt-5): sampling parameters are fixed
# and `max_tokens` is `max_completion_tokens`. First match wins; a table's `model_rules` come first.
_REASONING_DROP = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs",
                             "top_logprobs", "logit_bias"})
_REASONING = ParamRule(_REASONING_DROP, (("max_tokens", "max_completion_tokens"),), 120.0)
BUILTIN_MODEL_RULES: tuple[tuple[str, ParamRule], ...] = (
    ("gpt-5-chat*", ParamRule()),
    ("o1*", _REASONING), ("o3*", _REASONING), ("o4*", _REASONING), ("gpt-5*", _REASONING),
)


def match_rule(ref: ModelRef, rules: Iterable[tuple[str, ParamRule]]) -> ParamRule | None:
    """The first rule whose pattern matches `provider/model`, the model id, or its last segment
    (`openrouter/openai/o3-mini` is matched by `o3*`)."""
    full = f"{ref.provider}/{ref.model}".lower()
    model = ref.model.lower()
    last = model.rsplit("/", 1)[-1]
    for pattern, rule in rules:
        if fnmatch.fnmatchcase(last, pattern) or fnmatch.fnmatchcase(model, pattern) \
                or fnmatch.fnmatchcase(full, pattern):
            return rule
    return None


@dataclass(frozen=True, slots=True, eq=False)  # compared and hashed by identity: a decision is made once
class RouteDecision:
    """Where one request goes: the route's name, its candidates in order, and its defaults.

    `plans` holds, per candidate that has one, its ParamRule (fields it refuses, its first-byte
    budget): empty for the usual candidate, so the attempt loop pays one dict lookup."""

    name: str
    candidates: tuple[ModelRef, ...]
    route: Route | None = None
    plans: Mapping[ModelRef, ParamRule] = field(default_factory=dict)
    # a route ordered per request: its candidates as its strategy sees them (groups among them), and the
    # prices of their deployments (`cheapest`); empty for the usual route, planned once
    layout: tuple[Group, ...] = ()
    strategy: str = "ordered"
    prices: Mapping[ModelRef, Pricing] = field(default_factory=dict)


@dataclass(frozen=True)
class Pricing:
    """USD per million tokens; `cached_input` for input tokens served from the provider's prompt cache,
    `cache_write` for those written to it (Anthropic charges both apart from input; None: priced as `input`)."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None


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
        model_rules: Iterable[tuple[str, ParamRule]] = (),
        embeddings: tuple[ModelRef, ...] = (),
        passthrough_provider: str | None = None,
        passthrough_paths: Mapping[str, str] | None = None,
        limits: LimitIndex | None = None,
        context_windows: Mapping[str, int] | None = None,
        groups: Mapping[str, Group] | None = None,
        alias_routes: Mapping[str, Route | str] | None = None,
    ):
        self.providers: dict[str, ProviderSpec] = dict(providers)
        self.model_rules: tuple[tuple[str, ParamRule], ...] = (*model_rules, *BUILTIN_MODEL_RULES)
        self.embeddings = embeddings
        self.routes: dict[tuple[UseCase, ModelTier], Route] = {(r.use_case, r.tier): r for r in routes}
        if not self.routes:
            raise ConfigError(f"{source}: routes: the table has no route")
        self.aliases: dict[str, ModelRef] = dict(aliases or {})
        self.pricing: dict[str, Pricing] = dict(pricing or {})
        self.source = source
        self.problems: tuple[str, ...] = tuple(problems)
        self.allow_model_override = allow_model_override
        # where model names the table does not know, and `/v1/*` paths tiergate does not serve, go
        self.passthrough_provider = passthrough_provider
        # longest prefix first, so that `/v1/audio/speech` wins over `/v1/audio/`
        self.passthrough_paths: tuple[tuple[str, str], ...] = tuple(
            sorted((passthrough_paths or {}).items(), key=lambda kv: -len(kv[0])))
        self.loaded_at = time.time()
        # rate limits and budgets (proxy/limits); None when the table has none: one falsy check per request
        self.limits: LimitIndex | None = limits if limits else None
        # provider/model -> its context window in tokens (the table's `context_windows`, discovery's listing)
        self.context_windows: dict[str, int] = dict(context_windows or {})
        # some provider speaks no Chat Completions (`kind: anthropic`): a chat call's plan asks the endpoint
        # which candidates need a translation; otherwise chat is planned once per decision
        self.mixed_apis = any("chat" not in spec.apis for spec in self.providers.values())

        self._plans: dict[ModelRef, ParamRule] = {}
        self._prices: dict[ModelRef, Pricing | None] = {}  # per model, looked up once (see `price`)
        default = self.routes.get((DEFAULT_USE_CASE, DEFAULT_TIER)) or next(iter(self.routes.values()))
        self.default = self._decision(default.name, default.candidates, default)
        decisions = {key: self._decision(r.name, r.candidates, r) for key, r in self.routes.items()}
        # header lookups: (use_case, tier) strings -> decision, for every valid pair
        self._by_pair: dict[tuple[str, str], RouteDecision] = {}
        # per kind of call other than chat: the route's own models for it, else the table's (embeddings)
        self._by_kind: dict[str, dict[tuple[str, str], RouteDecision | None]] = {"embeddings": {}, "completions": {}}
        for uc in UseCase:
            for tier in ModelTier:
                self._by_pair[(uc.value, tier.value)] = decisions.get((uc, tier), self.default)
                route = self._by_pair[(uc.value, tier.value)].route
                for kind, table_default in (("embeddings", embeddings), ("completions", ())):
                    models = getattr(route, kind, ()) if route is not None else ()
                    models = models or table_default
                    self._by_kind[kind][(uc.value, tier.value)] = (
                        self._decision(route.name if route is not None else "default", models, route)
                        if models else None)
        # body `model` lookups: "use_case:tier", "use_case", aliases, default names
        self._by_model: dict[str, RouteDecision] = {name: self.default for name in DEFAULT_MODEL_NAMES}
        for (uc, tier), decision in self._by_pair.items():
            self._by_model[f"{uc}:{tier}"] = decision
        for uc in UseCase:
            self._by_model[uc.value] = self._by_pair[(uc.value, DEFAULT_TIER.value)]
        for alias, ref in self.aliases.items():
            self._by_model[alias] = self._decision(f"alias:{alias}", (ref,))
        self._named_routes(groups or {}, alias_routes or {})

    def _named_routes(self, groups: Mapping[str, Group], alias_routes: Mapping[str, Route | str]) -> None:
        """A group's name is a model name too (its deployments, by its strategy); an alias may name a
        route: one of its own (fallbacks, defaults, strategy) or a `use_case:tier` route of the table."""
        self.groups: dict[str, Group] = dict(groups)
        self.alias_routes: dict[str, Route] = {}
        for name, group in self.groups.items():
            self._by_model.setdefault(name, self._decision(f"group:{name}", group.refs, None, (group,)))
        for alias, target in alias_routes.items():
            if isinstance(target, str):  # checked by the parser: a route name the table resolves
                self._by_model[alias] = self._by_model[target]
            else:
                self.alias_routes[alias] = target
                self._by_model[alias] = self._decision(f"alias:{alias}", target.candidates, target)
        # some route chooses per request: the deployments' live load is worth keeping (else it is not kept,
        # and an ordered table's attempts cost what they did)
        self.chooses = bool(self.groups) or any(r.layout for r in (*self.routes.values(), *self.alias_routes.values()))

    def _decision(self, name: str, candidates: tuple[ModelRef, ...], route: Route | None = None,
                  layout: tuple[Group, ...] = ()) -> RouteDecision:
        plans = {}
        for ref in candidates:
            plan = self.plan(ref, route)
            if plan is not None:
                plans[ref] = plan
        layout = layout or (route.layout if route is not None else ())
        if not layout:
            return RouteDecision(name, candidates, route, plans)
        prices = {ref: p for ref in candidates if (p := price_for(self.pricing, ref.provider, ref.model)) is not None}
        return RouteDecision(name, candidates, route, plans, layout,
                             route.strategy if route is not None else "ordered", prices)

    def plan(self, ref: ModelRef, route: Route | None = None) -> ParamRule | None:
        """The candidate's rule (fields it refuses) with its first-byte budget: the route's, else the
        model rule's, else its provider's; None when nothing differs from the defaults."""
        rule = self._plans.get(ref)
        if rule is None and ref not in self._plans:
            rule = match_rule(ref, self.model_rules)
            spec = self.providers.get(ref.provider)
            provider_budget = spec.first_byte_timeout if spec is not None else None
            if provider_budget is not None and (rule is None or rule.first_byte_timeout is None):
                rule = replace(rule or ParamRule(), first_byte_timeout=provider_budget)
            window = self.context_windows.get(f"{ref.provider}/{ref.model}")
            if window is not None and (rule is None or rule.context_window is None):
                rule = replace(rule or ParamRule(), context_window=window)
            if len(self._plans) < 4096:  # overrides name arbitrary models: keep the memo bounded
                self._plans[ref] = rule  # type: ignore[assignment]
        if route is not None and route.first_byte_timeout is not None:
            return replace(rule or ParamRule(), first_byte_timeout=route.first_byte_timeout)
        return rule

    def price(self, ref: ModelRef, usage: Usage) -> float | None:
        """USD for `usage` at `ref`'s price in this table (input tokens served from, or written to, the
        provider's cache at its `cached_input` / `cache_write` price when the table gives one); None when
        the table has no price for it."""
        try:
            pricing = self._prices[ref]
        except KeyError:
            pricing = price_for(self.pricing, ref.provider, ref.model)
            if len(self._prices) < 4096:  # clients may name any model: keep the memo bounded
                self._prices[ref] = pricing
        return cost_usd(usage, pricing) if pricing is not None else None

    # -- resolution (hot path) ------------------------------------------------------------

    def resolve(self, use_case: str | None, tier: str | None, model: Any, kind: str = "chat") -> RouteDecision:
        """Headers first, then the body's `model`, then the default route.

        `kind` is the kind of call (chat, embeddings, completions): a route serves embeddings and
        completions only with models named for them (else the body's `model` decides), so a chat
        model is never sent an embeddings call."""
        if kind != "chat":
            return self._resolve_kind(kind, use_case, tier, model)
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
        check_model_name(model)
        decision = self._by_model.get(model.strip().lower())
        if decision is not None:
            return decision
        provider, sep, model_id = model.partition("/")
        if sep and model_id and provider in self.providers:
            if not self.allow_model_override:
                raise UnknownRouteError(
                    f"model override {model!r} is not allowed here; use a route ({self._route_names()})",
                    param="model")
            ref = ModelRef(provider, model_id)
            return RouteDecision("override", (ref,), None, _one_plan(ref, self.plan(ref)))
        if self.passthrough_provider is not None:  # a plain name the table does not know, sent as is
            ref = ModelRef(self.passthrough_provider, model)
            return RouteDecision("passthrough", (ref,), None, _one_plan(ref, self.plan(ref)))
        raise UnknownRouteError(
            f"unknown model {model!r}. Use a route name ({self._route_names()}), "
            f"a use case ({', '.join(_USE_CASES)}), an alias ({', '.join(self.aliases) or 'none'}) "
            f"or provider/model with a provider of {', '.join(self.providers)}",
            param="model")

    def _resolve_kind(self, kind: str, use_case: str | None, tier: str | None, model: Any) -> RouteDecision:
        by_kind = self._by_kind[kind]
        if use_case is not None or tier is not None:
            key = ((use_case or DEFAULT_USE_CASE.value).strip().lower(),
                   (tier or DEFAULT_TIER.value).strip().lower())
            if key not in self._by_pair:
                raise self._unknown_pair(*key)
            decision = by_kind[key]
            if decision is not None:
                return decision
        if isinstance(model, str) and model.strip().lower() not in DEFAULT_MODEL_NAMES:
            named = self._by_model.get(model) or self._by_model.get(model.strip().lower())
            if named is not None and named.route is not None:  # a route's name: its models for this kind
                uc, tr = named.route.use_case.value, named.route.tier.value
                decision = by_kind[(uc, tr)]
                if decision is None:
                    raise UnknownRouteError(f"route {named.name} has no {kind} model; name one in the "
                                            f"route's {kind}_model or send a model in the body", param="model")
                return decision
            return self.resolve(None, None, model)
        decision = by_kind[(DEFAULT_USE_CASE.value, DEFAULT_TIER.value)]
        if decision is None:
            raise UnknownRouteError(f"no {kind} model: send one in the body's model (an alias or provider/model) "
                                    f"or name one in the table ({kind}_model)", param="model")
        return decision
    def known_model(self, model: Any) -> RouteDecision | None:
        """The decision for a body's `model` that names a route, alias or provider/model; else None."""
        if not isinstance(model, str):
            return None
        check_model_name(model)
        decision = self._by_model.get(model) or self._by_model.get(model.strip().lower())
        if decision is not None:
            return decision
        provider, sep, model_id = model.partition("/")
        if sep and model_id and provider in self.providers and self.allow_model_override:
            ref = ModelRef(provider, model_id)
            return RouteDecision("override", (ref,), None, _one_plan(ref, self.plan(ref)))
        return None

    def passthrough_for(self, path: str) -> str | None:
        """The provider that serves `path` (a `/v1/...` path tiergate does not serve itself)."""
        for prefix, provider in self.passthrough_paths:
            if path.startswith(prefix):
                return provider
        return self.passthrough_provider

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
        for named in (*self.alias_routes.values(), *self.groups.values()):
            for ref in (named.candidates if isinstance(named, Route) else named.refs):
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
                "timeout": r.timeout,
                "first_byte_timeout": r.first_byte_timeout,
                "embeddings_model": [str(m) for m in r.embeddings],
                "completions_model": [str(m) for m in r.completions],
                "strategy": r.strategy,
                "groups": [g.name for g in r.layout if len(g.members) > 1],
                "shadow": None if r.shadow is None else {"model": str(r.shadow.model), "share": r.shadow.share,
                                                         "max_concurrency": r.shadow.max_concurrency},
            }
            for r in self.routes.values()
        ]

    def age(self) -> float:
        return max(0.0, time.time() - self.loaded_at)


def check_model_name(model: str) -> None:
    """A `model` longer than `MAX_MODEL_NAME`, or with a control character (a CR/LF would break the
    answer's `x-tiergate-model` header after the provider was called), is refused (400) before it is
    used for anything."""
    if len(model) > MAX_MODEL_NAME:
        raise InvalidRequestError(f"'model' is {len(model)} characters long; the maximum is {MAX_MODEL_NAME}",
                                  param="model", code="string_above_max_length")
    if not model.isprintable():
        raise InvalidRequestError("'model' must not contain control characters (CR, LF, tab...)",
                                  param="model", code="invalid_model")


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
        # the parser quotes the offending line, which may be a base_url with credentials
        raise ConfigError(redact_credentials(f"{p}: not valid YAML: {exc}")) from None
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
    # each section's parser appends a problem per bad entry, naming its key, and keeps the good ones
    problems: list[str] = []
    providers = _parse_providers(doc.get("providers"), label, problems)
    groups = parse_groups(doc.get("groups"), providers, problems)
    aliases, alias_specs = _split_aliases(doc.get("aliases"), groups)
    aliases = _parse_aliases(aliases, providers, problems)
    pricing = _parse_pricing(doc.get("pricing"), problems)
    rules = _parse_model_rules(doc.get("model_rules"), problems)
    embeddings = _parse_embeddings(doc.get("embeddings_model"), providers, problems)
    routes = _parse_routes(doc.get("routes"), providers, problems, groups)
    alias_routes = _parse_alias_routes(alias_specs, providers, groups, {r.name for r in routes}, problems)
    problems = [redact_credentials(p) for p in problems]  # they are logged and shown in /health/details
    passthrough_provider = _parse_passthrough_provider(doc.get("passthrough_provider"), providers, problems)
    passthrough_paths = _parse_passthrough_paths(doc.get("passthrough_paths"), providers, problems)
    limits, limit_problems = parse_limits(doc.get("limits"), providers)
    problems += limit_problems
    context_windows = _parse_context_windows(doc.get("context_windows"), problems)

    if problems and strict:
        raise ConfigError(f"{label}: " + f"\n{label}: ".join(problems))
    if not routes:
        raise ConfigError(f"{label}: routes: no valid route" + (f" ({'; '.join(problems)})" if problems else ""))
    return RoutingTable(providers, routes, aliases, pricing, source=source, problems=problems,
                        allow_model_override=allow_model_override, model_rules=rules, embeddings=embeddings,
                        passthrough_provider=passthrough_provider, passthrough_paths=passthrough_paths,
                        limits=LimitIndex(limits), context_windows=context_windows, groups=groups,
                        alias_routes=alias_routes)


def _parse_providers(raw: Any, label: str, problems: list[str]) -> dict[str, ProviderSpec]:
    """`providers:`; not a mapping at all is fatal (nothing else can be read without them)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: providers: must be a mapping of name to settings", param="providers")
    providers: dict[str, ProviderSpec] = {}
    for name, entry in raw.items():
        try:
            providers[str(name)] = parse_provider(str(name), entry)
        except ValueError as exc:
            problems.append(f"providers.{name}: {exc}")
    return providers


def _parse_aliases(raw: Any, providers: Mapping[str, ProviderSpec], problems: list[str]) -> dict[str, ModelRef]:
    raw = raw or {}
    if not isinstance(raw, dict):
        problems.append("aliases: must be a mapping of alias to provider/model")
        return {}
    aliases: dict[str, ModelRef] = {}
    for alias, ref in raw.items():
        try:
            aliases[str(alias)] = _model_ref(ref, providers)
        except ValueError as exc:
            problems.append(f"aliases.{alias}: {exc}")
    return aliases


def _parse_pricing(raw: Any, problems: list[str]) -> dict[str, Pricing]:
    raw = raw or {}
    if not isinstance(raw, dict):
        problems.append("pricing: must be a mapping of provider/model to {input, output}")
        return {}
    pricing: dict[str, Pricing] = {}
    for ref, price in raw.items():
        try:
            if not isinstance(price, dict):
                raise ValueError("must be {input: USD per 1M tokens, output: USD per 1M tokens}")
            cached, write = price.get("cached_input"), price.get("cache_write")
            pricing[str(ref)] = Pricing(float(price.get("input", 0)), float(price.get("output", 0)),
                                        None if cached is None else float(cached),
                                        None if write is None else float(write))
        except (TypeError, ValueError) as exc:
            problems.append(f"pricing.{ref}: {exc}")
    return pricing


def _parse_model_rules(raw: Any, problems: list[str]) -> list[tuple[str, ParamRule]]:
    raw = raw or {}
    if not isinstance(raw, dict):
        problems.append("model_rules: must be a mapping of model pattern to "
                        "{drop, rename, first_byte_timeout, continuation, context_window}")
        return []
    rules: list[tuple[str, ParamRule]] = []
    for pattern, entry in raw.items():
        try:
            rules.append((str(pattern).lower(), parse_rule(entry)))
        except ValueError as exc:
            problems.append(f"model_rules.{pattern}: {exc}")
    return rules


def _parse_context_windows(raw: Any, problems: list[str]) -> dict[str, int]:
    """`context_windows:`, provider/model -> the tokens it takes (a prompt too long for it is not sent)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        problems.append("context_windows: must be a mapping of provider/model to a number of tokens")
        return {}
    windows: dict[str, int] = {}
    for ref, tokens in raw.items():
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            problems.append(f"context_windows.{ref}: {tokens!r} is not a positive whole number of tokens")
        else:
            windows[str(ref)] = tokens
    return windows


def _parse_embeddings(raw: Any, providers: Mapping[str, ProviderSpec],
                      problems: list[str]) -> tuple[ModelRef, ...]:
    """`embeddings_model:`, the table's models for embeddings when a route names none."""
    if not raw:
        return ()
    try:
        return _model_list(raw, providers)
    except ValueError as exc:
        problems.append(f"embeddings_model: {exc}")
        return ()


def _split_aliases(raw: Any, groups: Mapping[str, Group]) -> tuple[Any, dict[str, dict[str, Any] | str]]:
    """`aliases:` as plain provider/model aliases, and the aliases that name a route or a group."""
    if not isinstance(raw, dict):
        return raw, {}
    plain, named = {}, {}
    for alias, value in raw.items():
        target = alias_target(value, groups)
        if target is None:
            plain[alias] = value
        else:
            named[str(alias)] = target
    return plain, named


def _parse_alias_routes(raw: Mapping[str, dict[str, Any] | str], providers: Mapping[str, ProviderSpec],
                        groups: Mapping[str, Group], route_names: set[str],
                        problems: list[str]) -> dict[str, Route | str]:
    """Aliases that name a route: `{route: use_case:tier}` (that route), or a route of their own (the
    keys of a route but use_case and tier, which default to the default route's: limits scoped by
    them count its calls)."""
    out: dict[str, Route | str] = {}
    for alias, target in raw.items():
        if isinstance(target, str):
            if target not in route_names:
                problems.append(f"aliases.{alias}.route: {target!r} is not a route of the table "
                                f"({', '.join(sorted(route_names)) or 'none'})")
            else:
                out[alias] = target
            continue
        spec = {"use_case": DEFAULT_USE_CASE.value, "tier": DEFAULT_TIER.value, **target}
        try:
            route = parse_strategy_route(spec, providers, groups)
        except ValueError as exc:
            sep = "." if _KEYED.match(str(exc)) else ": "
            problems.append(f"aliases.{alias}{sep}{exc}")
            continue
        if route is not None:
            out[alias] = route
    return out


def parse_strategy_route(raw: Any, providers: Mapping[str, ProviderSpec],
                         groups: Mapping[str, Group]) -> Route | None:
    """`parse_route` for a route that may name groups, a `strategy` and `weights`."""
    if not isinstance(raw, dict):
        return parse_route(raw, providers)
    plain, strategy, layout = expand_route(raw, groups, providers)
    route = parse_route(plain, providers)
    if route is None or not layout:
        return route
    return replace(route, strategy=strategy, layout=layout)


def _parse_routes(raw: Any, providers: Mapping[str, ProviderSpec], problems: list[str],
                  groups: Mapping[str, Group] | None = None) -> list[Route]:
    """`routes:` without the disabled ones; a second route for the same (use case, tier) is a problem."""
    if not isinstance(raw, list) or not raw:
        problems.append("routes: must be a non-empty list of {use_case, tier, model, ...}")
        return []
    routes: list[Route] = []
    seen: dict[tuple[UseCase, ModelTier], int] = {}
    for i, entry in enumerate(raw):
        where = f"routes[{i}]"
        try:
            route = parse_strategy_route(entry, providers, groups or {})
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
    return routes


def _parse_passthrough_provider(raw: Any, providers: Mapping[str, ProviderSpec],
                                problems: list[str]) -> str | None:
    """`passthrough_provider:`, where unknown models and unserved `/v1/*` paths go (None: nowhere)."""
    if raw is None:
        return None
    if str(raw) not in providers:
        problems.append(f"passthrough_provider: {raw!r} is not a provider of the table "
                        f"(providers: {', '.join(providers) or 'none'})")
        return None
    return str(raw)


def _parse_passthrough_paths(raw: Any, providers: Mapping[str, ProviderSpec],
                             problems: list[str]) -> dict[str, str]:
    """`passthrough_paths:`, path prefix -> provider for `/v1/*` paths passed through."""
    raw = raw or {}
    if not isinstance(raw, dict):
        problems.append('passthrough_paths: must be a mapping of path prefix to provider, e.g. {"/v1/audio/": local}')
        return {}
    paths: dict[str, str] = {}
    for prefix, provider in raw.items():
        if not str(prefix).startswith("/v1/"):
            problems.append(f"passthrough_paths.{prefix}: a path prefix must start with /v1/")
        elif str(provider) not in providers:
            problems.append(f"passthrough_paths.{prefix}: {provider!r} is not a provider of the table")
        else:
            paths[str(prefix)] = str(provider)
    return paths


def parse_rule(raw: Any) -> ParamRule:
    if not isinstance(raw, dict):
        raise ValueError("must be a mapping with drop, rename and/or first_byte_timeout")
    unknown = set(raw) - {"drop", "rename", "first_byte_timeout", "continuation", "context_window"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} "
                         "(allowed: drop, rename, first_byte_timeout, continuation, context_window)")
    drop = raw.get("drop") or []
    rename = raw.get("rename") or {}
    if not isinstance(drop, (list, tuple)) or not all(isinstance(d, str) for d in drop):
        raise ValueError("drop: must be a list of request field names")
    if not isinstance(rename, dict):
        raise ValueError("rename: must be a mapping of field name to new name")
    first_byte = _opt_float(raw, "first_byte_timeout")
    if first_byte is not None and first_byte <= 0:
        raise ValueError("first_byte_timeout: must be a positive number of seconds")
    continuation = _choice(raw, "continuation", CONTINUATIONS) if raw.get("continuation") is not None else None
    window = _opt_int(raw, "context_window")
    if window is not None and window <= 0:
        raise ValueError("context_window: must be a positive number of tokens")
    return ParamRule(frozenset(drop), tuple((str(k), str(v)) for k, v in rename.items()), first_byte, continuation,
                     window)


def _model_list(raw: Any, providers: Mapping[str, ProviderSpec]) -> tuple[ModelRef, ...]:
    """One provider/model or a list of them (the first, then its fallbacks)."""
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    if not items:
        raise ValueError("must name at least one provider/model")
    return tuple(_model_ref(item, providers) for item in items)


def _one_plan(ref: ModelRef, plan: ParamRule | None) -> Mapping[ModelRef, ParamRule]:
    return {ref: plan} if plan is not None else {}


def parse_provider(name: str, raw: Any) -> ProviderSpec:
    if not isinstance(raw, dict):
        raise ValueError("must be a mapping with base_url (or kind: mock)")
    allowed = {"base_url", "kind", "api_key", "api_key_env", "api_key_header", "headers",
               "failure_threshold", "recovery_timeout", "max_concurrency", "models", "first_byte_timeout",
               "pass_client_key", "apis", "stream_usage", "continuation"}
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(allowed))})")
    if "/" in name or not name:
        raise ValueError("a provider name may not be empty or contain '/'")
    kind = str(raw.get("kind", "openai"))
    if kind not in PROVIDER_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(PROVIDER_KINDS)}")
    base_url = str(raw.get("base_url") or "").rstrip("/")
    if kind != "mock":
        # credentials in the URL are refused: aiohttp will not combine them with the key's header, so
        # every request to the provider would fail; and the URL is quoted in messages (masked)
        parse_url(base_url, name="base_url", schemes=("http", "https"), credentials=False)
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise ValueError("headers: must be a mapping of header name to value")
    models = raw.get("models") or ()
    if not isinstance(models, (list, tuple)):
        raise ValueError("models: must be a list of model ids")
    key_header = str(raw.get("api_key_header") or (ANTHROPIC_KEY_HEADER if kind == "anthropic" else "Authorization"))
    apis = raw.get("apis")
    if apis is None:
        apis = DEFAULT_APIS[kind]
    elif not isinstance(apis, (list, tuple)) or not apis or any(a not in API_NAMES for a in apis):
        raise ValueError(f"apis: must be a non-empty list of {', '.join(API_NAMES)}")
    return ProviderSpec(
        name=name,
        base_url=base_url,
        kind=kind,
        api_key=_opt_str(raw.get("api_key")),
        api_key_env=_opt_str(raw.get("api_key_env")),
        api_key_header=key_header,
        headers=tuple((str(k), str(v)) for k, v in headers.items()),
        failure_threshold=_opt_int(raw, "failure_threshold"),
        recovery_timeout=_opt_float(raw, "recovery_timeout"),
        max_concurrency=_opt_int(raw, "max_concurrency"),
        models=tuple(str(m) for m in models),
        first_byte_timeout=_positive(raw, "first_byte_timeout"),
        pass_client_key=raw.get("pass_client_key") is True,
        apis=tuple(apis),
        stream_usage=_opt_bool(raw, "stream_usage", kind != "anthropic"),  # Messages takes no stream_options
        continuation=_choice(raw, "continuation", CONTINUATIONS),
    )


ROUTE_KEYS = frozenset({"use_case", "tier", "model", "fallbacks", "max_tokens", "temperature",
                        "system_prompt", "cache", "cache_ttl", "enabled", "timeout", "first_byte_timeout",
                        "embeddings_model", "completions_model", "stream_recovery", "cache_scope", "retry_same",
                        "shadow"})


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
    fallbacks, continuations = [], []
    for j, entry in enumerate(fallbacks_raw):
        try:
            ref, continuation = _fallback(entry, providers)
        except ValueError as exc:
            raise ValueError(f"fallbacks[{j}]{'.' if isinstance(entry, dict) else ': '}{exc}") from None
        fallbacks.append(ref)
        if continuation is not None:
            continuations.append((ref, continuation))
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
    kinds = {}
    for kind in ("embeddings", "completions"):
        try:
            kinds[kind] = _model_list(raw[f"{kind}_model"], providers) if raw.get(f"{kind}_model") else ()
        except ValueError as exc:
            raise ValueError(f"{kind}_model: {exc}") from None
    retry_same = _opt_int(raw, "retry_same")
    if retry_same is not None and not 0 <= retry_same <= 5:
        raise ValueError("retry_same: must be a whole number from 0 to 5")
    return Route(use_case, tier, model, tuple(fallbacks), max_tokens, temperature,
                 _opt_str(raw.get("system_prompt")), cache, cache_ttl,
                 _positive(raw, "timeout"), _positive(raw, "first_byte_timeout"),
                 kinds["embeddings"], kinds["completions"], _stream_recovery(raw),
                 _choice(raw, "cache_scope", CACHE_SCOPES), retry_same,
                 parse_shadow(raw["shadow"], providers, model) if raw.get("shadow") is not None else None,
                 continuations=tuple(continuations))


def _fallback(raw: Any, providers: Mapping[str, ProviderSpec]) -> tuple[ModelRef, str | None]:
    """A fallback entry: `provider/model`, or `{model: provider/model, continuation: ...}` saying how this
    fallback continues an answer a recovery hands it (one of CONTINUATIONS; `none`: never asked)."""
    if not isinstance(raw, dict):
        return _model_ref(raw, providers), None
    unknown = set(raw) - {"model", "continuation"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (allowed: continuation, model)")
    try:
        ref = _model_ref(raw.get("model"), providers)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None
    return ref, _choice(raw, "continuation", CONTINUATIONS) if raw.get("continuation") is not None else None


SHADOW_KEYS = frozenset({"model", "share", "max_concurrency"})


def parse_shadow(raw: Any, providers: Mapping[str, ProviderSpec], primary: ModelRef) -> Shadow:
    """A route's `shadow: {model, share, max_concurrency}`. ValueError names the key."""
    if not isinstance(raw, dict):
        raise ValueError("shadow: must be a mapping with model, share and max_concurrency")
    unknown = set(raw) - SHADOW_KEYS
    if unknown:
        raise ValueError(f"shadow.{sorted(unknown)[0]}: unknown key (allowed: {', '.join(sorted(SHADOW_KEYS))})")
    try:
        model = _model_ref(raw.get("model"), providers)
    except ValueError as exc:
        raise ValueError(f"shadow.model: {exc}") from None
    if model == primary:  # its failures would count against the deployment the clients depend on
        raise ValueError("shadow.model: must be another deployment than the route's model")
    try:
        share = _opt_float(raw, "share")
        concurrency = _opt_int(raw, "max_concurrency")
    except ValueError as exc:
        raise ValueError(f"shadow.{exc}") from None
    if share is None or not 0 <= share <= 1:
        raise ValueError("shadow.share: must be a number from 0 to 1 (the share of calls mirrored)")
    if concurrency is not None and not 1 <= concurrency <= 1024:
        raise ValueError("shadow.max_concurrency: must be a whole number from 1 to 1024")
    return Shadow(model, share, concurrency or 4)


def _model_ref(raw: Any, providers: Mapping[str, ProviderSpec]) -> ModelRef:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{raw!r} is not a provider/model reference")
    ref = ModelRef.parse(raw.strip())
    if ref.provider not in providers:
        raise ValueError(f"{raw!r} names provider {ref.provider!r}, which is not defined "
                         f"(providers: {', '.join(providers) or 'none'})")
    return ref


CONTINUATIONS = ("instruction", "prefix", "continue_final_message", "none")  # none: never continues an answer
STREAM_RECOVERY = ("continue", "off")  # the first is the default


def _stream_recovery(raw: Mapping[str, Any]) -> str:
    """`stream_recovery`: YAML reads a bare `off` as false (and `on` as true), so those mean off and continue."""
    value = raw.get("stream_recovery")
    if isinstance(value, bool):
        return "continue" if value else "off"
    return _choice(raw, "stream_recovery", STREAM_RECOVERY)


def _opt_bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key}: {value!r} is not true or false")
    return value


def _choice(raw: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = raw.get(key)
    if value is None:
        return choices[0]
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


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


def _positive(raw: Mapping[str, Any], key: str) -> float | None:
    value = _opt_float(raw, key)
    if value is not None and not value > 0:
        raise ValueError(f"{key}: must be a positive number of seconds")
    return value


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
