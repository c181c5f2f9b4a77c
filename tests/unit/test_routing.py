"""Routing resolution and table validation (unit)."""

from __future__ import annotations

import pytest

from proxy.adapters import CHAT, COMPLETIONS, EMBEDDINGS
from proxy.settings import DEFAULT_CONFIG_PATH, DEMO_CONFIG_PATH
from proxy.table.routing import load_table, table_from_dict
from proxy.types import ConfigError, ModelRef, ModelTier, UnknownRouteError, UseCase

DOC = {
    "providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}, "q": {"kind": "mock"}},
    "aliases": {"fast": "p/fast-model"},
    "routes": [
        {"use_case": "general_purpose", "tier": "standard", "model": "p/gp", "fallbacks": ["q/gp2"]},
        {"use_case": "code_generation", "tier": "premium", "model": "p/coder", "max_tokens": 100,
         "temperature": 0.1, "system_prompt": "Be terse."},
        {"use_case": "code_generation", "tier": "standard", "model": "q/coder-std"},
    ],
}


@pytest.fixture
def table():
    return table_from_dict(DOC, source="test")


def test_headers_win_over_model(table):
    d = table.resolve("code_generation", "premium", "fast")
    assert d.name == "code_generation:premium"
    assert d.candidates == (ModelRef("p", "coder"),)


def test_headers_are_case_insensitive_and_default_the_missing_one(table):
    assert table.resolve("CODE_GENERATION", None, None).name == "code_generation:standard"
    assert table.resolve(None, "Standard", None).name == "general_purpose:standard"


def test_valid_pair_without_a_route_takes_the_default_route(table):
    assert table.resolve("debugging", "economy", None).name == "general_purpose:standard"


def test_model_forms(table):
    assert table.resolve(None, None, "code_generation:premium").name == "code_generation:premium"
    assert table.resolve(None, None, "code_generation").name == "code_generation:standard"
    assert table.resolve(None, None, "Code_Generation:Premium").name == "code_generation:premium"
    alias = table.resolve(None, None, "fast")
    assert alias.name == "alias:fast" and alias.candidates == (ModelRef("p", "fast-model"),)
    override = table.resolve(None, None, "p/some/nested-model")
    assert override.name == "override" and override.candidates == (ModelRef("p", "some/nested-model"),)
    assert table.resolve(None, None, None).name == "general_purpose:standard"
    assert table.resolve(None, None, "auto").name == "general_purpose:standard"


def test_candidates_are_primary_then_fallbacks(table):
    assert table.resolve(None, None, None).candidates == (ModelRef("p", "gp"), ModelRef("q", "gp2"))


@pytest.mark.parametrize("use_case,tier,param", [("nope", None, "X-Use-Case"), (None, "gold", "X-Model-Tier")])
def test_unknown_header_values_list_valid_values(table, use_case, tier, param):
    with pytest.raises(UnknownRouteError) as err:
        table.resolve(use_case, tier, None)
    assert err.value.status == 400 and err.value.param == param
    listed = [u.value for u in UseCase] if param == "X-Use-Case" else [t.value for t in ModelTier]
    assert all(v in err.value.message for v in listed)


def test_unknown_model_lists_routes_aliases_and_providers(table):
    with pytest.raises(UnknownRouteError) as err:
        table.resolve(None, None, "gpt-7")
    msg = err.value.message
    assert "code_generation:premium" in msg and "fast" in msg and "p, q" in msg
    with pytest.raises(UnknownRouteError):
        table.resolve(None, None, "unknownprovider/model")


def test_model_override_can_be_switched_off():
    table = table_from_dict(DOC, source="test", allow_model_override=False)
    with pytest.raises(UnknownRouteError, match="not allowed"):
        table.resolve(None, None, "p/anything")


def test_route_defaults_apply_only_where_the_client_sent_nothing(table):
    route = table.resolve("code_generation", "premium", None).route
    payload = {"messages": [{"role": "user", "content": "x"}], "temperature": 0.9}
    CHAT.apply_defaults(payload, route)
    assert payload["temperature"] == 0.9 and payload["max_tokens"] == 100
    assert payload["messages"][0] == {"role": "system", "content": "Be terse."}
    own_system = {"messages": [{"role": "system", "content": "mine"}], "max_completion_tokens": 5}
    CHAT.apply_defaults(own_system, route)
    assert own_system["messages"] == [{"role": "system", "content": "mine"}]
    assert "max_tokens" not in own_system
    completion = {"prompt": "x"}
    COMPLETIONS.apply_defaults(completion, route)
    assert completion == {"prompt": "x", "max_tokens": 100, "temperature": 0.1}
    embedding = {"input": "x"}
    EMBEDDINGS.apply_defaults(embedding, route)
    assert embedding == {"input": "x"}


