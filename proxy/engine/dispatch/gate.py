"""The gate a candidate passes just before each try: is its provider known, has the fleet blocked it,
is its breaker open, is it cooling down after a rate limit, and how long to back off before trying
again a deployment this request already saw fail. Asked per attempt, not planned: these change
between attempts."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...fleet.state import FleetHealth
    from ...settings import RouterConfig
    from ...types import ModelRef
    from ..breaker import AsyncCircuitBreaker, BreakerBoard
    from ..providers import Provider
    from .tally import Tally

STOP = "stop"  # the backoff would outlast the request's deadline: no more attempts
WAIT = "wait"  # the gate must wait for something first: ask `admit_after_wait`


class Gate:
    def __init__(self, providers: Mapping[str, Provider], breakers: BreakerBoard, config: RouterConfig,
                 sleep: Callable[[float], Any] = asyncio.sleep):
        self.providers = providers
        self.breakers = breakers
        self.fleet_health: FleetHealth | None = None  # what other tiergates found failing (Redis)
        self._sleep = sleep
        self._first_byte = config.first_byte_timeout
        self._backoff_base = config.retry_backoff
        self._retry_after_cap = config.retry_after_cap

    def admit(self, ref: ModelRef, tally: Tally) -> tuple[Provider, AsyncCircuitBreaker] | str | None:
        """The candidate's provider and breaker (its half-open trial taken) when it may be tried now;
        None when it is skipped (the skip noted); WAIT when the gate must wait first (a backoff before
        a deployment this request saw fail, a fleet trial to claim): then `await admit_after_wait`.
        Synchronous, as the usual candidate passes without waiting for anything."""
        provider = self.providers.get(ref.provider)
        if provider is None:
            return tally.skip(ref, "unknown_provider")
        if ref in tally.failures:
            return WAIT
        breaker = self.breakers.of(ref)
        fleet = self.fleet_health
        if fleet is not None:
            if fleet.blocked_until(breaker.name) is not None:
                return tally.skip(ref, "fleet_blocked")
            if fleet.trial_due(breaker.name):
                return WAIT
        if not breaker.clean and self._breaker_refuses(ref, breaker, tally, tried_before=False):
            return None
        return provider, breaker

    async def admit_after_wait(self, ref: ModelRef, tally: Tally) -> tuple[Provider, AsyncCircuitBreaker] | str | None:
        """`admit` for a candidate that needs a wait: as `admit`, and STOP when the backoff would
        outlast the request's deadline (no more attempts)."""
        if ref in tally.excluded:  # it said the prompt is too long for it: never again in this request
            return None
        provider = self.providers.get(ref.provider)
        if provider is None:
            return tally.skip(ref, "unknown_provider")
        breaker = self.breakers.of(ref)
        tried_before = ref in tally.failures
        wait = 0.0
        if tried_before:  # tried by this request already: its own backoff / Retry-After
            wait = self._backoff(tally.failures[ref], tally.retry_after.get(ref))
            if wait < 0:  # the provider asked for longer than is worth waiting here
                return None
        fleet = self.fleet_health
        if fleet is not None and not tried_before and not await self._fleet_allows(fleet, breaker.name):
            return tally.skip(ref, "fleet_blocked")
        if not breaker.clean and self._breaker_refuses(ref, breaker, tally, tried_before):
            return None
        if wait:
            if wait >= tally.deadline - time.perf_counter():
                breaker.release_trial()
                return STOP
            await self._sleep(wait)
        return provider, breaker

    @staticmethod
    def _breaker_refuses(ref: ModelRef, breaker: AsyncCircuitBreaker, tally: Tally, tried_before: bool) -> bool:
        """Cooling down after a rate limit (unless this request saw it fail: then only its backoff
        counts), or its breaker open: the skip is noted."""
        if not tried_before and breaker.cooling():
            tally.skip(ref, "cooldown")
            return True
        if not breaker.allow():
            tally.skip(ref, "breaker_open")
            return True
        return False

    async def _fleet_allows(self, fleet: FleetHealth, deployment: str) -> bool:
        """Not blocked by the fleet (a dict lookup); when the fleet's open breaker has just run out, only
        the pod that claims the trial sends it."""
        if fleet.blocked_until(deployment) is not None:
            return False
        if fleet.trial_due(deployment):
            return await fleet.claim_trial(deployment, self._first_byte)
        return True

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter before re-trying a deployment that failed; -1 when
        its Retry-After is longer than tiergate waits within one request (the client gets the 429)."""
        if failures == 0:
            return 0.0
        if retry_after is not None:
            return retry_after if retry_after <= self._retry_after_cap else -1.0
        base = self._backoff_base * (2 ** (failures - 1))
        return min(random.uniform(base / 2, base), self._retry_after_cap)
