"""The `least_latency` strategy: power of two choices over the deployments' load (`load.py`): two
candidates drawn at random, the one with the lower (outstanding + 1) x peak-EWMA latency goes first; the
others follow from the least loaded up, a deployment out for now (open breaker, cooldown) last. A group
counts as its least loaded member. Two random choices, not the global best, so that many sidecars
acting on the same stale view do not all pile onto one deployment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .choosing import Choosing

T = TypeVar("T")


def order(options: Sequence[T], choosing: Choosing) -> list[T]:
    n = len(options)
    if n < 2:
        return list(options)
    cost = choosing.load.cost
    costs = [min(cost(ref) for ref in o.refs) for o in options]  # type: ignore[attr-defined]
    i, j = choosing.two(n)
    first = i if costs[i] <= costs[j] else j
    if costs[first] == math.inf:  # both draws are out for now: the best of the rest instead
        first = min(range(n), key=costs.__getitem__)
    rest = sorted((k for k in range(n) if k != first), key=costs.__getitem__)
    return [options[first], *(options[k] for k in rest)]
