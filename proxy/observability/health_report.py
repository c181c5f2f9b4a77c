"""The `/health/details` document (`Router.get_health_status()`), assembled from the parts' own
snapshots: provider checks (engine/health.py), breakers (engine/breaker.py), the routing table and its
database, limits, cache, batching and the fleet's shared health (fleet/state.py).

The overall status: `unhealthy` without a table or with every provider unavailable; `degraded` when
some provider is unavailable, the table has problems, a breaker is not closed, the table's database is
not connected, or limits are counted by the failure policy because Redis is unreachable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..table.routing import RoutingTable


def overall_status(table: RoutingTable | None, providers: Mapping[str, Mapping[str, Any]],
                   breakers: Mapping[str, Mapping[str, Any]], database: Mapping[str, Any] | None,
                   limits: Mapping[str, Any]) -> str:
    """healthy, degraded or unhealthy (see the module's docstring)."""
    unavailable = sum(1 for p in providers.values() if not p["available"])
    if table is None or (providers and unavailable == len(providers)):
        return "unhealthy"
    if unavailable or table.problems or any(b["state"] != "closed" for b in breakers.values()):
        return "degraded"
    if database is not None and database["database"]["state"] != "connected":
        return "degraded"
    if limits["limits"] and limits["state"].startswith("unreachable"):
        return "degraded"  # limits are counted by the failure policy, not for the fleet
    return "healthy"


def health_report(table: RoutingTable | None, *, ready: bool, uptime_s: float,
                  providers: dict[str, Any], breakers: dict[str, Any], database: dict[str, Any] | None,
                  limits: dict[str, Any], cache: Any, batching: Any, warnings: list[str],
                  fleet_health: Any) -> dict[str, Any]:
    """The document: each part as its own snapshot gave it, the table's source, age, route count and
    problems (with its database's state when it comes from Postgres), and the overall status."""
    routing_table = None if table is None else {
        "source": table.source, "age_s": round(table.age(), 3), "routes": len(table.routes),
        "problems": list(table.problems)}
    if routing_table is not None and database is not None:
        routing_table.update(database)
    return {
        "status": overall_status(table, providers, breakers, database, limits),
        "ready": ready,
        "uptime_s": round(uptime_s, 3),
        "providers": providers,
        "circuit_breakers": breakers,
        "routing_table": routing_table,
        "cache": cache,
        "batching": batching,
        "warnings": warnings,
        "limits": limits,
        "fleet_health": fleet_health,
    }
