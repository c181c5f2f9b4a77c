"""What each deployment is doing now, as `least_latency` reads it: calls outstanding and a peak-EWMA of
its latency (Finagle's and Linkerd's load measure).

The attempt loop feeds it: `started` when an attempt has its pool slot, `ended` when the attempt is over
(a whole answer's end; a stream's first chunk, so a stream is measured by its first-byte time). The
average jumps at once to a latency above it (a deployment slowing down is noticed at its first slow
answer) and decays toward lower ones with a time constant, so one fast answer does not erase a slow
period. A failed attempt never lowers it. Only the table's deployments are kept (`track`), so memory is
bounded however many models clients name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..types import ModelRef

DECAY_S = 10.0  # the average's time constant (Linkerd's default)
# a deployment not measured yet is worth a try, but not by every call at once: each call already
# waiting on it counts this many milliseconds
_UNMEASURED_MS = 1000.0
_exp = math.exp


class DeploymentStats:
    """One deployment's live load. The attempt loop holds it for the length of an attempt: `outstanding`
    is counted up when the attempt starts and `ended` settles it (a plain attribute and one call: this
    runs on every attempt)."""

    __slots__ = ("outstanding", "latency_ms", "stamp", "samples")

    def __init__(self) -> None:
        self.outstanding = 0
        self.latency_ms = 0.0  # the peak-EWMA; meaningful once `samples` > 0
        self.stamp = 0.0
        self.samples = 0

    def ended(self, latency_ms: float | None, ok: bool, now: float) -> None:
        """An attempt is over at `now` (seconds, time.perf_counter); `latency_ms` is how long it took
        (None: cancelled, not measured)."""
        if self.outstanding > 0:
            self.outstanding -= 1
        if latency_ms is None:
            return
        average = self.latency_ms
        if latency_ms >= average or not self.samples:
            self.latency_ms = latency_ms
        elif ok:  # a quick failure is no sign of speed: it never lowers the average
            kept = _exp((self.stamp - now) / DECAY_S) if now > self.stamp else 1.0
            self.latency_ms = average * kept + latency_ms * (1.0 - kept)
        self.stamp = now
        self.samples += 1


def _never(ref: ModelRef) -> bool:
    return False


class DeploymentLoad:
    """Per deployment of the table: outstanding calls and the moving latency. `unavailable(ref)` says
    whether a deployment is out for now (an open breaker, a cooldown): set by whoever owns those."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        # one dict for the router's lifetime (the attempt loop holds it), its entries the table's deployments
        self.stats: dict[ModelRef, DeploymentStats] = {}
        self.clock = clock
        self.unavailable: Callable[[ModelRef], bool] = _never

    def track(self, refs: Iterable[ModelRef]) -> None:
        """Keep the load of these deployments (a new table's): the ones kept keep what they measured."""
        stats = self.stats
        kept = {ref: stats.get(ref) or DeploymentStats() for ref in refs}
        stats.clear()
        stats.update(kept)

    def started(self, ref: ModelRef) -> DeploymentStats | None:
        stats = self.stats.get(ref)
        if stats is not None:
            stats.outstanding += 1
        return stats

    def ended(self, ref: ModelRef, latency_ms: float | None, ok: bool) -> None:
        stats = self.stats.get(ref)
        if stats is not None:
            stats.ended(latency_ms, ok, self.clock())

    def cost(self, ref: ModelRef) -> float:
        """What sending one more call to `ref` is expected to cost: (outstanding + 1) x its moving latency;
        infinite while it is out (breaker open, cooling down); an unmeasured one is cheap while idle."""
        if self.unavailable(ref):
            return math.inf
        stats = self.stats.get(ref)
        if stats is None:
            return _UNMEASURED_MS
        if stats.samples == 0:
            return stats.outstanding * _UNMEASURED_MS
        return (stats.outstanding + 1) * stats.latency_ms

    def snapshot(self, weights: dict[ModelRef, dict[str, float]] | None = None) -> dict[str, dict[str, Any]]:
        """Per deployment (`provider/model`): moving latency (ms, null until measured), outstanding calls,
        and its weights in the groups and routes that give it one."""
        out = {}
        for ref, stats in self.stats.items():
            entry: dict[str, Any] = {
                "latency_ms": round(stats.latency_ms, 3) if stats.samples else None,
                "outstanding": stats.outstanding, "samples": stats.samples}
            if weights and ref in weights:
                entry["weights"] = weights[ref]
            out[f"{ref.provider}/{ref.model}"] = entry
        return out
