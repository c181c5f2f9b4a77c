"""Admission against the table's limits: the two-step charge (reserve an estimate at admission,
settle with the real usage when the answer ends), the downgrade a budget may ask for, the policy
while the shared store is unreachable, and what `/health/details` shows of it.

A per-minute limit admits a request when its estimate fits under the cap (a request that asks for
more tokens than the minute allows is refused, as OpenAI does); a budget admits requests until it
is used up, so it can be overrun by at most the requests in flight when it runs out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..types import ConfigError, RateLimitError
from .counters import Admission, LocalCounters
from .estimate import estimate_output_tokens, estimate_prompt_tokens
from .spec import (
    KINDS,
    BudgetExceededError,
    Check,
    FleetUnavailable,
    LimitExceededError,
    LimitIndex,
    LimitsUnavailableError,
)

log = logging.getLogger("tiergate.limits")

POLICIES = ("fail_open", "fail_closed")
_UNPAID = frozenset({"hit", "coalesced"})  # answered without an upstream call of their own


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
