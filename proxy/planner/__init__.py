"""The planning step: `Planner.plan(decision, request) -> Plan`, the ordered candidates of one request,
each with how it is sent, chosen in one place.

In order: the limits admit the request (a budget may downgrade it to a cheaper tier's route); the
route's defaults are filled in; the API family narrows the candidates (a stored response's holder) and
says how each is sent (a translation); the route's strategy orders them; without fallback only the
first is kept. Breakers, cooldowns and the fleet's blocks are not planned: they change between
attempts, so the attempt loop's gate asks them just before each try.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import ordered
from .plan import Candidate, Plan

if TYPE_CHECKING:
    from ..adapters.base import Endpoint
    from ..fleet.affinity import ResponseAffinity
    from ..limits.admission import Quotas
    from ..outcome import RequestRecord
    from ..table.routing import RouteDecision, RoutingTable
    from ..types import ModelRef

Strategy = Callable[[tuple["ModelRef", ...]], tuple["ModelRef", ...]]
# strategies by name; a route takes `ordered` until the table can name another
STRATEGIES: dict[str, Strategy] = {"ordered": ordered.order}


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What the planner needs of one request."""

    endpoint: Endpoint
    payload: dict[str, Any]
    record: RequestRecord
    key_name: str | None = None  # the inbound key's name: limits may be scoped by it


class Planner:
    """Turns a route decision into a plan. Holds no per-request state."""

    def __init__(self, quotas: Quotas, affinity: ResponseAffinity, *, fallback: bool = True):
        self.quotas = quotas
        self.affinity = affinity
        self.fallback = fallback

    async def plan(self, decision: RouteDecision, request: PlanRequest, table: RoutingTable) -> Plan:
        payload = request.payload
        if table.limits is not None:  # rate limits and budgets: charge an estimate now (may downgrade)
            decision = await self.quotas.admit(table.limits, table, decision, payload, request.key_name,
                                               request.record)
        request.record.route = decision.name
        route = decision.route
        endpoint = request.endpoint
        if route is not None:
            endpoint.apply_defaults(payload, route)
        decision, translate = await endpoint.candidates(decision, payload, table, self.affinity)
        refs = STRATEGIES["ordered"](decision.candidates)
        if not self.fallback:
            refs = refs[:1]
        rules = decision.plans
        if not rules and translate is None:  # the usual request: nothing per candidate
            return Plan(decision.name, route, tuple(Candidate(ref) for ref in refs))
        return Plan(decision.name, route, tuple(
            Candidate(ref, rules.get(ref) if rules else None, translate(ref) if translate is not None else None)
            for ref in refs))
