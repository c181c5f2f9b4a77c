"""A plan: the ordered candidates one request may be sent to, each with how it is sent.

Named tuples: frozen values made at C speed (a plan and its candidates may be made per request)."""

from __future__ import annotations

from typing import NamedTuple

from ..adapters.base import Translation
from ..table.routing import ParamRule
from ..types import ModelRef, Route


class Candidate(NamedTuple):
    """One deployment to try: its model, the table's rule for it (fields it refuses, its first-byte
    budget), and its translation when its provider speaks another API than the client's."""

    ref: ModelRef
    rule: ParamRule | None = None
    translation: Translation | None = None


class Plan(NamedTuple):
    """Where one request goes, in order. `name` is the route's (`use_case:tier`, or what the client named)."""

    name: str
    route: Route | None
    candidates: tuple[Candidate, ...]
    defaults: bool = False  # the route sets defaults (max_tokens, temperature, system prompt) to fill in

    def after(self, ref: ModelRef) -> Plan:
        """The candidates after `ref`'s first place (what a hedge or a recovery may try instead); none
        when `ref` is not in the plan."""
        refs = [c.ref for c in self.candidates]
        if ref not in refs:
            return Plan(self.name, self.route, ())
        return Plan(self.name, self.route, tuple(c for c in self.candidates[refs.index(ref) + 1:] if c.ref != ref))

    def first(self) -> Plan:
        """The first candidate alone (fallback turned off)."""
        return Plan(self.name, self.route, self.candidates[:1])
