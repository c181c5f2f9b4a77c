"""An asyncio adapter over pybreaker: one circuit breaker per deployment (provider + model).

A deployment is what fails: one model of a provider can be rate-limited or down while the
provider's other models answer, so breakers and rate-limit cooldowns are kept per deployment.

pybreaker guards synchronous calls (its async support is Tornado-only). An upstream attempt here
spans awaits, so the adapter splits a call in two: `allow()` before the attempt and
`record_success()` / `record_failure()` after it, driving pybreaker's own state machine
(closed -> open after `fail_max` counted failures -> half-open after `reset_timeout` ->
closed on a successful trial, open again on a failed one). In half-open, one trial at a time.

The wait before a trial is not one fixed `reset_timeout`: an open deployment is probed after
`FIRST_PROBE` seconds, and the wait doubles each time its trial fails, up to `reset_timeout`, so a
primary that comes back takes its traffic back within seconds while one that stays down is asked
rarely. A successful trial starts the series again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pybreaker

STATE_VALUES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}
FIRST_PROBE = 5.0  # seconds an open breaker waits before its first trial (then 10, 20, ... up to reset_timeout)


class _CountedFailure(Exception):
    """Stands for an upstream failure inside pybreaker's synchronous `call`."""


def _raise(exc: BaseException) -> None:
    raise exc


def _noop() -> None:
    return None


class _StateListener(pybreaker.CircuitBreakerListener):
    """Stamps `opened_at` with the adapter's clock and reports each transition."""

    def __init__(self, clock: Callable[[], datetime], on_change: Callable[[str, str, str], None] | None):
        self.clock = clock
        self.on_change = on_change
        self.opened = 0  # openings since the breaker was last closed: the probe's wait doubles with each

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            cb._state_storage.opened_at = self.clock()
            self.opened += 1
        elif new_state.name == pybreaker.STATE_CLOSED:
            self.opened = 0
        if self.on_change is not None:
            self.on_change(cb.name or "", old_state.name if old_state else "", new_state.name)


class AsyncCircuitBreaker:
    """One deployment's breaker. `clock` returns an aware datetime (injectable for tests).

    Besides pybreaker's states it holds a rate-limit cooldown: a 429 is not a failure of the
    deployment (it answered), but sending to it again before its `Retry-After` only earns another 429."""

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 60.0,
        clock: Callable[[], datetime] | None = None,
        on_state_change: Callable[[str, str, str], None] | None = None,
    ):
        self._clock = clock or (lambda: datetime.now(UTC))
        self._listener = _StateListener(self._clock, on_state_change)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout, name=name,
            listeners=[self._listener], throw_new_error_on_trip=False)
        self._trial_in_flight = False
        self.name = name
        self.provider, _, self.model = name.partition("/")
        self.cooldown_until = 0.0  # time.monotonic() before which a rate-limited deployment is skipped
        self.clean = True  # closed, no failure counted, no cooldown: allow and record_success do nothing

    @property
    def state(self) -> str:
        return self._cb.current_state

    @property
    def reset_timeout(self) -> float:
        return float(self._cb.reset_timeout)

    @property
    def open_for(self) -> float:
        """Seconds the breaker, open now, waits before its next trial: FIRST_PROBE, doubled for each
        trial that failed since it was last closed, never more than `reset_timeout`."""
        opened = self._listener.opened
        reset = float(self._cb.reset_timeout)
        if opened > 8:  # past any sensible cap: no huge powers
            return reset
        return min(FIRST_PROBE * 2 ** max(opened - 1, 0), reset)

    @property
    def failures(self) -> int:
        return self._cb.fail_counter

    @property
    def opened_at(self) -> datetime | None:
        if self._cb.current_state == pybreaker.STATE_CLOSED:
            return None
        return self._cb._state_storage.opened_at

    def cooling(self) -> float:
        """Seconds left of a rate-limit cooldown (0 when none)."""
        if not self.cooldown_until:
            return 0.0
        left = self.cooldown_until - time.monotonic()
        if left > 0:
            return left
        self.cooldown_until = 0.0
        self.clean = self._cb.current_state == pybreaker.STATE_CLOSED and self._cb.fail_counter == 0
        return 0.0

    def cool_down(self, seconds: float) -> None:
        """Skip this deployment for `seconds` (its Retry-After): a rate limit, not a failure."""
        self._trial_in_flight = False
        until = time.monotonic() + max(0.0, seconds)
        if until > self.cooldown_until:
            self.cooldown_until = until
            self.clean = False

    def allow(self) -> bool:
        """May an attempt go to this deployment now (the breaker's say; a cooldown is asked apart,
        with `cooling()`)? Moves open -> half-open when the timeout has passed."""
        if self.clean:
            return True
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_OPEN:
            opened_at = self._cb._state_storage.opened_at
            if opened_at and self._clock() < opened_at + timedelta(seconds=self.open_for):
                return False
            self._cb.half_open()
        if self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        if self.clean:
            return  # the common case: nothing to reset
        self._trial_in_flight = False
        if self._cb.current_state != pybreaker.STATE_OPEN:
            self._cb.call(_noop)  # closes a half-open circuit, resets the failure count
        self.clean = (self._cb.current_state == pybreaker.STATE_CLOSED and self._cb.fail_counter == 0
                      and not self.cooldown_until)

    def record_failure(self, cause: str = "failure") -> None:
        """Count one failure; pybreaker opens the circuit at `fail_max` (or at once from half-open)."""
        self.clean = False
        self._trial_in_flight = False
        if self._cb.current_state == pybreaker.STATE_OPEN:
            return
        try:
            self._cb.call(_raise, _CountedFailure(cause))
        except (_CountedFailure, pybreaker.CircuitBreakerError):
            pass

    def release_trial(self) -> None:
        """An allowed attempt ended with neither success nor a counted failure (e.g. client left)."""
        self._trial_in_flight = False

    def reset(self) -> None:
        self._trial_in_flight = False
        self.cooldown_until = 0.0
        self._cb.close()
        self.clean = True

    def snapshot(self) -> dict[str, Any]:
        opened = self.opened_at
        cooling = self.cooling()
        return {"provider": self.provider, "model": self.model, "state": self.state,
                "failures": self.failures, "opened_at": opened.isoformat() if opened else None,
                "next_trial_s": round(self.open_for, 3) if opened else None,
                "cooldown_s": round(cooling, 3) if cooling else 0.0}


