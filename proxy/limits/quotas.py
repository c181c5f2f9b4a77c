"""Rate limits and budgets from the routing table: what they are, which apply to a request, and the
two-step charge (reserve an estimate at admission, settle with the real usage when the answer ends).

A limit (`limits:` in the table, `llm_limits` in Postgres) caps requests per minute, tokens per
minute (input + output) and/or USD per day and per month, for the requests its scope matches: an
inbound key's name, a use case, a tier, a route, a model (the route's first candidate), or a
combination (every field given must match). Counting is done by a backend: `fleet.FleetLimits`
(one counter per limit in Redis, shared by every tiergate) or `LocalCounters` (this process only:
without Redis, and as the `fail_open` approximation while Redis is unreachable).

A per-minute limit admits a request when its estimate fits under the cap (a request that asks for
more tokens than the minute allows is refused, as OpenAI does); a budget admits requests until it
is used up, so it can be overrun by at most the requests in flight when it runs out.

Windows. Requests and tokens per minute use a sliding window of sixty one-second buckets: a
fixed minute would let twice the limit through across a minute boundary (a burst at :59 and
another at :00), and a log of every request would cost memory per request. Spend uses the
calendar: the UTC day and the UTC month, so a budget renews at a time people can name.
"""

from __future__ import annotations

import calendar
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ..types import ModelRef, ModelTier, RateLimitError, TiergateError, UseCase

log = logging.getLogger("tiergate.limits")

# kind -> (table field, window code, unit for messages)
KINDS: dict[str, tuple[str, str]] = {
    "requests_per_minute": ("w", "requests per minute"),
    "tokens_per_minute": ("w", "tokens per minute"),
    "usd_per_day": ("d", "USD per day"),
    "usd_per_month": ("m", "USD per month"),
}
SCOPE_FIELDS = ("key", "use_case", "tier", "route", "model")
LIMIT_KEYS = frozenset({"name", *SCOPE_FIELDS, *KINDS, "on_budget_exceeded", "enabled"})
WINDOW_S = 60  # the sliding window of the per-minute kinds
_NAME = re.compile(r"^[A-Za-z0-9_.:=,/@+-]{1,128}$")
_USE_CASES = {u.value: u for u in UseCase}
_TIERS = {t.value: t for t in ModelTier}
_MEMO_LIMIT = 4096
_UNPAID = frozenset({"hit", "coalesced"})  # answered without an upstream call of their own
POLICIES = ("fail_open", "fail_closed")


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


# --- what a limit is ---------------------------------------------------------------------------


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


# --- estimates ---------------------------------------------------------------------------------


def estimate_prompt_tokens(payload: Mapping[str, Any]) -> int:
    """About four characters a token, plus a few per message: an estimate to reserve, settled later."""
    chars = 0
    count = 0
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            count += 1
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        chars += len(part["text"])
    for field in ("prompt", "input"):
        value = payload.get(field)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    chars += len(item)
                elif isinstance(item, int):  # a token id
                    chars += 4
                elif isinstance(item, list):  # a list of token ids
                    chars += 4 * len(item)
    return (chars + 3) // 4 + 4 * count


def estimate_output_tokens(payload: Mapping[str, Any], route: Any) -> int:
    """What the client allowed the answer (`max_completion_tokens`/`max_tokens`, else the route's)."""
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool):
        limit = route.max_tokens if route is not None and route.max_tokens else 0
    n = payload.get("n")
    return limit * (n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1)


# --- backends ------------------------------------------------------------------------------------


class Admission(NamedTuple):
    """A backend's answer: `failed` is the index of the first check over its limit (-1: admitted)."""

    failed: int
    retry_after: float
    used: tuple[float, ...]  # per check, after this request's charge; when refused, up to the full one
    token: Any  # where the charges went, for `settle`


class Backend(Protocol):
    async def admit(self, checks: tuple[Check, ...], amounts: list[float], caps: list[float]) -> Admission: ...

    def settle(self, checks: tuple[Check, ...], deltas: list[float], token: Any) -> None: ...


