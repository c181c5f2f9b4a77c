"""Model groups, route strategies and aliases that name routes, as the table file says them.

`groups:` names sets of equivalent deployments (one model on several providers, keys or replicas),
each with a strategy and optional weights; a group's name may stand wherever a route names a model.
A route's `strategy:` (and `weights:`, one per candidate) orders its candidates per request. Parsing
only: the planner chooses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..types import Group, Member, ModelRef

STRATEGY_NAMES = ("ordered", "weighted", "least_latency", "cheapest")
# a group exists to spread calls: unless it says otherwise its members share them evenly (or by weight)
GROUP_STRATEGY = "weighted"
GROUP_KEYS = frozenset({"strategy", "deployments"})
DEPLOYMENT_KEYS = frozenset({"model", "weight"})


def parse_strategy(raw: Any, default: str = "ordered") -> str:
    if raw is None:
        return default
    if raw not in STRATEGY_NAMES:
        raise ValueError(f"strategy: {raw!r} is not one of {', '.join(STRATEGY_NAMES)}")
    return str(raw)


def _weight(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not raw >= 0:
        raise ValueError(f"{where}: {raw!r} is not a number of zero or more")
    return float(raw)


def _ref(raw: Any, providers: Mapping[str, Any], where: str) -> ModelRef:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{where}: {raw!r} is not a provider/model reference")
    try:
        ref = ModelRef.parse(raw.strip())
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if ref.provider not in providers:
        raise ValueError(f"{where}: {raw!r} names provider {ref.provider!r}, which is not defined "
                         f"(providers: {', '.join(providers) or 'none'})")
    return ref


def parse_group(name: str, raw: Any, providers: Mapping[str, Any]) -> Group:
    """One entry of `groups:`: `{strategy, deployments: [provider/model | {model, weight}]}`, or just
    the list of deployments. ValueError names the key."""
    if isinstance(raw, list):
        raw = {"deployments": raw}
    if not isinstance(raw, dict):
        raise ValueError("must be a mapping with deployments (and strategy), or a list of provider/model")
    unknown = set(raw) - GROUP_KEYS
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key (allowed: {', '.join(sorted(GROUP_KEYS))})")
    if name.partition("/")[0] in providers:
        raise ValueError("a group's name must not read as provider/model of the table")
    deployments = raw.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise ValueError("deployments: must be a non-empty list of provider/model or {model, weight}")
    members: list[Member] = []
    for i, entry in enumerate(deployments):
        where = f"deployments[{i}]"
        if isinstance(entry, dict):
            unknown = set(entry) - DEPLOYMENT_KEYS
            if unknown:
                raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown key (allowed: model, weight)")
            weight = _weight(entry.get("weight", 1), f"{where}.weight")
            members.append(Member(_ref(entry.get("model"), providers, f"{where}.model"), weight))
        else:
            members.append(Member(_ref(entry, providers, where)))
    if not any(m.weight > 0 for m in members):
        raise ValueError("deployments: at least one must have a weight above zero")
    return Group(name, tuple(members), parse_strategy(raw.get("strategy"), GROUP_STRATEGY))


def parse_groups(raw: Any, providers: Mapping[str, Any], problems: list[str]) -> dict[str, Group]:
    """`groups:`, name -> Group; a bad entry is a problem naming its key, the rest load."""
    raw = raw or {}
    if not isinstance(raw, dict):
        problems.append("groups: must be a mapping of name to {strategy, deployments}")
        return {}
    groups: dict[str, Group] = {}
    for name, entry in raw.items():
        try:
            groups[str(name)] = parse_group(str(name), entry, providers)
        except ValueError as exc:
            problems.append(f"groups.{name}: {exc}")
    return groups


def expand_route(raw: Mapping[str, Any], groups: Mapping[str, Group],
                 providers: Mapping[str, Any]) -> tuple[dict[str, Any], str, tuple[Group, ...]]:
    """A route entry as the plain route parser reads it (each group named in `model`/`fallbacks`
    replaced by its deployments, `strategy` and `weights` taken out), its strategy, and its layout:
    empty when every candidate is one deployment tried in order (the route is planned once)."""
    plain = {k: v for k, v in raw.items() if k not in ("strategy", "weights")}
    strategy = parse_strategy(raw.get("strategy"))
    fallbacks = raw.get("fallbacks") or []
    if not isinstance(fallbacks, (list, tuple)):
        return plain, strategy, ()  # the route parser names the mistake
    names = [raw.get("model"), *fallbacks]
    weights = _route_weights(raw.get("weights"), len(names))
    named_group = any(isinstance(n, str) and n in groups for n in names)
    if not named_group and strategy == "ordered" and weights is None:
        return plain, strategy, ()
    layout = []
    entries: dict[ModelRef, dict[str, Any]] = {}  # fallbacks written {model, continuation}: kept whole
    for i, name in enumerate(names):
        weight = weights[i] if weights is not None else 1.0
        where = "model" if i == 0 else f"fallbacks[{i - 1}]"
        entry = name if i > 0 and isinstance(name, dict) else None
        if entry is not None:
            name = entry.get("model")
        if isinstance(name, str) and name in groups:
            layout.append(groups[name]._replace(weight=weight))
        else:
            ref = _ref(name, providers, where)
            layout.append(Group(str(ref), (Member(ref, weight),), "ordered", weight))
            if entry is not None:
                entries[ref] = {**entry, "model": str(ref)}
    flat = list(dict.fromkeys(ref for group in layout for ref in group.refs))
    plain["model"] = str(flat[0])
    plain["fallbacks"] = [entries.get(ref, str(ref)) for ref in flat[1:]]
    return plain, strategy, tuple(layout)


def _route_weights(raw: Any, count: int) -> list[float] | None:
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or len(raw) != count:
        raise ValueError(f"weights: must be a list of {count} numbers, one per candidate (model, then fallbacks)")
    weights = [_weight(w, f"weights[{i}]") for i, w in enumerate(raw)]
    if not any(w > 0 for w in weights):
        raise ValueError("weights: at least one must be above zero")
    return weights


def alias_target(raw: Any, groups: Mapping[str, Group]) -> dict[str, Any] | str | None:
    """What an alias that is more than a provider/model names: a route spec (a mapping, or a group's
    name, read as `{model: <group>}`) or a route's `use_case:tier` name (`{route: ...}`); None for a
    plain provider/model alias."""
    if isinstance(raw, str):
        return {"model": raw} if raw in groups else None
    if isinstance(raw, dict) and set(raw) == {"route"}:
        return str(raw["route"]).strip().lower()
    return dict(raw) if isinstance(raw, dict) else None


def deployment_weights(groups: Mapping[str, Group], routes: Mapping[str, Any]) -> dict[ModelRef, dict[str, float]]:
    """Per deployment, its weight in each group (`group:<name>`) and each weighted route (by the route's
    name) that gives it one: what `/health/details` shows beside its load."""
    out: dict[ModelRef, dict[str, float]] = {}
    for name, group in groups.items():
        for member in group.members:
            out.setdefault(member.ref, {})[f"group:{name}"] = member.weight
    for name, route in routes.items():
        if route.strategy != "weighted":
            continue
        for slot in route.layout:
            if len(slot.members) == 1:
                out.setdefault(slot.members[0].ref, {})[name] = slot.weight
    return out
