"""`kind: anthropic` providers loaded from Postgres, end to end: a table seeded by `db init` and a provider row
written by hand (with the column's default key header) route Messages natively to an Anthropic-shaped mock
with the key in `x-api-key`, and a chat call to Claude and a Messages call to a chat provider are translated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml

from proxy.engine.router import Router
from proxy.table.store import init_db, read_snapshot

from ..anthropic_upstream import AnthropicUpstream
from ..conftest import make_config
from ..pg import Schema, fresh_schema, serve_router
from ..upstream import MockUpstream

CLAUDE_KEY = "sk-ant-pg-SECRET-1111"
HAND_KEY = "sk-ant-pg-HAND-2222"


@pytest.fixture
async def schema() -> AsyncIterator[Schema]:
    async with fresh_schema() as s:
        yield s


@pytest.fixture
async def claude() -> AsyncIterator[AnthropicUpstream]:
    server = await AnthropicUpstream("claude").start()
    yield server
    await server.stop()


def _keys(claude: AnthropicUpstream) -> list[tuple[str | None, bool]]:
    """Each call's x-api-key, and whether it carried an Authorization header too."""
    out = []
    for request in claude.requests:
        headers = {k.lower(): v for k, v in request.headers.items()}
        out.append((headers.get("x-api-key"), "authorization" in headers))
    return out


async def test_anthropic_providers_from_postgres_route_natively_and_translated(
        schema: Schema, claude: AnthropicUpstream, upstream: MockUpstream, tmp_path: Path) -> None:
    doc = {"providers": {"claude": {"kind": "anthropic", "base_url": claude.url, "api_key": CLAUDE_KEY},
                         "chat": {"base_url": upstream.url, "api_key": "sk-chat-pg-3333"}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "claude/claude-sonnet-4"},
                      {"use_case": "code_generation", "tier": "premium", "model": "chat/model-a"}]}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = make_config(database_url=schema.url, health_check_interval=0)
    await init_db(config, path)
    # a provider row written by hand: the key header is the column's default
    await schema.conn.execute("INSERT INTO llm_providers (name, kind, base_url, api_key) VALUES ($1, $2, $3, $4)",
                              "byhand", "anthropic", claude.url, HAND_KEY)
    await schema.conn.execute("INSERT INTO llm_routes (use_case, tier, model) VALUES ($1, $2, $3)",
                              "debugging", "standard", "byhand/claude-haiku")
    table = (await read_snapshot(schema.conn, config)).table
    assert table.problems == ()
    assert {n: (p.kind, p.api_key_header) for n, p in table.providers.items()} == {
        "claude": ("anthropic", "x-api-key"), "byhand": ("anthropic", "x-api-key"), "chat": ("openai", "Authorization")}

    served = await serve_router(Router(config, dynamic=True))
    try:
        assert served.router.table.source.startswith("postgres") or "byhand" in served.router.table.providers
        sdk = anthropic.AsyncAnthropic(base_url=served.url, api_key="x", max_retries=0)
        ask: dict[str, Any] = {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
        native = await sdk.messages.create(model="general_purpose:standard", **ask)
        assert native.content[0].text == "claude: hi"
        async with sdk.messages.stream(model="general_purpose:standard", **ask) as stream:
            assert (await stream.get_final_text()).strip() == "claude: hi"
        by_hand = await sdk.messages.create(model="debugging:standard", **ask)
        assert by_hand.content[0].text == "claude: hi"
        assert claude.requests[-1].json["model"] == "claude-haiku"
        translated = await sdk.messages.create(model="code_generation:premium", **ask)
        assert translated.content[0].text == "primary answered model-a"
        assert upstream.requests[-1].path == "/v1/chat/completions"
        chat = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        answer = await chat.chat.completions.create(model="general_purpose:standard",
                                                    messages=[{"role": "user", "content": "hello"}])
        assert answer.choices[0].message.content == "claude: hello"
        assert claude.requests[-1].path == "/v1/messages"
        assert _keys(claude) == [(CLAUDE_KEY, False), (CLAUDE_KEY, False), (HAND_KEY, False), (CLAUDE_KEY, False)]
        await sdk.close()
        await chat.close()
    finally:
        await served.runner.cleanup()
