"""Provider health: passive statistics from real requests plus active checks on an interval.

Each upstream attempt updates its provider's error rate and latency (an exponentially weighted
moving average, so memory stays constant). Every `health_check_interval` seconds a background
task calls each provider's `GET /models`; the result updates availability and the number of models
it offers. Checks run beside the traffic and never block a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..outcome import Attempt
from ..types import cancel_and_wait
from .providers import Provider

log = logging.getLogger("tiergate.health")

_ALPHA = 0.1  # weight of the newest sample in the moving averages
_NOT_ATTEMPTS = frozenset({"breaker_open", "unknown_provider"})
_ANSWERED = frozenset({"ok", "client_error"})  # the provider answered (a client error is the client's)


@dataclass(slots=True)
class ProviderHealth:
    error_rate: float = 0.0
    avg_latency_ms: float | None = None
    requests: int = 0
    failures: int = 0
    last_check: float | None = None
    last_check_ok: bool | None = None
    last_check_error: str | None = None
    models_available: int | None = None


class FirstByteTimes:
    """How long each deployment's first byte has taken lately (its answered attempts: a stream's first
    chunk, a whole answer's headers): the high percentile the attempt loop sizes its first-byte budget on.
    The last `SAMPLES` per deployment; the percentile is recomputed every `EVERY` samples."""

    SAMPLES = 64
    EVERY = 8
    MIN_SAMPLES = 8  # fewer: not known yet

    __slots__ = ("_recent", "_high")

    def __init__(self) -> None:
        self._recent: dict[tuple[str, str], tuple[deque[float], list[int]]] = {}
        self._high: dict[tuple[str, str], float] = {}  # seconds, per (provider, model)

    def observe(self, attempt: Attempt) -> None:
        if attempt.outcome != "ok" or attempt.latency_ms is None:
            return
        key = (attempt.provider, attempt.model)
        entry = self._recent.get(key)
        if entry is None:
            if len(self._recent) >= 4096:  # overrides may name any model: stay bounded
                return
            entry = self._recent[key] = (deque(maxlen=self.SAMPLES), [0])
        samples, count = entry
        samples.append(attempt.latency_ms)
        count[0] += 1
        if count[0] % self.EVERY == 0 and len(samples) >= self.MIN_SAMPLES:
            ordered = sorted(samples)
            self._high[key] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000

    def high(self, ref: tuple[str, str]) -> float | None:
        """The recent 99th percentile of `ref`'s first bytes in seconds; None until enough are seen."""
        return self._high.get(ref) if self._high else None


class HealthMonitor:
    """Keeps a ProviderHealth per provider and runs the active checks."""

    def __init__(self, providers: Mapping[str, Provider], *, interval: float, timeout: float,
                 clock: Callable[[], float] = time.time):
        self.providers = providers
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.stats: dict[str, ProviderHealth] = {}
        self._task: asyncio.Task[None] | None = None

    def get(self, name: str) -> ProviderHealth:
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = ProviderHealth()
        return stats

    def observe(self, attempt: Attempt) -> None:
        """Dispatcher's per-attempt hook: moving averages of the error rate and latency."""
        outcome = attempt.outcome
        if outcome in _NOT_ATTEMPTS:
            return
        stats = self.stats.get(attempt.provider) or self.get(attempt.provider)
        stats.requests += 1
        if outcome in _ANSWERED:
            if stats.error_rate:
                stats.error_rate -= _ALPHA * stats.error_rate
            average = stats.avg_latency_ms
            latency = attempt.latency_ms
            stats.avg_latency_ms = latency if average is None else average + _ALPHA * (latency - average)
        else:
            stats.failures += 1
            stats.error_rate += _ALPHA * (1.0 - stats.error_rate)

    async def check(self, provider: Provider) -> None:
        stats = self.get(provider.name)
        try:
            listing = await asyncio.wait_for(provider.get_json("/models", self.timeout), self.timeout)
            data = listing.get("data") if isinstance(listing, dict) else None
            stats.models_available = len(data) if isinstance(data, list) else None
            stats.last_check_ok, stats.last_check_error = True, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the check is a fact to report, not to raise
            stats.last_check_ok = False
            stats.last_check_error = _describe(exc)
            log.warning("health check of provider %s failed: %s", provider.name, stats.last_check_error)
        stats.last_check = self.clock()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(p) for p in list(self.providers.values())))

    def start(self) -> None:
        if self._task is None and self.interval > 0:
            self._task = asyncio.create_task(self._loop(), name="tiergate-health-checks")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    def snapshot(self, breaker_states: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        out = {}
        for name, provider in self.providers.items():
            stats = self.get(name)
            out[name] = {
                "available": breaker_states.get(name, "closed") != "open" and stats.last_check_ok is not False,
                "kind": provider.kind,
                "has_key": provider.has_key,
                "error_rate": round(stats.error_rate, 4),
                "avg_latency_ms": None if stats.avg_latency_ms is None else round(stats.avg_latency_ms, 3),
                "requests": stats.requests,
                "last_check": stats.last_check,
                "last_check_error": stats.last_check_error,
                "models_available": stats.models_available,
            }
        return out


def _describe(exc: BaseException) -> str:
    """A short cause with no URL query, header or key in it."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"HTTP {status}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__
