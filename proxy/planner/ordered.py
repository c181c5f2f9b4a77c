"""The `ordered` strategy: the route's model first, then its fallbacks, as the table lists them."""

from __future__ import annotations

from ..types import ModelRef


def order(candidates: tuple[ModelRef, ...]) -> tuple[ModelRef, ...]:
    return candidates
