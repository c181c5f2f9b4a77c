"""Inbound keys as values: scopes (which decisions a key may reach), their parsing, credentials, and the
lookup by digest (expiry, database keys making authentication required)."""

from __future__ import annotations

import time

import pytest

from proxy.edge.auth import InboundAuth
from proxy.table.keys import (
    InboundKey,
    KeyScope,
    credential_headers,
    digest,
    new_secret,
    parse_credentials,
    parse_scope,
    secrets_of_credentials,
)
from proxy.table.routing import table_from_dict
from proxy.types import AuthenticationError, PermissionDeniedError

TABLE = table_from_dict({
    "providers": {"openai": {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x-0123456789"},
                  "other": {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-y-0123456789"}},
    "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "openai/gpt-a"},
               {"use_case": "code_generation", "tier": "premium", "model": "openai/gpt-b"},
               {"use_case": "code_generation", "tier": "economy", "model": "other/small"}],
    "aliases": {"fast": "openai/gpt-fast"},
    "passthrough_provider": "openai",
}, source="test")


def decision(model: str | None = None, use_case: str | None = None, tier: str | None = None):
    return TABLE.resolve(use_case, tier, model)


@pytest.mark.parametrize("scope, model, allowed", [
    ({"routes": ["code_generation:premium"]}, "code_generation:premium", True),
    ({"routes": ["code_generation:premium"]}, "code_generation:economy", False),
    ({"routes": ["code_generation:premium"]}, "general_purpose", False),
    ({"routes": ["code_generation:premium"]}, "fast", False),  # an alias is a model: not in routes
    ({"use_cases": ["code_generation"]}, "code_generation:economy", True),
    ({"use_cases": ["code_generation"], "tiers": ["economy"]}, "code_generation:premium", False),
    ({"tiers": ["standard"]}, "general_purpose", True),
    ({"models": ["fast"]}, "fast", True),
    ({"models": ["fast"]}, "general_purpose", False),  # only models: no route
    ({"models": ["openai/gpt-z"]}, "openai/gpt-z", True),
    ({"models": ["openai/gpt-z"]}, "openai/gpt-y", False),
    ({"models": ["openai/*"]}, "openai/anything", True),
    ({"models": ["openai/*"]}, "other/anything", False),
    ({"models": ["some-new-model"]}, "some-new-model", True),  # a plain name passed through
    ({"models": ["fast"], "routes": ["general_purpose:standard"]}, "general_purpose", True),
])
def test_a_scope_allows_what_it_names(scope, model, allowed):
    assert parse_scope(scope).allows(decision(model)) is allowed


def test_headers_choose_the_route_a_scope_is_checked_against():
    scope = parse_scope({"routes": "code_generation:premium"})
    assert scope.allows(decision("general_purpose", "code_generation", "premium"))
    assert not scope.allows(decision(None, "general_purpose", "standard"))
    assert not scope.allows(decision(None))  # the default route


def test_calls_without_a_model_need_the_provider_and_local_answers_need_nothing():
    from proxy.edge.handlers import LOCAL
    from proxy.edge.passthrough import _passed

    assert not parse_scope({"models": ["openai/gpt-a"]}).allows(_passed("openai", None))
    assert parse_scope({"models": ["openai/*"]}).allows(_passed("openai", None))
    assert parse_scope({"routes": ["general_purpose:standard"]}).allows(LOCAL)


def test_a_refusal_is_a_403_naming_what_is_allowed():
    key = InboundKey("team-a", scope=parse_scope({"routes": ["code_generation:premium"], "models": ["fast"]}))
    key.check(decision("fast"))
    with pytest.raises(PermissionDeniedError) as refused:
        key.check(decision("general_purpose"))
    body = refused.value.to_dict()["error"]
    assert refused.value.status == 403 and body["type"] == "permission_error" and body["code"] == "key_scope"
    assert "team-a" in body["message"] and "code_generation:premium" in body["message"] and "fast" in body["message"]
    InboundKey("open").check(decision("general_purpose"))  # no scope: everything


@pytest.mark.parametrize("raw, field", [
    ({"routes": ["code_generation"]}, "routes"), ({"use_cases": ["poetry"]}, "use_cases"),
    ({"tiers": ["gold"]}, "tiers"), ({"models": ["a\r\nb"]}, "models"),
])
def test_bad_scopes_name_their_field(raw, field):
    with pytest.raises(ValueError, match=field):
        parse_scope(raw)
    assert parse_scope({}) is None
    assert parse_scope({"tiers": "Premium, economy"}) == KeyScope(tiers=frozenset({"premium", "economy"}))


def test_credentials_become_lower_case_headers_and_known_secrets():
    creds = parse_credentials({"openai": {"project": "proj_abc12345", "api_key_env": "TEAM_KEY"}})
    headers = credential_headers(creds, {"TEAM_KEY": "sk-team-0123456789"})
    assert headers == {"openai": {"openai-project": "proj_abc12345", "authorization": "Bearer sk-team-0123456789"}}
    assert credential_headers(creds, {}) == {"openai": {"openai-project": "proj_abc12345"}}  # unset: tiergate's
    assert sorted(secrets_of_credentials(headers)) == ["proj_abc12345", "sk-team-0123456789"]
    with pytest.raises(ValueError, match="credentials.openai.password"):
        parse_credentials({"openai": {"password": "x"}})


def test_keys_are_looked_up_by_digest_and_refused_once_expired():
    secret, old = new_secret(), new_secret()
    assert secret.startswith("tg-") and len(secret) == 46 and secret != old
    auth = InboundAuth(["env-team=sk-env-SECRET-1"])
    auth.replace_stored({digest(secret): InboundKey("db-team"),
                         digest(old): InboundKey("db-team", expires_at=time.time() - 1)})
    assert auth.check(f"Bearer {secret}") == "db-team" and auth.check("Bearer sk-env-SECRET-1") == "env-team"
    with pytest.raises(AuthenticationError) as expired:
        auth.check(f"Bearer {old}")
    assert expired.value.code == "expired_api_key"
    for bad in (None, "", f"Basic {secret}", f"Bearer {secret}x", "Bearer "):
        with pytest.raises(AuthenticationError):
            auth.check(bad)
    assert auth.names() == ["db-team", "env-team"]
    auth.replace(())  # the file's keys gone: the database's stay
    assert auth.check(f"Bearer {secret}") == "db-team"


def test_database_keys_make_authentication_required_before_any_key_is_known():
    auth = InboundAuth((), required=True)
    assert auth.enabled
    with pytest.raises(AuthenticationError):
        auth.check("Bearer anything")
    assert InboundAuth(()).check(None) is None  # no keys and none required: open, as before
