"""The `cheapest` strategy: the candidates by the request's expected price at each (the table's
`pricing`, the prompt's estimate and the answer's allowance), cheapest first; those without a price
after, in the listed order. A group is priced at its cheapest member. A candidate too small for the
request is skipped by the attempt loop as under every strategy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .choosing import Choosing

T = TypeVar("T")


def order(options: Sequence[T], choosing: Choosing) -> list[T]:
    if len(options) < 2:
        return list(options)
    price = choosing.price
    return sorted(options, key=lambda o: min(price(ref) for ref in o.refs))  # type: ignore[attr-defined]