def test_shipped_tables_cover_every_use_case_and_tier():
    for path in (DEFAULT_CONFIG_PATH, DEMO_CONFIG_PATH):
        table = load_table(path)
        assert {(u, t) for u in UseCase for t in ModelTier} == set(table.routes)
    shipped = load_table(DEFAULT_CONFIG_PATH)
    assert set(shipped.providers) == {"openrouter", "portkey"}
    assert all(any(f.provider == "portkey" for f in r.fallbacks) for r in shipped.routes.values())


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["routes"][0].update(tier="gold"), "routes[0].tier: 'gold' is not one of"),
    (lambda d: d["routes"][1].update(model="nowhere/x"),
     "routes[1].model: 'nowhere/x' names provider 'nowhere'"),
    (lambda d: d["routes"][0].update(fallbacks=["p"]),
     "routes[0].fallbacks[0]: model reference 'p' is not of the form"),
    (lambda d: d["routes"][0].update(temperature="hot"), "routes[0].temperature: 'hot' is not a number"),
    (lambda d: d["routes"][0].update(colour="red"), "routes[0].colour: unknown key"),
    (lambda d: d["routes"].append(dict(d["routes"][0])), "routes[3]: duplicate route general_purpose:standard"),
    (lambda d: d["providers"]["p"].update(base_url="ftp://x"), "providers.p: base_url: 'ftp://x' is not"),
    (lambda d: d["providers"]["p"].update(kind="grpc"), "providers.p: kind: 'grpc' is not one of"),
    (lambda d: d["providers"]["p"].update(base_url="http://h:80x/v1"),
     "providers.p: base_url: 'http://h:80x/v1' is not a valid URL"),
    (lambda d: d["providers"]["p"].update(base_url="https://sk-token@h/v1"),
     "providers.p: base_url: 'https://***@h/v1' holds credentials"),
    (lambda d: d.update(routes=[]), "routes: must be a non-empty list"),
])
def test_bad_tables_name_the_file_and_key(tmp_path, mutate, expected):
    import copy

    import yaml

    doc = copy.deepcopy(DOC)
    mutate(doc)
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_table(path)
    assert f"{path}: " in err.value.message
    assert expected in err.value.message


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_table(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_table(bad)


def test_lenient_build_skips_bad_rows_and_notes_them():
    import copy

    doc = copy.deepcopy(DOC)
    doc["routes"].append({"use_case": "debugging", "tier": "premium", "model": ""})
    table = table_from_dict(doc, source="database", strict=False)
    assert len(table.routes) == 3
    assert any("routes[3].model" in p for p in table.problems)


def test_disabled_routes_are_left_out():
    import copy

    doc = copy.deepcopy(DOC)
    doc["routes"][2]["enabled"] = False
    table = table_from_dict(doc, source="test")
    assert table.resolve("code_generation", "standard", None).name == "general_purpose:standard"


def test_provider_apis_default_by_kind_and_are_validated():
    table = table_from_dict({**DOC, "providers": {**DOC["providers"], "c": {
        "base_url": "http://127.0.0.1:9/v1", "apis": ["chat", "embeddings"]}}}, source="test")
    assert table.providers["p"].serves_responses  # an OpenAI-compatible provider: every API
    assert not table.providers["q"].serves_responses  # the in-process mock: chat, completions, embeddings
    assert table.providers["c"].apis == ("chat", "embeddings")
    for bad in (["chat", "speech"], [], "chat"):
        doc = {**DOC, "providers": {**DOC["providers"], "c": {"base_url": "http://127.0.0.1:9/v1", "apis": bad}}}
        with pytest.raises(ConfigError, match="providers.c: apis: must be a non-empty list of chat"):
            table_from_dict(doc, source="test")


def test_passthrough_provider_takes_unknown_model_names_only(table):
    with pytest.raises(UnknownRouteError, match="unknown model 'gpt-4o'"):
        table.resolve(None, None, "gpt-4o")
    assert table.passthrough_for("/v1/moderations") is None
    passing = table_from_dict({**DOC, "passthrough_provider": "p",
                               "passthrough_paths": {"/v1/audio/": "q", "/v1/audio/speech": "p"}}, source="test")
    decision = passing.resolve(None, None, "gpt-4o")
    assert (decision.name, decision.candidates) == ("passthrough", (ModelRef("p", "gpt-4o"),))
    assert passing.resolve(None, None, "openai/gpt-4o").candidates == (ModelRef("p", "openai/gpt-4o"),)
    assert passing.resolve(None, None, "fast").candidates == (ModelRef("p", "fast-model"),)
    assert passing.resolve("debugging", None, "gpt-4o").name == "general_purpose:standard"  # headers first
    assert passing.known_model("gpt-4o") is None and passing.known_model("fast").name == "alias:fast"
    assert passing.passthrough_for("/v1/audio/speech") == "p"  # the longest prefix wins
    assert passing.passthrough_for("/v1/audio/transcriptions") == "q"
    assert passing.passthrough_for("/v1/files") == "p"


@pytest.mark.parametrize(("extra", "message"), [
    ({"passthrough_provider": "nobody"}, "passthrough_provider: 'nobody' is not a provider"),
    ({"passthrough_paths": {"/v1/audio/": "nobody"}}, "passthrough_paths./v1/audio/: 'nobody' is not a provider"),
    ({"passthrough_paths": {"audio": "p"}}, "passthrough_paths.audio: a path prefix must start with /v1/"),
    ({"passthrough_paths": ["p"]}, "passthrough_paths: must be a mapping"),
])
def test_passthrough_settings_are_validated(extra, message):
    with pytest.raises(ConfigError, match=message):
        table_from_dict({**DOC, **extra}, source="test")


def test_route_defaults_for_responses_use_its_field_names(table):
    from proxy.adapters import RESPONSES

    route = table.resolve("code_generation", "premium", None).route
    payload = {"input": "x"}
    RESPONSES.apply_defaults(payload, route)
    assert payload == {"input": "x", "max_output_tokens": 100, "temperature": 0.1, "instructions": "Be terse."}
    payload = {"input": "x", "max_output_tokens": 5, "instructions": "Mine."}
    RESPONSES.apply_defaults(payload, route)
    assert (payload["max_output_tokens"], payload["instructions"]) == (5, "Mine.")


def test_price_is_the_tables_price_of_the_usage():
    from proxy.protocol.usage import Usage

    priced = table_from_dict({**DOC, "pricing": {"p/a": {"input": 2.5, "output": 10.0},
                                                 "p/b": {"input": 2.0, "output": 8.0, "cached_input": 0.5}}},
                             source="test")
    assert priced.price(ModelRef("p", "a"), Usage(1000, 500)) == pytest.approx((1000 * 2.5 + 500 * 10.0) / 1e6)
    # no cached-input price: cached input tokens are charged as input
    assert priced.price(ModelRef("p", "a"), Usage(1000, 500, cache_read=800)) == pytest.approx(0.0075)
    # a cached-input price: those tokens at that price, the rest of the input at the input price
    assert priced.price(ModelRef("p", "b"), Usage(1000, 500, cache_read=800)) == pytest.approx(
        (200 * 2.0 + 800 * 0.5 + 500 * 8.0) / 1e6)
    assert priced.price(ModelRef("p", "unpriced"), Usage(1000, 500)) is None
    assert priced.price(ModelRef("p", "unpriced"), Usage(1000, 500)) is None  # remembered as unpriced
    assert table_from_dict(DOC, source="test").price(ModelRef("p", "a"), Usage(1, 1)) is None  # no pricing at all


@pytest.mark.parametrize(("extra", "message"), [
    ({"aliases": ["fast"]}, "test: aliases: must be a mapping of alias to provider/model"),
    ({"aliases": {"slow": "nowhere/x"}}, "test: aliases.slow: 'nowhere/x' names provider 'nowhere'"),
    ({"pricing": ["p/gp"]}, "test: pricing: must be a mapping of provider/model to {input, output}"),
    ({"pricing": {"p/gp": 3}}, "test: pricing.p/gp: must be {input: USD per 1M tokens"),
    ({"pricing": {"p/gp": {"input": "cheap"}}}, "test: pricing.p/gp: could not convert string to float"),
    ({"model_rules": ["o1*"]}, "test: model_rules: must be a mapping of model pattern to"),
    ({"model_rules": {"o1*": {"colour": 1}}}, "test: model_rules.o1*: unknown key 'colour'"),
    ({"embeddings_model": "nowhere/e"}, "test: embeddings_model: 'nowhere/e' names provider 'nowhere'"),
    ({"providers": ["p"]}, "test: providers: must be a mapping of name to settings"),
])
def test_each_section_of_a_bad_table_names_its_key(extra, message):
    with pytest.raises(ConfigError) as err:
        table_from_dict({**DOC, **extra}, source="file:test")
    assert message in err.value.message


def test_a_lenient_table_keeps_the_good_entries_and_notes_the_bad_in_order():
    doc = {**DOC, "aliases": {"fast": "p/fast-model", "slow": "nowhere/x"},
           "pricing": {"p/gp": {"input": 1, "output": 2}, "p/bad": 3},
           "model_rules": {"o1*": {"drop": ["temperature"]}, "bad*": []},
           "routes": [*DOC["routes"], {"use_case": "debugging", "tier": "gold", "model": "p/d"}],
           "passthrough_paths": {"/v1/audio/": "p", "audio": "p"}}
    table = table_from_dict(doc, source="db", strict=False)
    assert set(table.aliases) == {"fast"} and set(table.pricing) == {"p/gp"}
    assert [p for p, _ in table.model_rules[:1]] == ["o1*"] and len(table.routes) == 3
    assert table.passthrough_paths == (("/v1/audio/", "p"),)
    assert [p.split(":")[0] for p in table.problems] == [
        "aliases.slow", "pricing.p/bad", "model_rules.bad*", "routes[3].tier", "passthrough_paths.audio"]
