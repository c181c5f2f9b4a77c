"""Inbound keys stored hashed in the real Postgres, managed by `tiergate keys ...`, served by a running
tiergate (real HTTP, the openai SDK as the client) that picks every change up without a restart.

Shows: a created key works; a rotated key's old secret is refused and the new one works (or both, in
the grace); a revoked key is refused; an expired one too; a key outside its scopes gets a 403 in the
API's own shape on chat, Responses, Messages, embeddings and pass-through, before any upstream call;
a key's own OpenAI-Project and provider key reach the provider; `keys list`, the log and /metrics
never show a secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from multidict import CIMultiDict

from proxy.cli.main import main
from proxy.engine.router import Router
from proxy.settings import RouterConfig
from proxy.table.routing import table_from_dict
from proxy.table.store import init_db

from ..conftest import table_doc
from ..pg import Schema, fresh_schema, poll, serve_router
from ..upstream import Fail, MockUpstream

TEAM_KEY = "sk-team-a-OWN-openai-key-0123456789"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def schema() -> AsyncIterator[Schema]:
    async with fresh_schema() as s:
        yield s


async def keys_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], schema: Schema,
                   *args: str) -> tuple[int, str, str]:
    """`tiergate keys ...` against the test's schema, as an operator runs it; (exit code, stdout, stderr)."""
    monkeypatch.setenv("DATABASE_URL", schema.url)
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["keys", *args])
    out, err = capsys.readouterr()
    return code, out, err


async def start(schema: Schema, tmp_path: Path, upstream: MockUpstream, **settings: Any) -> Any:
    doc = table_doc(upstream)
    doc["passthrough_provider"] = "primary"
    doc["limits"] = [{"name": "limited-rpm", "key": "limited", "requests_per_minute": 1}]
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    environ = {"TEAM_A_OPENAI_KEY": TEAM_KEY}
    base = {"timeout": 5.0, "retry_backoff": 0.001, "enable_monitoring": True, "database_url": schema.url,
            "config_path": str(path), "database_keys": True, "refresh_interval": 30.0, **settings}
    config = RouterConfig.load(environ=environ, dotenv_path=None, overrides=base)
    await init_db(config, path)
    return await serve_router(Router(config, table=table_from_dict(doc, source=f"file:{path}"), dynamic=True))


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def status_with(url: str, key: str, model: str = "general_purpose") -> int:
    try:
        await client(url, key).chat.completions.create(model=model, messages=CHAT)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


async def test_create_rotate_revoke_take_effect_live(schema, upstream, tmp_path, monkeypatch, capsys):
    served = await start(schema, tmp_path, upstream)
    try:
        assert await status_with(served.url, "tg-not-a-key") == 401  # database keys: authentication is on
        code, secret, _ = await keys_cli(monkeypatch, capsys, schema, "create", "team-a")
        secret = secret.strip()
        assert code == 0 and secret.startswith("tg-") and len(secret) > 40
        await poll(lambda: _is(status_with(served.url, secret), 200), what="the new key accepted")

        code, listing, _ = await keys_cli(monkeypatch, capsys, schema, "list")
        assert code == 0 and "team-a" in listing and secret[:9] + "…" in listing and "active" in listing
        assert secret not in listing and secret[9:20] not in listing
        hashes = await schema.conn.fetch("SELECT secret_hash FROM llm_api_keys")
        assert all(r["secret_hash"].hex() not in listing for r in hashes)

        code, new, _ = await keys_cli(monkeypatch, capsys, schema, "rotate", "team-a")
        new = new.strip()
        assert code == 0 and new != secret
        await poll(lambda: _is(status_with(served.url, secret), 401), what="the old secret refused")
        assert await status_with(served.url, new) == 200

        code, graced, _ = await keys_cli(monkeypatch, capsys, schema, "rotate", "team-a", "--grace", "1h")
        graced = graced.strip()
        await poll(lambda: _is(status_with(served.url, graced), 200), what="the rotated secret accepted")
        assert await status_with(served.url, new) == 200  # within its grace

        code, _, _ = await keys_cli(monkeypatch, capsys, schema, "revoke", "team-a")
        assert code == 0
        await poll(lambda: _is(status_with(served.url, graced), 401), what="the revoked key refused")
        assert await status_with(served.url, new) == 401
        code, listing, _ = await keys_cli(monkeypatch, capsys, schema, "list")
        assert "revoked" in listing
        code, _, err = await keys_cli(monkeypatch, capsys, schema, "rotate", "team-a")
        assert code == 1 and "no active key" in err
    finally:
        await served.runner.cleanup()


async def test_an_expired_key_is_refused(schema, upstream, tmp_path, monkeypatch, capsys):
    served = await start(schema, tmp_path, upstream)
    try:
        _, old, _ = await keys_cli(monkeypatch, capsys, schema, "create", "gone", "--expires", "2001-01-01T00:00:00")
        _, live, _ = await keys_cli(monkeypatch, capsys, schema, "create", "later", "--expires", "30d")
        await poll(lambda: _is(status_with(served.url, live.strip()), 200), what="the keys loaded")
        with pytest.raises(openai.AuthenticationError) as refused:
            await client(served.url, old.strip()).chat.completions.create(model="general_purpose", messages=CHAT)
        assert refused.value.code == "expired_api_key"
        _, listing, _ = await keys_cli(monkeypatch, capsys, schema, "list")
        assert "expired" in listing
    finally:
        await served.runner.cleanup()


