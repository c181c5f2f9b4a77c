"""The `/metrics` families of the rate limits and budgets, computed when scraped (nothing on the
request path). The collector is given what it reads, the limits' counters (`Quotas`) and a callable
returning the current table's limits, instead of reaching into the router."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..limits.admission import Quotas
    from ..limits.spec import LimitIndex


class LimitsCollector:
    """A prometheus-client collector of each limit's cap, use, remainder and refusals, the budget
    downgrades, and where limits are counted."""

    def __init__(self, quotas: Quotas, limits: Callable[[], LimitIndex | None]):
        self.quotas = quotas
        self.limits = limits

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        quotas = self.quotas
        snapshot = quotas.snapshot(self.limits())
        labels = ["limit", "kind"]
        capacity = GaugeMetricFamily("tiergate_limit_capacity", "Each limit's cap (requests or tokens per "
                                     "minute, USD per day or month)", labels=labels)
        used = GaugeMetricFamily("tiergate_limit_used", "Use of each limit in its current window, as last "
                                 "seen (spend in USD for budgets)", labels=labels)
        remaining = GaugeMetricFamily("tiergate_limit_remaining", "What is left of each limit in its current "
                                      "window, as last seen", labels=labels)
        rejected = CounterMetricFamily("tiergate_limit_rejected", "Requests this process refused for a "
                                       "limit", labels=labels)
        for row in snapshot["limits"]:
            values = [row["name"], row["kind"]]
            capacity.add_metric(values, row["limit"])
            used.add_metric(values, row["used"])
            remaining.add_metric(values, row["remaining"])
            rejected.add_metric(values, row["rejected"])
        downgraded = CounterMetricFamily("tiergate_limit_downgraded", "Requests this process sent to a "
                                         "cheaper tier because a budget was exhausted", labels=["limit"])
        for name, n in quotas.downgraded.items():
            downgraded.add_metric([name], n)
        info = GaugeMetricFamily("tiergate_limits_backend", "Where limits are counted (1 on the current "
                                 "state: shared, local, unreachable) and the policy while Redis is unreachable",
                                 labels=["state", "policy"])
        info.add_metric([quotas.state().partition(" ")[0], quotas.policy], 1)
        by_policy = CounterMetricFamily("tiergate_limits_policy_decisions", "Requests admitted or refused by "
                                        "the failure policy because Redis could not be reached")
        by_policy.add_metric([], quotas.decided_by_policy)
        yield from (capacity, used, remaining, rejected, downgraded, info, by_policy)
