"""A route's `shadow:` in the table: parsed into `Route.shadow`, bad values named by their key."""

from __future__ import annotations

import copy

import pytest

from proxy.table.routing import table_from_dict
from proxy.types import ConfigError, ModelRef, ModelTier, Shadow, UseCase

DOC = {
    "providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}, "q": {"kind": "mock"}},
    "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "p/gp", "fallbacks": ["q/gp2"],
                "shadow": {"model": "q/candidate", "share": 0.1, "max_concurrency": 2}},
               {"use_case": "debugging", "tier": "standard", "model": "p/dbg"}],
}


def test_a_route_names_its_shadow_and_a_route_without_one_has_none():
    table = table_from_dict(DOC, source="test")
    routes = table.routes
    assert routes[(UseCase.GENERAL_PURPOSE, ModelTier.STANDARD)].shadow == Shadow(ModelRef("q", "candidate"), 0.1, 2)
    assert routes[(UseCase.DEBUGGING, ModelTier.STANDARD)].shadow is None


def test_max_concurrency_defaults_to_four():
    doc = copy.deepcopy(DOC)
    del doc["routes"][0]["shadow"]["max_concurrency"]
    table = table_from_dict(doc, source="test")
    assert table.routes[(UseCase.GENERAL_PURPOSE, ModelTier.STANDARD)].shadow.max_concurrency == 4


@pytest.mark.parametrize("shadow,message", [
    ("q/candidate", "routes[0].shadow: must be a mapping"),
    ({"model": "nowhere/x", "share": 0.1}, "routes[0].shadow.model: 'nowhere/x' names provider 'nowhere'"),
    ({"model": "p/gp", "share": 0.1}, "routes[0].shadow.model: must be another deployment"),
    ({"model": "q/c"}, "routes[0].shadow.share: must be a number from 0 to 1"),
    ({"model": "q/c", "share": 1.5}, "routes[0].shadow.share: must be a number from 0 to 1"),
    ({"model": "q/c", "share": "half"}, "routes[0].shadow.share: 'half' is not a number"),
    ({"model": "q/c", "share": 0.5, "max_concurrency": 0}, "routes[0].shadow.max_concurrency: must be"),
    ({"model": "q/c", "share": 0.5, "weight": 1}, "routes[0].shadow.weight: unknown key"),
])
def test_a_bad_shadow_is_named_by_its_key(shadow, message):
    doc = copy.deepcopy(DOC)
    doc["routes"][0]["shadow"] = shadow
    with pytest.raises(ConfigError) as err:
        table_from_dict(doc, source="test")
    assert message in err.value.message


def test_tiergate_check_shows_a_routes_shadow(tmp_path, capsys):
    import yaml

    from proxy.cli.main import main

    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(DOC))
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(shadow: q/candidate, 10%)" in out
    described = {r["route"]: r["shadow"] for r in table_from_dict(DOC, source="test").describe()}
    assert described == {"general_purpose:standard": {"model": "q/candidate", "share": 0.1, "max_concurrency": 2},
                         "debugging:standard": None}
