"""Counting limits: the backend interface (`fleet.FleetLimits` counts in Redis for every tiergate;
`LocalCounters` counts in this process, without Redis and as the `fail_open` approximation while
Redis is unreachable), and the windows both use.

Windows. Requests and tokens per minute use a sliding window of sixty one-second buckets: a
fixed minute would let twice the limit through across a minute boundary (a burst at :59 and
another at :00), and a log of every request would cost memory per request. Spend uses the
calendar: the UTC day and the UTC month, so a budget renews at a time people can name.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from .spec import Check

WINDOW_S = 60  # the sliding window of the per-minute kinds


class Admission(NamedTuple):
    """A backend's answer: `failed` is the index of the first check over its limit (-1: admitted)."""

    failed: int
    retry_after: float
    used: tuple[float, ...]  # per check, after this request's charge; when refused, up to the full one
    token: Any  # where the charges went, for `settle`


class Backend(Protocol):
    """Where the counters of the limits live: charge a request (all its checks, or none), correct it later."""

    async def admit(self, checks: tuple[Check, ...], amounts: list[float], caps: list[float]) -> Admission: ...

    def settle(self, checks: tuple[Check, ...], deltas: list[float], token: Any) -> None: ...


def calendar_period(window: str, now: float) -> tuple[int, float]:
    """The calendar period `now` falls in (an id) and the seconds until it ends."""
    if window == "d":
        day = int(now // 86400)
        return day, (day + 1) * 86400 - now
    t = time.gmtime(now)
    month_id = t.tm_year * 12 + t.tm_mon - 1
    year, month = divmod(month_id + 1, 12)
    return month_id, calendar.timegm((year, month + 1, 1, 0, 0, 0)) - now


class LocalCounters:
    """The same windows as the Redis scripts, counted in this process. Its caps are the callers': for
    the fail_open approximation, the fleet's limits divided by the pods last seen."""

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
        period, left = calendar_period(check.window, now)
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
                key = (check.key, calendar_period(check.window, now)[0])
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
                key = (check.key, calendar_period(check.window, then)[0])
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
