"""The planning step: `Planner.plan(decision, request) -> Plan`, the ordered candidates of one request,
each with how it is sent, chosen in one place.

In order: the limits admit the request (a budget may downgrade it to a cheaper tier's route); the
route's defaults are filled in; the API family narrows the candidates (a stored response's holder) and
says how each is sent (a translation); the route's strategy orders them (a group's own strategy orders
its deployments in its place); without fallback only the first is kept. An `ordered` route without groups
is planned once per decision (the memo); a route that chooses per request is planned afresh. Breakers,
cooldowns and the fleet's blocks are not planned: they change between attempts, so the attempt loop's
gate asks them just before each try.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import cheapest, least_latency, ordered, weighted
from .choosing import Choosing
from .load import DeploymentLoad
from .plan import Candidate, Plan

if TYPE_CHECKING:
    from ..adapters.base import Endpoint, Translator
    from ..fleet.affinity import ResponseAffinity
    from ..limits.admission import Quotas
    from ..outcome import RequestRecord
    from ..table.routing import RouteDecision, RoutingTable
    from ..types import ModelRef

Strategy = Callable[[Sequence[Any], Choosing], list[Any]]
# strategies by name (the table's `strategy:`): each orders a route's candidates, or a group's members,
# for one request
STRATEGIES: dict[str, Strategy] = {"ordered": ordered.order, "weighted": weighted.order,
                                   "least_latency": least_latency.order, "cheapest": cheapest.order}
_MEMO_LIMIT = 4096
_EXPLAIN_MAX = 200  # x-tiergate-strategy: bounded, however long the model names


class Planner:
    """Turns a route decision into a plan. Holds no per-request state."""

    def __init__(self, quotas: Quotas, affinity: ResponseAffinity, *, fallback: bool = True,
                 rng: random.Random | None = None):
        self.quotas = quotas
        self.affinity = affinity
        self.fallback = fallback
        # the deployments' live load (least_latency reads it; the attempt loop feeds it)
        self.load = DeploymentLoad()
        self.rng = rng or random.Random()
        # the plan of each decision that needs nothing per request (the usual one), made once (a decision
        # is hashed by identity)
        self._plans: dict[RouteDecision, Plan] = {}
        # per order a route that chooses per request has taken: its plan and explanation
        self._chosen: dict[tuple[Any, ...], tuple[Plan, str, tuple[str, ...]]] = {}

    async def plan(self, decision: RouteDecision, table: RoutingTable, endpoint: Endpoint, payload: dict[str, Any],
                   record: RequestRecord, key_name: str | None = None) -> Plan:
        """The plan of one request (`payload`, to `endpoint`); `key_name` is its inbound key's name
        (limits may be scoped by it); `record` gets the route's name and the limits' charge."""
        if table.limits is not None:  # rate limits and budgets: charge an estimate now (may downgrade)
            decision = await self.quotas.admit(table.limits, table, decision, payload, key_name, record)
        if not endpoint.stateful and not table.mixed_apis:
            return self.plan_now(decision, endpoint, payload, record)
        record.route = decision.name
        if decision.route is not None:
            endpoint.apply_defaults(payload, decision.route)
        narrowed, translate = await endpoint.candidates(decision, payload, table, self.affinity.for_key(key_name))
        if decision.layout and (narrowed is decision or set(narrowed.candidates) <= set(decision.candidates)):
            # the family may narrow the candidates (a stored response's holder, the providers that speak
            # its API): the strategy still orders those left
            return self._choose(decision, payload, record, translate,
                                None if narrowed is decision else frozenset(narrowed.candidates))
        return self._plan(narrowed, translate)

    def plan_now(self, decision: RouteDecision, endpoint: Endpoint, payload: dict[str, Any],
                 record: RequestRecord) -> Plan:
        """`plan` for a request that waits for nothing: no limits to admit it, an endpoint without a say
        in the candidates. The usual request, planned without a coroutine."""
        record.route = decision.name
        if decision.layout:  # chooses per request: no memo
            plan = self._choose(decision, payload, record, None)
            if plan.defaults and plan.route is not None:
                endpoint.apply_defaults(payload, plan.route)
            return plan
        plan = self._plans.get(decision)
        if plan is None:
            plan = self._plan(decision, None)
            if len(self._plans) >= _MEMO_LIMIT:  # overrides make a decision per request: stay bounded
                self._plans.clear()
            self._plans[decision] = plan
        route = plan.route
        if plan.defaults and route is not None:
            endpoint.apply_defaults(payload, route)
        return plan

    def _choose(self, decision: RouteDecision, payload: dict[str, Any], record: RequestRecord,
                translate: Translator | None, allowed: frozenset[ModelRef] | None = None) -> Plan:
        """The plan of a route that chooses per request: its strategy orders its candidates, each group's
        strategy its members in the group's place (only the `allowed` ones, when the API family narrowed
        them); the choice is explained on the record."""
        choosing = Choosing(self.load, self.rng, payload, decision)
        layout = decision.layout
        if allowed is not None:
            layout = tuple(g._replace(members=kept) for g in layout
                           if (kept := tuple(m for m in g.members if m.ref in allowed)))
        slots = STRATEGIES[decision.strategy](layout, choosing)
        refs: list[Any] = [decision, slots[0].name]  # the memo's key: the decision, then the order
        for group in slots:
            members = group.members
            if len(members) == 1:
                refs.append(members[0].ref)
            else:
                refs.extend(m.ref for m in STRATEGIES[group.strategy](members, choosing))
        key = tuple(refs)
        chosen = self._chosen.get(key) if translate is None else None
        if chosen is None:  # a route has few orders: each planned and explained once
            order = tuple(dict.fromkeys(key[2:]))  # a deployment named twice is tried at its first place
            first, ref = slots[0], order[0]
            chose = (decision.strategy if len(first.members) < 2
                     else f"{decision.strategy}+{first.name}:{first.strategy}")
            chosen = (self._plan(decision, translate, order), f"{chose} {ref.provider}/{ref.model}"[:_EXPLAIN_MAX],
                      tuple(f"{r.provider}/{r.model}" for r in order))
            if translate is None:
                if len(self._chosen) >= _MEMO_LIMIT:
                    self._chosen.clear()
                self._chosen[key] = chosen
        plan, record.strategy, record.candidates = chosen
        return plan

    def _plan(self, decision: RouteDecision, translate: Translator | None,
              refs: tuple[ModelRef, ...] | None = None) -> Plan:
        if refs is None:
            refs = decision.candidates
        if not self.fallback:
            refs = refs[:1]
        rules = decision.plans
        route = decision.route
        return Plan(decision.name, route, tuple(
            Candidate(ref, rules.get(ref) if rules else None, translate(ref) if translate is not None else None)
            for ref in refs), route is not None and (route.max_tokens is not None or route.temperature is not None
                                                     or bool(route.system_prompt)))
