"""The `weighted` strategy: the first candidate drawn by weight (a canary at 5%), the others after it in
the listed order. A weight of 0 is never drawn first but stays a fallback. The draw comes from the
request's affinity key when it has one (see `choosing.py`), so a conversation stays on one deployment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .choosing import Choosing

T = TypeVar("T")


def order(options: Sequence[T], choosing: Choosing) -> list[T]:
    weights = [o.weight for o in options]  # type: ignore[attr-defined]
    total = sum(weights)
    if len(options) < 2 or total <= 0:
        return list(options)
    point = choosing.unit() * total
    for i, weight in enumerate(weights):
        point -= weight
        if point < 0 and weight > 0:
            chosen = i
            break
    else:  # rounding left the point at the very end: the last option with a weight
        chosen = max(i for i, w in enumerate(weights) if w > 0)
    return [options[chosen], *(o for i, o in enumerate(options) if i != chosen)]
