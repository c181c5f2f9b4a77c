"""Metric label values from the routing table only: a model the table does not name is counted as
`other`, so that no client-chosen name (an override, a pass-through `model`) becomes a series.

Clients may name any `provider/model` (overrides) or any model at all (pass-through); each distinct
name would otherwise be a new series in every family, held for the life of the process and rendered
on every scrape. The request log keeps the real name (bounded in length where names are resolved).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..types import ModelRef

if TYPE_CHECKING:
    from ..table.routing import RoutingTable

OTHER = "other"
_MEMO_LIMIT = 4096
# an error code as a label: short, in the alphabet tiergate's and the providers' codes use
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def table_models(table: RoutingTable) -> frozenset[str]:
    """Every `provider/model` the table names: routes (chat, embeddings, completions models), aliases,
    the table's embeddings models, prices and providers' model lists."""
    names: set[str] = set()
    for route in table.routes.values():
        names.update(map(str, route.candidates))
        names.update(map(str, route.embeddings))
        names.update(map(str, route.completions))
    for route in (*table.routes.values(), *table.alias_routes.values()):  # the deployments they mirror to
        if route.shadow is not None:
            names.add(str(route.shadow.model))
    names.update(map(str, table.aliases.values()))
    names.update(map(str, table.models()))  # aliases that are routes, groups' deployments
    names.update(map(str, table.embeddings))
    names.update(table.pricing)
    for spec in table.providers.values():
        names.update(f"{spec.name}/{model}" for model in spec.models)
    return frozenset(names)


class ModelLabels:
    """`provider/model` as a label (`other` unless the table names it) and as a log value, memoised per
    model; `table_changed` swaps the names the table knows."""

    __slots__ = ("_known", "_memo")

    def __init__(self) -> None:
        self._known: frozenset[str] | None = None  # None: no table yet (a library without one): no labels
        self._memo: dict[ModelRef, tuple[str, str, str]] = {}

    def table_changed(self, table: RoutingTable) -> None:
        self._known = table_models(table)
        self._memo = {}

    def of(self, ref: ModelRef) -> tuple[str, str, str]:
        """(`provider/model` label, the model id as a label, `provider/model` as named) of `ref`."""
        found = self._memo.get(ref)
        if found is None:
            name = f"{ref.provider}/{ref.model}"
            known = self._known is not None and name in self._known
            found = (name, ref.model, name) if known else (OTHER, OTHER, name)
            if len(self._memo) >= _MEMO_LIMIT:  # clients may name any model: stay bounded
                self._memo.clear()
            self._memo[ref] = found
        return found

    def deployment(self, name: str) -> str:
        """A deployment's model (`provider/model` given) as a label."""
        return name.partition("/")[2] if self._known is not None and name in self._known else OTHER


def error_label(error: str) -> str:
    """An error type as a label: tiergate's codes pass, anything longer or stranger is `other` (a
    provider's error code is relayed, and a provider may echo what a client sent)."""
    return error if _ERROR_CODE.fullmatch(error) else OTHER
