"""The planner's strategies, each alone and deterministic (a seeded RNG), and the table's groups,
weights and aliases that name routes."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from proxy.outcome import RequestRecord
from proxy.planner import STRATEGIES, Planner, cheapest, least_latency, ordered, weighted
from proxy.planner.choosing import Choosing
from proxy.planner.load import DeploymentLoad
from proxy.table.groups import STRATEGY_NAMES
from proxy.table.routing import Pricing, RouteDecision, table_from_dict
from proxy.types import ConfigError, Group, Member, ModelRef

A, B, C = ModelRef("a", "m"), ModelRef("b", "m"), ModelRef("c", "m")


def options(*weights: float) -> tuple[Member, ...]:
    return tuple(Member(ref, w) for ref, w in zip((A, B, C), weights, strict=False))


def choosing(payload=None, *, seed=1, load=None, prices=None) -> Choosing:
    decision = RouteDecision("r", (A, B, C), prices=prices or {})
    return Choosing(load or DeploymentLoad(), random.Random(seed), payload or {}, decision)


def test_every_strategy_the_table_accepts_is_a_planner_module():
    assert set(STRATEGIES) == set(STRATEGY_NAMES)


def test_ordered_keeps_the_listed_order():
    assert ordered.order(options(1, 1, 1), choosing()) == list(options(1, 1, 1))


def test_weighted_splits_first_choices_by_weight_and_keeps_the_rest_in_order():
    pick = choosing(seed=7)
    firsts = Counter(weighted.order(options(90, 10), pick)[0].ref for _ in range(10_000))
    assert 0.88 <= firsts[A] / 10_000 <= 0.92
    order = weighted.order(options(0, 1, 1), choosing(seed=3))
    assert order[0].ref != A and A in [m.ref for m in order]  # weight 0: never first, still a fallback


def test_weighted_is_stable_for_one_user_and_spreads_users():
    first = {weighted.order(options(1, 1), choosing({"user": "alice"}, seed=s))[0].ref for s in range(20)}
    assert len(first) == 1  # the same user, whatever the random state
    users = Counter(weighted.order(options(1, 1), choosing({"user": f"u{i}"}))[0].ref for i in range(1000))
    assert 400 <= users[A] <= 600


def test_least_latency_prefers_the_less_loaded_and_puts_what_is_out_last():
    now = [0.0]
    load = DeploymentLoad(clock=lambda: now[0])
    load.track([A, B, C])
    load.ended(A, 20.0, True)
    load.ended(B, 200.0, True)
    load.ended(C, 5.0, True)
    load.unavailable = lambda ref: ref == C
    pick = choosing(load=load, seed=5)
    orders = Counter(tuple(m.ref for m in least_latency.order(options(1, 1, 1), pick)) for _ in range(300))
    # two of three drawn: A first unless the draw was {B, C}; C (out) always last
    assert set(orders) == {(A, B, C), (B, A, C)} and 150 <= orders[(A, B, C)] <= 250
    assert [m.ref for m in least_latency.order(options(1, 1), pick)] == [A, B]  # of two: always the best
    for _ in range(12):  # A busy: 13 x 20 ms > 200 ms
        load.started(A)
    assert least_latency.order(options(1, 1), pick)[0].ref == B


def test_peak_ewma_jumps_up_at_once_and_decays_down_with_time():
    now = [0.0]
    load = DeploymentLoad(clock=lambda: now[0])
    load.track([A])
    load.ended(A, 20.0, True)
    load.ended(A, 300.0, True)
    assert load.cost(A) == 300.0  # a slow answer is noticed at once
    now[0] += 10.0
    load.ended(A, 20.0, True)
    assert load.cost(A) == pytest.approx(300 * math.exp(-1) + 20 * (1 - math.exp(-1)))
    load.ended(A, 1.0, False)  # a quick failure is no sign of speed
    assert load.cost(A) >= 100
    load.started(A)
    load.ended(A, None, False)  # cancelled: counted off, not measured
    assert load.stats[A].outstanding == 0 and load.stats[A].samples == 4
    load.ended(ModelRef("x", "y"), 5.0, True)  # not a deployment of the table: not kept
    assert ModelRef("x", "y") not in load.stats


def test_an_unmeasured_deployment_is_tried_but_not_by_every_waiting_call():
    load = DeploymentLoad()
    load.track([A, B])
    load.ended(A, 50.0, True)
    assert load.cost(B) == 0.0
    load.started(B)
    assert load.cost(B) > load.cost(A)


def test_cheapest_orders_by_the_requests_expected_price_unpriced_last():
    prices = {A: Pricing(10.0, 30.0), B: Pricing(0.5, 1.5)}
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    assert [m.ref for m in cheapest.order(options(1, 1, 1), choosing(payload, prices=prices))] == [B, A, C]


def table(**extra):
    doc = {"providers": {"a": {"base_url": "http://127.0.0.1:9/v1"}, "b": {"base_url": "http://127.0.0.1:9/v1"},
                         "c": {"base_url": "http://127.0.0.1:9/v1"}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "a/m", "fallbacks": ["c/m"]}]}
    doc.update(extra)
    return table_from_dict(doc, source="test")


def test_a_group_is_tried_whole_before_the_next_fallback():
    t = table(groups={"g": {"strategy": "least_latency", "deployments": [{"model": "a/m", "weight": 3}, "b/m"]}},
              routes=[{"use_case": "general_purpose", "tier": "standard", "model": "g", "fallbacks": ["c/m"]}])
    decision = t.resolve(None, None, "general_purpose")
    assert decision.candidates == (A, B, C) and decision.layout[0].strategy == "least_latency"
    planner = Planner(None, None, rng=random.Random(2))  # type: ignore[arg-type]
    planner.load.track(t.models())
    record = RequestRecord("r", "chat")
    plan = planner._choose(decision, {}, record, None)
    assert [c.ref for c in plan.candidates][2] == C and {c.ref for c in plan.candidates[:2]} == {A, B}
    assert record.strategy.startswith("ordered+g:least_latency ")
    assert t.resolve(None, None, "g").candidates == (A, B)  # a group's name is a model name too
    assert t.describe()[0]["groups"] == ["g"] and t.chooses
    assert not table().chooses  # an ordered table keeps no load


def test_a_fallback_entry_that_says_how_it_continues_works_under_groups_and_strategies():
    t = table(groups={"g": {"deployments": ["a/m", "b/m"]}},
              routes=[{"use_case": "general_purpose", "tier": "standard", "model": "g", "strategy": "weighted",
                       "fallbacks": [{"model": "c/m", "continuation": "prefix"}]}])
    route = t.resolve(None, None, "general_purpose").route
    assert route.fallbacks[-1] == C and route.continuations == ((C, "prefix"),)


def test_aliases_name_routes_and_the_plain_form_still_works():
    t = table(aliases={"fast": "b/m", "smart": {"model": "a/m", "fallbacks": ["b/m"], "max_tokens": 64},
                       "std": {"route": "general_purpose:standard"}})
    smart = t.resolve(None, None, "smart")
    assert smart.name == "alias:smart" and smart.candidates == (A, B) and smart.route.max_tokens == 64
    assert t.resolve(None, None, "fast").candidates == (B,)
    assert t.resolve(None, None, "std") is t.resolve(None, None, "general_purpose")


@pytest.mark.parametrize("extra, message", [
    ({"routes": [{"use_case": "general_purpose", "tier": "standard", "model": "a/m", "strategy": "fastest"}]},
     "routes[0].strategy: 'fastest' is not one of"),
    ({"routes": [{"use_case": "general_purpose", "tier": "standard", "model": "a/m", "weights": [1, 2]}]},
     "routes[0].weights: must be a list of 1 numbers"),
    ({"groups": {"g": {"deployments": []}}}, "groups.g: deployments: must be a non-empty list"),
    ({"groups": {"g": ["a/m", {"model": "zz/m"}]}}, "groups.g: deployments[1].model: 'zz/m' names provider"),
    ({"aliases": {"x": {"route": "debugging:premium"}}}, "aliases.x.route: 'debugging:premium' is not a route"),
])
def test_bad_strategy_settings_name_their_key(extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        table(**extra)


def test_the_usual_route_has_no_layout_and_is_planned_from_the_memo():
    decision = table().resolve(None, None, None)
    assert decision.layout == ()
    planner = Planner(None, None)  # type: ignore[arg-type]

    class Endpoint:
        def apply_defaults(self, payload, route):
            pass

    record = RequestRecord("r", "chat")
    first = planner.plan_now(decision, Endpoint(), {}, record)  # type: ignore[arg-type]
    assert planner.plan_now(decision, Endpoint(), {}, record) is first and record.strategy == ""


def test_group_weights_shape():
    g = Group("g", (Member(A, 9), Member(B)), "weighted")
    assert g.refs == (A, B)


def test_the_candidates_an_api_family_keeps_are_still_ordered_by_the_strategy():
    t = table(groups={"g": ["a/m", "b/m"]},
              routes=[{"use_case": "general_purpose", "tier": "standard", "model": "g", "fallbacks": ["c/m"]}])
    decision = t.resolve(None, None, "general_purpose")
    planner = Planner(None, None, rng=random.Random(4))  # type: ignore[arg-type]
    plan = planner._choose(decision, {}, RequestRecord("r", "chat"), None, frozenset({B, C}))
    assert [c.ref for c in plan.candidates] == [B, C]
