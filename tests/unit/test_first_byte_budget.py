"""The first-byte budget of an attempt: the table's for a model that thinks long, else sized on the
deployment's recent first bytes within bounds, and never more than a fair share of the call's deadline
while a fallback remains."""

from __future__ import annotations

import time

import pytest

from proxy.engine.breaker import BreakerBoard
from proxy.engine.dispatch import AttemptLoop
from proxy.engine.dispatch.tally import Tally
from proxy.outcome import Attempt
from proxy.planner.plan import Candidate
from proxy.table.routing import ParamRule
from proxy.types import ModelRef

from ..conftest import make_config

A, B = ModelRef("p", "a"), ModelRef("q", "b")


def loop(**settings):
    return AttemptLoop({}, BreakerBoard(), make_config(**settings))


def tally(loop, seconds=None):
    deadline = float("inf") if seconds is None else time.perf_counter() + seconds
    return Tally(deadline, 3, loop.events, None)


def seen(loop, ref, latency_ms, times=16):
    for _ in range(times):
        loop.events.on_attempt_end[-1](Attempt(ref.provider, ref.model, "ok", 200, latency_ms))


def test_unknown_deployment_gets_the_configured_budget():
    attempts = loop()
    first = Candidate(A)
    assert attempts.first_byte(first, (first, Candidate(B)), tally(attempts)) == 15.0


@pytest.mark.parametrize("latency_ms,budget", [(100, 5.0), (2000, 8.0), (9000, 15.0)])
def test_a_known_deployment_gets_a_multiple_of_its_recent_high_percentile_within_bounds(latency_ms, budget):
    attempts = loop()
    seen(attempts, A, latency_ms)
    first = Candidate(A)
    assert attempts.first_byte(first, (first, Candidate(B)), tally(attempts)) == pytest.approx(budget)


def test_the_observer_is_the_loops_own():
    attempts = loop()
    assert attempts.first_bytes.observe in attempts.events.on_attempt_end


def test_a_reasoning_model_keeps_its_long_budget():
    attempts = loop()
    seen(attempts, A, 100)
    first = Candidate(A, ParamRule(first_byte_timeout=120.0))
    assert attempts.first_byte(first, (first, Candidate(B)), tally(attempts)) == 120.0


def test_never_more_than_half_the_deadline_left_while_a_fallback_remains():
    attempts = loop()
    first, last = Candidate(A), Candidate(B)
    assert attempts.first_byte(first, (first, last), tally(attempts, 8.0)) == pytest.approx(4.0, abs=0.05)
    reasoning = Candidate(A, ParamRule(first_byte_timeout=120.0))
    assert attempts.first_byte(reasoning, (reasoning, last), tally(attempts, 8.0)) == pytest.approx(4.0, abs=0.05)
    # the last candidate may use what is left (the attempt's own deadline bounds it)
    assert attempts.first_byte(last, (first, last), tally(attempts, 8.0)) == 15.0


def test_a_lower_configured_cap_wins_over_the_floor():
    attempts = loop(first_byte_timeout=1.0)
    seen(attempts, A, 100)
    first = Candidate(A)
    assert attempts.first_byte(first, (first, Candidate(B)), tally(attempts)) == 1.0
