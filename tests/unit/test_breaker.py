"""The asyncio adapter over pybreaker: every state transition, with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from proxy.engine.breaker import AsyncCircuitBreaker, BreakerBoard


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def changes():
    return []


@pytest.fixture
def breaker(clock, changes):
    return AsyncCircuitBreaker("p", fail_max=3, reset_timeout=60, clock=clock,
                               on_state_change=lambda *c: changes.append(c[1:]))


def test_closed_opens_after_fail_max_counted_failures(breaker, changes):
    for expected in (1, 2):
        assert breaker.allow()
        breaker.record_failure("http_500")
        assert breaker.state == "closed" and breaker.failures == expected
    breaker.record_failure("timeout")
    assert breaker.state == "open" and breaker.opened_at is not None
    assert not breaker.allow()
    assert changes == [("closed", "open")]


def test_success_in_closed_resets_the_count(breaker):
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.failures == 0
    breaker.record_failure()
    assert breaker.state == "closed"


def _open(breaker):
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state == "open"


def test_open_stays_open_until_the_first_probe_then_allows_one_trial(breaker, clock, changes):
    _open(breaker)
    clock.advance(4.9)
    assert not breaker.allow() and breaker.state == "open"
    clock.advance(0.2)
    assert breaker.allow()            # the trial
    assert breaker.state == "half-open"
    assert not breaker.allow()        # one trial at a time
    assert changes[-1] == ("open", "half-open")


def test_half_open_success_closes(breaker, clock, changes):
    _open(breaker)
    clock.advance(61)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.failures == 0 and breaker.opened_at is None
    assert breaker.allow() and breaker.allow()
    assert changes[-1] == ("half-open", "closed")


def test_half_open_failure_opens_again(breaker, clock, changes):
    _open(breaker)
    first_opened = breaker.opened_at
    clock.advance(61)
    assert breaker.allow()
    breaker.record_failure("http_503")
    assert breaker.state == "open"
    assert breaker.opened_at >= first_opened
    assert changes[-1] == ("half-open", "open")
    assert not breaker.allow()  # a fresh wait runs from the re-opening, twice the first
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.2)
    assert breaker.allow()


def _trial_fails(breaker, clock, wait):
    clock.advance(wait - 0.1)
    assert not breaker.allow()
    clock.advance(0.2)
    assert breaker.allow()
    breaker.record_failure("http_503")
    assert breaker.state == "open"


def test_a_deployment_that_keeps_failing_is_probed_less_often_up_to_the_recovery_timeout(breaker, clock):
    _open(breaker)
    for wait in (5, 10, 20, 40, 60, 60):  # doubling while its trials fail, capped at reset_timeout
        assert breaker.open_for == wait
        _trial_fails(breaker, clock, wait)


def test_a_flapping_deployment_takes_traffic_back_within_seconds_of_recovering(breaker, clock):
    """Down for a minute, then up: the breaker opened on the way down is probed at 5, 10, 20 s...
    and a recovered deployment is used again at the next probe, not a whole recovery timeout later."""
    _open(breaker)
    _trial_fails(breaker, clock, 5)
    _trial_fails(breaker, clock, 10)
    clock.advance(20.1)  # it came back meanwhile
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.open_for == 5  # the series starts again
    _open(breaker)
    clock.advance(5.1)
    assert breaker.allow()


def test_the_probe_wait_never_exceeds_a_short_recovery_timeout(clock):
    breaker = AsyncCircuitBreaker("p", fail_max=1, reset_timeout=2, clock=clock)
    breaker.record_failure()
    assert breaker.open_for == 2
    clock.advance(2.1)
    assert breaker.allow()


def test_a_released_trial_lets_the_next_one_through(breaker, clock):
    _open(breaker)
    clock.advance(61)
    assert breaker.allow()
    breaker.release_trial()  # e.g. the client disconnected: not the provider's fault
    assert breaker.state == "half-open"
    assert breaker.allow()


def test_failures_while_open_are_not_counted_twice(breaker):
    _open(breaker)
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.snapshot()["state"] == "open"


def test_board_per_provider_thresholds_keep_state_on_reconfigure(clock):
    board = BreakerBoard(["a", "b"], fail_max=5, reset_timeout=60, overrides={"b": (1, 5.0)}, clock=clock)
    board.get("b").record_failure()
    assert board.get("b").state == "open" and board.get("a").state == "closed"
    clock.advance(6)
    assert board.get("b").allow()
    board.configure({"a": (2, None)})
    board.get("a").record_failure()
    board.get("a").record_failure()
    assert board.get("a").state == "open"
    assert set(board.snapshot()) == {"a", "b"}
