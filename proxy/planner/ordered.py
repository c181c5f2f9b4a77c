"""The `ordered` strategy: the route's model first, then its fallbacks, as the table lists them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def order(options: Sequence[T], choosing: Any = None) -> list[T]:
    return list(options)
