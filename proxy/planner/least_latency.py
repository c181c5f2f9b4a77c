"""The `least_latency` strategy: power of two choices over the deployments' load (`load.py`): two
candidates drawn at random, the one with the lower (outstanding + 1) x peak-EWMA latency goes first; the
others follow from the least loaded up, a deployment out for now (open breaker, cooldown) last. A group
counts as its least loaded member. Two random choices, not the global best, so that many sidecars
acting on the same stale view do not all pile onto one deployment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from ..types import Group

if TYPE_CHECKING:
    from .choosing import Choosing

T = TypeVar("T")


def order(options: Sequence[T], choosing: Choosing) -> list[T]:
    n = len(options)
    if n < 2:
        return list(options)
    cost = choosing.load.cost
    costs = []
    for o in options:
        if type(o) is Group:  # a candidate of the route: one deployment, or a group at its best member's
            members = o.members  # type: ignore[attr-defined]
            costs.append(cost(members[0].ref) if len(members) == 1 else min(cost(m.ref) for m in members))
        else:  # a member of a group
            costs.append(cost(o.ref))  # type: ignore[attr-defined]
    i, j = choosing.two(n)
    first = i if costs[i] <= costs[j] else j
    if costs[first] == math.inf:  # both draws are out for now: the best of the rest instead
        first = costs.index(min(costs))
    if n == 2:
        return [options[first], options[1 - first]]
    rest = sorted((k for k in range(n) if k != first), key=costs.__getitem__)
    return [options[first], *(options[k] for k in rest)]
