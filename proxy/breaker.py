"""An asyncio adapter over pybreaker: one circuit breaker per provider.

pybreaker guards synchronous calls (its async support is Tornado-only). An upstream attempt here
spans awaits, so the adapter splits a call in two: `allow()` before the attempt and
`record_success()` / `record_failure()` after it, driving pybreaker's own state machine
(closed -> open after `fail_max` counted failures -> half-open after `reset_timeout` ->
closed on a successful trial, open again on a failed one). In half-open, one trial at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pybreaker

STATE_VALUES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}


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

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            cb._state_storage.opened_at = self.clock()
        if self.on_change is not None:
            self.on_change(cb.name or "", old_state.name if old_state else "", new_state.name)


class AsyncCircuitBreaker:
    """One provider's breaker. `clock` returns an aware datetime (injectable for tests)."""

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
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout, name=name,
            listeners=[_StateListener(self._clock, on_state_change)], throw_new_error_on_trip=False)
        self._trial_in_flight = False
        self.name = name
        self.clean = True  # closed, no failure counted: allow and record_success have nothing to do

    @property
    def state(self) -> str:
        return self._cb.current_state

    @property
    def failures(self) -> int:
        return self._cb.fail_counter

    @property
    def opened_at(self) -> datetime | None:
        if self._cb.current_state == pybreaker.STATE_CLOSED:
            return None
        return self._cb._state_storage.opened_at

    def allow(self) -> bool:
        """May an attempt go to this provider now? Moves open -> half-open when the timeout has passed."""
        if self.clean:
            return True
        state = self._cb.current_state
        if state == pybreaker.STATE_CLOSED:
            return True
        if state == pybreaker.STATE_OPEN:
            opened_at = self._cb._state_storage.opened_at
            if opened_at and self._clock() < opened_at + timedelta(seconds=self._cb.reset_timeout):
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
        self.clean = self._cb.current_state == pybreaker.STATE_CLOSED and self._cb.fail_counter == 0

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
        self._cb.close()
        self.clean = True

    def snapshot(self) -> dict[str, Any]:
        opened = self.opened_at
        return {"state": self.state, "failures": self.failures,
                "opened_at": opened.isoformat() if opened else None}


class BreakerBoard:
    """The breakers of all providers, created once per provider name."""

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
        self._on_state_change = on_state_change
        self._breakers: dict[str, AsyncCircuitBreaker] = {}
        for name in names:
            self.get(name)

    def get(self, name: str) -> AsyncCircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            fail_max, reset_timeout = self.overrides.get(name, (None, None))
            breaker = AsyncCircuitBreaker(
                name, fail_max=fail_max or self.fail_max,
                reset_timeout=reset_timeout if reset_timeout is not None else self.reset_timeout,
                clock=self._clock, on_state_change=self._on_state_change)
            self._breakers[name] = breaker
        return breaker

    def configure(self, overrides: dict[str, tuple[int | None, float | None]]) -> None:
        """Apply per-provider thresholds from a new table; existing breakers keep their state."""
        self.overrides = overrides
        for name, (fail_max, reset_timeout) in overrides.items():
            breaker = self.get(name)
            breaker._cb.fail_max = fail_max or self.fail_max
            breaker._cb.reset_timeout = reset_timeout if reset_timeout is not None else self.reset_timeout

    def items(self) -> Iterable[tuple[str, AsyncCircuitBreaker]]:
        return self._breakers.items()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: b.snapshot() for name, b in self._breakers.items()}