class BreakerBoard:
    """The breakers of all deployments, created on first use and keyed `provider/model`.

    Thresholds come from the deployment's provider (the table's `failure_threshold`,
    `recovery_timeout`), else the board's defaults."""

    def __init__(
        self,
        names: Iterable[str] = (),
        *,
        fail_max: int = 5,
        reset_timeout: float = 60.0,
        overrides: dict[str, tuple[int | None, float | None]] | None = None,
        clock: Callable[[], datetime] | None = None,
        on_state_change: Callable[[str, str, str], None] | None = None,
    ):
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self.overrides = overrides or {}
        self._clock = clock
        self.on_state_change = on_state_change  # set before the first breaker is made
        self._breakers: dict[str, AsyncCircuitBreaker] = {}
        self._by_ref: dict[tuple[str, str], AsyncCircuitBreaker] = {}
        for name in names:
            self.get(name)

    def get(self, name: str) -> AsyncCircuitBreaker:
        """The breaker of deployment `name` (`provider/model`; a bare provider name works too)."""
        breaker = self._breakers.get(name)
        if breaker is None:
            fail_max, reset_timeout = self.overrides.get(name.partition("/")[0], (None, None))
            breaker = AsyncCircuitBreaker(
                name, fail_max=fail_max or self.fail_max,
                reset_timeout=reset_timeout if reset_timeout is not None else self.reset_timeout,
                clock=self._clock, on_state_change=self.on_state_change)
            self._breakers[name] = breaker
        return breaker

    def of(self, ref: tuple[str, str]) -> AsyncCircuitBreaker:
        """The breaker of a `ModelRef` (a tuple lookup on the hot path, no string built)."""
        breaker = self._by_ref.get(ref)
        if breaker is None:
            breaker = self._by_ref[ref] = self.get(f"{ref[0]}/{ref[1]}")
        return breaker

    def configure(self, overrides: dict[str, tuple[int | None, float | None]]) -> None:
        """Apply per-provider thresholds from a new table; existing breakers keep their state."""
        self.overrides = overrides
        for breaker in self._breakers.values():
            fail_max, reset_timeout = overrides.get(breaker.provider, (None, None))
            breaker._cb.fail_max = fail_max or self.fail_max
            breaker._cb.reset_timeout = reset_timeout if reset_timeout is not None else self.reset_timeout

    def provider_states(self) -> dict[str, str]:
        """Per provider: `open` when every known deployment of it is open, else the worst other state."""
        out: dict[str, list[str]] = {}
        for breaker in self._breakers.values():
            out.setdefault(breaker.provider, []).append(breaker.state)
        return {name: ("open" if all(s == "open" for s in states) else
                       "half-open" if "half-open" in states or "open" in states else "closed")
                for name, states in out.items()}

    def items(self) -> Iterable[tuple[str, AsyncCircuitBreaker]]:
        return self._breakers.items()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: b.snapshot() for name, b in self._breakers.items()}