async def test_out_of_scope_is_a_403_in_the_apis_shape_before_any_upstream_call(
        schema, upstream, tmp_path, monkeypatch, capsys):
    served = await start(schema, tmp_path, upstream)
    try:
        _, secret, _ = await keys_cli(monkeypatch, capsys, schema, "create", "coders",
                                      "--routes", "code_generation:premium", "--models", "fast")
        secret = secret.strip()
        sdk = client(served.url, secret)
        await poll(lambda: _is(status_with(served.url, secret, "code_generation:premium"), 200), what="loaded")
        await sdk.chat.completions.create(model="fast", messages=CHAT)  # an alias in its models
        calls = upstream.calls

        for model in ("general_purpose", "primary/model-x", "code_generation:economy"):
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await sdk.chat.completions.create(model=model, messages=CHAT)
            assert denied.value.code == "key_scope" and denied.value.type == "permission_error"
            assert "code_generation:premium" in denied.value.message  # names what the key may use
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.chat.completions.create(model="general_purpose", messages=CHAT, stream=True)
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.responses.create(model="general_purpose", input="hi")
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.embeddings.create(model="embed-small", input="hi")
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.images.generate(model="primary/dall-e", prompt="a cat")  # pass-through with a model
        with pytest.raises(openai.PermissionDeniedError):
            await sdk.files.list()  # pass-through without a model: needs primary/*
        async with aiohttp.ClientSession() as http:
            async with http.post(served.url + "/v1/messages", headers={"x-api-key": secret},
                                 json={"model": "general_purpose", "max_tokens": 10, "messages": CHAT}) as resp:
                body = await resp.json()
                assert resp.status == 403
                assert body["type"] == "error" and body["error"]["type"] == "permission_error"
        assert upstream.calls == calls  # nothing refused went upstream
    finally:
        await served.runner.cleanup()


async def test_a_keys_own_project_and_provider_key_reach_its_provider_only(
        schema, upstream, tmp_path, monkeypatch, capsys, caplog):
    served = await start(schema, tmp_path, upstream)
    try:
        _, secret, _ = await keys_cli(monkeypatch, capsys, schema, "create", "team-a",
                                      "--project", "primary=proj_teamA123", "--organization", "primary=org-teamA99",
                                      "--provider-key-env", "primary=TEAM_A_OPENAI_KEY")
        secret = secret.strip()
        _, plain, _ = await keys_cli(monkeypatch, capsys, schema, "create", "team-b")
        await poll(lambda: _is(status_with(served.url, plain.strip()), 200), what="loaded")
        caplog.set_level(logging.DEBUG)
        sdk = client(served.url, secret)
        answer = await sdk.chat.completions.with_raw_response.create(
            model="general_purpose", messages=CHAT, extra_headers={"OpenAI-Project": "proj_someone_else"})
        sent = CIMultiDict(upstream.requests[-1].headers)
        assert sent["OpenAI-Project"] == "proj_teamA123" and sent["OpenAI-Organization"] == "org-teamA99"
        assert sent["Authorization"] == f"Bearer {TEAM_KEY}"
        assert "proj_someone_else" not in str(sent)
        assert all(TEAM_KEY not in v and "proj_teamA123" not in v for v in answer.headers.values())
        echo = (f'{{"error": {{"message": "Incorrect API key provided: {TEAM_KEY} (sk-team-****6789) for '
                f'project proj_teamA123", "type": "invalid_request_error", "code": "invalid_api_key"}}}}').encode()
        for call in (lambda: sdk.chat.completions.create(model="general_purpose", messages=CHAT),
                     lambda: sdk.files.list()):
            upstream.push(Fail(401, body=echo, headers={"x-echo": f"{TEAM_KEY} proj_teamA123"}))
            with pytest.raises(openai.AuthenticationError) as refused:  # the provider's status, its words masked
                await call()
            relayed = refused.value.response.text + str(refused.value.response.headers)
            assert TEAM_KEY not in relayed and "proj_teamA123" not in relayed and "****6789" not in relayed
            assert "Incorrect API key provided" in relayed
        await sdk.files.list()  # pass-through: the same credentials
        sent = CIMultiDict(upstream.requests[-1].headers)
        assert sent["OpenAI-Project"] == "proj_teamA123" and sent["Authorization"] == f"Bearer {TEAM_KEY}"
        await client(served.url, plain.strip()).chat.completions.create(model="general_purpose", messages=CHAT)
        sent = CIMultiDict(upstream.requests[-1].headers)
        assert "OpenAI-Project" not in sent and sent["Authorization"] != f"Bearer {TEAM_KEY}"  # tiergate's own

        async with aiohttp.ClientSession() as http:
            async with http.get(served.url + "/metrics", headers={"Authorization": f"Bearer {secret}"}) as resp:
                metrics = await resp.text()
        served.router.telemetry.drain()
        for text in (metrics, caplog.text):
            assert secret not in text and secret[9:] not in text and TEAM_KEY not in text
        assert '"key":"team-a"' in caplog.text and '"key":"team-b"' in caplog.text  # the name, never the key
    finally:
        await served.runner.cleanup()


async def _is(value: Any, expected: Any) -> bool:
    return await value == expected


async def test_a_database_keys_name_scopes_its_limits(schema, upstream, tmp_path, monkeypatch, capsys):
    served = await start(schema, tmp_path, upstream)
    try:
        _, limited, _ = await keys_cli(monkeypatch, capsys, schema, "create", "limited")
        _, other, _ = await keys_cli(monkeypatch, capsys, schema, "create", "other")
        await poll(lambda: _is(status_with(served.url, other.strip()), 200), what="the keys loaded")
        assert await status_with(served.url, limited.strip()) == 200
        assert await status_with(served.url, limited.strip()) == 429  # its limit, by its name
        assert await status_with(served.url, other.strip()) == 200  # another key's is its own
    finally:
        await served.runner.cleanup()