def _period(window: str, now: float) -> tuple[int, float]:
    """The calendar period `now` falls in (an id) and the seconds until it ends."""
    if window == "d":
        day = int(now // 86400)
        return day, (day + 1) * 86400 - now
    t = time.gmtime(now)
    month_id = t.tm_year * 12 + t.tm_mon - 1
    year, month = divmod(month_id + 1, 12)
    return month_id, calendar.timegm((year, month + 1, 1, 0, 0, 0)) - now


class LocalCounters:
    """The same windows as the Redis scripts, counted in this process. `share` divides every limit
    (the fail_open approximation: the fleet's limit split over the pods last seen)."""

    def __init__(self, clock: Any = time.time):
        self.clock = clock
        self._minute: dict[str, dict[int, float]] = {}  # key -> second -> amount
        self._periods: dict[tuple[str, int], float] = {}

    def _used(self, check: Check, now: float) -> tuple[float, float]:
        """(used, seconds until enough of it ages out to be worth retrying)."""
        if check.window == "w":
            buckets = self._minute.get(check.key)
            if not buckets:
                return 0.0, 1.0
            sec = int(now)
            for old in [b for b in buckets if b <= sec - WINDOW_S]:
                del buckets[old]
            oldest = min(buckets, default=sec)
            return sum(buckets.values()), max(1.0, oldest + WINDOW_S - now)
        period, left = _period(check.window, now)
        return self._periods.get((check.key, period), 0.0), left

    async def admit(self, checks: tuple[Check, ...], amounts: list[float], caps: list[float]) -> Admission:
        return self.admit_now(checks, amounts, caps)

    def admit_now(self, checks: tuple[Check, ...], amounts: list[float], caps: list[float]) -> Admission:
        now = self.clock()
        used = []
        for i, check in enumerate(checks):
            current, retry = self._used(check, now)
            if current >= caps[i] or (check.window == "w" and current + amounts[i] > caps[i]):
                if check.window == "w":  # the time until enough of the minute has aged out
                    retry = _minute_retry(self._minute.get(check.key, {}), current + amounts[i] - caps[i], now)
                return Admission(i, retry, (*used, current), None)
            used.append(current + amounts[i])
        sec = int(now)
        for check, amount in zip(checks, amounts, strict=True):
            if check.window == "w":
                buckets = self._minute.setdefault(check.key, {})
                buckets[sec] = buckets.get(sec, 0.0) + amount
            else:
                key = (check.key, _period(check.window, now)[0])
                self._periods[key] = self._periods.get(key, 0.0) + amount
        return Admission(-1, 0.0, tuple(used), (sec, now))

    def settle(self, checks: tuple[Check, ...], deltas: list[float], token: Any) -> None:
        sec, then = token
        for check, delta in zip(checks, deltas, strict=True):
            if not delta:
                continue
            if check.window == "w":
                buckets = self._minute.get(check.key)
                if buckets is not None and sec in buckets:
                    buckets[sec] += delta
            else:
                key = (check.key, _period(check.window, then)[0])
                if key in self._periods:
                    self._periods[key] += delta

    def usage(self, checks: Iterable[Check]) -> dict[str, float]:
        now = self.clock()
        return {c.key: self._used(c, now)[0] for c in checks}


def _minute_retry(buckets: Mapping[int, float], excess: float, now: float) -> float:
    """Seconds until buckets holding at least `excess` have left the sliding minute."""
    freed = 0.0
    for sec in sorted(buckets):
        freed += buckets[sec]
        if freed >= excess:
            return max(1.0, sec + WINDOW_S - now)
    return float(WINDOW_S)


# --- the enforcer -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Reservation:
    """What one admitted request was charged, settled in `Quotas.settle` when it ends."""

    backend: Any
    checks: tuple[Check, ...]
    amounts: list[float]
    token: Any
    price: Any  # the first candidate's price (USD per 1M tokens), or None


class Quotas:
    """Admits requests against the table's limits and settles their charges. `fleet` (a
    `fleet.FleetLimits`, or None without Redis) counts for the whole fleet; on its failure the
    `policy` decides: fail_open counts here against each limit's share, fail_closed refuses."""

    def __init__(self, fleet: Any = None, *, policy: str = "fail_open", clock: Any = time.time):
        if policy not in POLICIES:
            from ..types import ConfigError
            raise ConfigError(f"limits_on_redis_failure = {policy!r}: expected one of {', '.join(POLICIES)}",
                              param="limits_on_redis_failure")
        self.fleet = fleet
        self.policy = policy
        self.local = LocalCounters(clock)
        self.last: dict[str, tuple[Check, float, float]] = {}  # key -> (check, used, when seen)
        self.rejected: dict[tuple[str, str], int] = {}
        self.downgraded: dict[str, int] = {}
        self.decided_by_policy = 0  # requests admitted or refused by the failure policy

    # -- admission ---------------------------------------------------------------------------------

    async def admit(self, index: LimitIndex, table: Any, decision: Any, payload: Mapping[str, Any],
                    key: str | None, record: Any) -> Any:
        """Charge the request's estimate to every limit that applies; raise when one is full.
        Returns the decision to route by (a cheaper tier's when a budget says to downgrade)."""
        exempt: frozenset[str] = frozenset()
        for _ in range(2):  # the original route, then at most one downgrade
            checks = index.applicable(key, decision)
            if not checks:
                return decision
            try:
                await self._charge(checks, table, decision, payload, record, exempt)
                return decision
            except BudgetExceededError as exc:
                check: Check = exc.check  # type: ignore[attr-defined]
                target = check.spec.on_budget_exceeded
                route = decision.route
                if target is None or route is None or route.tier == target or exempt:
                    raise
                cheaper = table.resolve(route.use_case.value, target.value, None)
                if cheaper.route is None or cheaper.route.tier != target:
                    raise  # no such route: the table would fall back to its default, maybe dearer
                log.info("budget %r exhausted: request %s downgraded from %s to %s", check.spec.name,
                         record.request_id, decision.name, cheaper.name)
                self.downgraded[check.spec.name] = self.downgraded.get(check.spec.name, 0) + 1
                exempt = frozenset(c.spec.name for c in checks if c.is_budget and c.spec.on_budget_exceeded)
                decision = cheaper
        return decision

    async def _charge(self, checks: tuple[Check, ...], table: Any, decision: Any, payload: Mapping[str, Any],
                      record: Any, exempt: frozenset[str]) -> None:
        price = None
        tokens = 0
        usd = 0.0
        if any(c.kind != "requests_per_minute" for c in checks):
            tokens = estimate_prompt_tokens(payload)
            output = estimate_output_tokens(payload, decision.route)
            first = decision.candidates[0] if decision.candidates else None
            price = table.pricing.get(f"{first.provider}/{first.model}") if first and table.pricing else None
            usd = (tokens * price.input + output * price.output) / 1e6 if price is not None else 0.0
            tokens += output
        amounts = [1.0 if c.kind == "requests_per_minute" else float(tokens) if c.kind == "tokens_per_minute"
                   else usd for c in checks]
        caps = [math.inf if c.spec.name in exempt and c.is_budget else c.limit for c in checks]
        backend: Any = self.fleet
        admission = None
        shared = backend is not None
        if backend is not None:
            try:
                admission = backend.admit_ahead(checks, amounts, caps)
                if admission is None:
                    admission = await backend.admit(checks, amounts, caps)
            except FleetUnavailable:
                self.decided_by_policy += 1
                if self.policy == "fail_closed":
                    raise LimitsUnavailableError(
                        "limits cannot be checked (their shared store is unreachable) and the policy is "
                        "fail_closed; retry shortly", retry_after=1.0) from None
                share = max(1, backend.fleet_size)
                caps = [cap / share for cap in caps]
                backend = None
                shared = False
        if admission is None:
            backend = self.local
            admission = self.local.admit_now(checks, amounts, caps)
        now = time.time()
        for check, used in zip(checks, admission.used, strict=False):
            self.last[check.key] = (check, used, now)
        if admission.failed >= 0:
            raise self._refusal(checks[admission.failed], admission, caps[admission.failed],
                                amounts[admission.failed], degraded=self.fleet is not None and not shared)
        record.quota = Reservation(backend, checks, amounts, admission.token, price)

    def _refusal(self, check: Check, admission: Admission, cap: float, amount: float, *,
                 degraded: bool) -> RateLimitError:
        key = (check.spec.name, check.kind)
        self.rejected[key] = self.rejected.get(key, 0) + 1
        retry = max(1.0, math.ceil(admission.retry_after))
        unit = KINDS[check.kind][1]
        limit = f"{_amount(cap)} {unit}" + (" (this pod's share while the shared store is unreachable)"
                                            if degraded else "")
        if check.is_budget:
            error: RateLimitError = BudgetExceededError(
                f"budget {check.spec.name!r} of {limit} is exhausted; it renews in {_duration(retry)}",
                retry_after=retry)
        elif amount > cap:  # waiting will not help: say why
            error = LimitExceededError(f"rate limit {check.spec.name!r} of {limit} is less than this request's "
                                       f"estimate of {_amount(amount)} tokens (its prompt and max_tokens); "
                                       "ask for fewer tokens", retry_after=retry)
        else:
            error = LimitExceededError(f"rate limit {check.spec.name!r} of {limit} reached; retry after "
                                       f"{_duration(retry)}", retry_after=retry)
        error.check = check  # type: ignore[attr-defined]
        return error

    # -- settling ------------------------------------------------------------------------------------

    def settle(self, record: Any) -> None:
        """The request has ended: replace the estimate with what it used (tokens and spend)."""
        reservation: Reservation = record.quota
        record.quota = None
        checks = reservation.checks
        if all(c.kind == "requests_per_minute" for c in checks):
            return  # a request is a request: nothing to correct
        tokens, usd = self._actual(record, reservation)
        if tokens is None:
            return  # no usage known and the answer may have cost: keep the estimate
        deltas = [0.0 if c.kind == "requests_per_minute" else (tokens if c.kind == "tokens_per_minute" else usd)
                  - amount for c, amount in zip(checks, reservation.amounts, strict=True)]
        if any(deltas):
            reservation.backend.settle(checks, deltas, reservation.token)

    @staticmethod
    def _actual(record: Any, reservation: Reservation) -> tuple[float | None, float]:
        if record.cache in _UNPAID:
            return 0.0, 0.0
        usage = record.usage
        if usage is None and record.stream_state is not None and record.stream_state.tail:
            from ..protocol.usage import find_usage
            usage = find_usage(record.stream_state.tail)
        if usage is None:
            state = record.stream_state
            if (state is None or not state.chunks) and (record.status >= 400 or record.status == 0):
                return 0.0, 0.0  # refused or failed without an answer: nothing was used
            return None, 0.0  # an answer (or part of a stream) without usage: keep the estimate
        usd = record.cost_usd
        if usd is None:
            price = reservation.price
            usd = ((usage.prompt * price.input + usage.completion * price.output) / 1e6
                   if price is not None else 0.0)
        return float(usage.prompt + usage.completion), usd

    # -- inspection ----------------------------------------------------------------------------------

    def state(self) -> str:
        if self.fleet is None:
            return "local"
        return "shared" if self.fleet.available else f"unreachable ({self.policy})"

    def snapshot(self, index: LimitIndex | None) -> dict[str, Any]:
        """`/health/details`: the backend, the policy, and each limit's last seen use."""
        now = time.time()
        local = self.local.usage(index.checks) if index is not None else {}
        limits = []
        for check in index.checks if index is not None else ():
            seen = self.last.get(check.key)
            used = local.get(check.key, 0.0) if self.fleet is None or seen is None else seen[1]
            limits.append({
                "name": check.spec.name, "scope": check.spec.scope() or {"all": "requests"},
                "kind": check.kind, "limit": check.limit, "used": round(used, 6),
                "remaining": round(max(0.0, check.limit - used), 6),
                "seen_age_s": None if seen is None else round(now - seen[2], 3),
                "rejected": self.rejected.get((check.spec.name, check.kind), 0),
                "on_budget_exceeded": (check.spec.on_budget_exceeded.value
                                       if check.is_budget and check.spec.on_budget_exceeded else None),
            })
        out: dict[str, Any] = {"state": self.state(), "policy": self.policy,
                               "counting": "fleet (Redis)" if self.fleet is not None else "this process",
                               "decided_by_policy": self.decided_by_policy, "limits": limits}
        if self.fleet is not None:
            out["redis"] = self.fleet.stats()
        return out

    def observe(self, usage: Mapping[str, float], checks: Iterable[Check]) -> None:
        """Use read from the shared store by a background refresh."""
        now = time.time()
        for check in checks:
            if check.key in usage:
                self.last[check.key] = (check, usage[check.key], now)


class LimitsCollector:
    """`/metrics` families of the limits, computed when scraped (nothing on the request path)."""

    def __init__(self, router: Any):
        self._router = router

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        quotas: Quotas = self._router.quotas
        table = getattr(self._router, "_table", None)
        index = table.limits if table is not None else None
        snapshot = quotas.snapshot(index)
        labels = ["limit", "kind"]
        capacity = GaugeMetricFamily("tiergate_limit_capacity", "Each limit's cap (requests or tokens per "
                                     "minute, USD per day or month)", labels=labels)
        used = GaugeMetricFamily("tiergate_limit_used", "Use of each limit in its current window, as last "
                                 "seen (spend in USD for budgets)", labels=labels)
        remaining = GaugeMetricFamily("tiergate_limit_remaining", "What is left of each limit in its current "
                                      "window, as last seen", labels=labels)
        rejected = CounterMetricFamily("tiergate_limit_rejected", "Requests this process refused for a "
                                       "limit", labels=labels)
        for row in snapshot["limits"]:
            values = [row["name"], row["kind"]]
            capacity.add_metric(values, row["limit"])
            used.add_metric(values, row["used"])
            remaining.add_metric(values, row["remaining"])
            rejected.add_metric(values, row["rejected"])
        downgraded = CounterMetricFamily("tiergate_limit_downgraded", "Requests this process sent to a "
                                         "cheaper tier because a budget was exhausted", labels=["limit"])
        for name, n in quotas.downgraded.items():
            downgraded.add_metric([name], n)
        info = GaugeMetricFamily("tiergate_limits_backend", "Where limits are counted (1 on the current "
                                 "state: shared, local, unreachable) and the policy while Redis is unreachable",
                                 labels=["state", "policy"])
        info.add_metric([quotas.state().partition(" ")[0], quotas.policy], 1)
        by_policy = CounterMetricFamily("tiergate_limits_policy_decisions", "Requests admitted or refused by "
                                        "the failure policy because Redis could not be reached")
        by_policy.add_metric([], quotas.decided_by_policy)
        yield from (capacity, used, remaining, rejected, downgraded, info, by_policy)


def _amount(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"
