"""Bring-your-own-key for `kind: anthropic`: the client's own Anthropic key (`X-Tiergate-Provider-Key`) goes to
the provider as `x-api-key`; tiergate's inbound key (which the Anthropic SDKs send in `x-api-key`) never does;
cached answers are scoped to the client's key; the key is masked in what is relayed back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from tests.anthropic_upstream import AnthropicUpstream, Fail

INBOUND = "tg-inbound-BYOK-123456"
OWN_A = "sk-ant-client-A-OWN-9876543210"
OWN_B = "sk-ant-client-B-OWN-0123456789"
TABLE_KEY = "sk-ant-table-SECRET-5555"


@pytest.fixture
async def claude() -> AsyncIterator[AnthropicUpstream]:
    server = await AnthropicUpstream("claude").start()
    yield server
    await server.stop()


def _doc(claude: AnthropicUpstream, **provider: Any) -> dict[str, Any]:
    return {"providers": {"claude": {"kind": "anthropic", "base_url": claude.url, "pass_client_key": True,
                                     **provider}},
            "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "claude/claude-sonnet-4"}]}


def _client(gate: Any, own: str | None) -> anthropic.AsyncAnthropic:
    headers = {"X-Tiergate-Provider-Key": own} if own is not None else {}
    return anthropic.AsyncAnthropic(base_url=gate.url, api_key=INBOUND, max_retries=0, default_headers=headers)


def _sent_keys(claude: AnthropicUpstream) -> list[str | None]:
    return [{k.lower(): v for k, v in r.headers.items()}.get("x-api-key") for r in claude.requests]


async def test_the_clients_own_key_goes_as_x_api_key_and_the_inbound_key_never(
        claude: AnthropicUpstream, start_tiergate: Any) -> None:
    gate = await start_tiergate(_doc(claude, api_key=TABLE_KEY), api_keys=(INBOUND,))
    ask = {"model": "general_purpose:standard", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    message = await _client(gate, OWN_A).messages.create(**ask)
    assert message.content[0].text == "claude: hi"
    async with _client(gate, f"Bearer {OWN_A}").messages.stream(**ask) as stream:
        await stream.get_final_message()
    openai_client = openai.AsyncOpenAI(base_url=gate.v1, api_key=INBOUND, max_retries=0,
                                       default_headers={"X-Tiergate-Provider-Key": OWN_A})
    await openai_client.chat.completions.create(model="general_purpose:standard",
                                                messages=[{"role": "user", "content": "hi"}])
    await _client(gate, None).messages.create(**ask)  # no key of its own: the table's key
    assert _sent_keys(claude) == [OWN_A, OWN_A, OWN_A, TABLE_KEY]
    for request in claude.requests:
        assert "authorization" not in {k.lower() for k in request.headers}
        assert INBOUND not in repr(request.headers)
    with pytest.raises(anthropic.BadRequestError) as refused:  # tiergate's own key as the provider key
        await _client(gate, INBOUND).messages.create(**ask)
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert len(claude.requests) == 4


async def test_a_sidecar_takes_the_anthropic_sdks_x_api_key_as_the_clients_own(
        claude: AnthropicUpstream, start_tiergate: Any) -> None:
    gate = await start_tiergate(_doc(claude))  # no inbound keys
    client = anthropic.AsyncAnthropic(base_url=gate.url, api_key=OWN_B, max_retries=0)
    await client.messages.create(model="general_purpose:standard", max_tokens=16,
                                 messages=[{"role": "user", "content": "hi"}])
    assert _sent_keys(claude) == [OWN_B]


async def test_cached_answers_are_scoped_to_the_clients_own_key(claude: AnthropicUpstream,
                                                                start_tiergate: Any) -> None:
    gate = await start_tiergate(_doc(claude), api_keys=(INBOUND,))

    async def ask(own: str) -> str:
        raw = await _client(gate, own).messages.with_raw_response.create(
            model="general_purpose:standard", max_tokens=16, extra_body={"temperature": 0},
            messages=[{"role": "user", "content": "the same question"}])
        return raw.headers["x-tiergate-cache"]

    assert [await ask(OWN_A), await ask(OWN_B), await ask(OWN_A)] == ["miss", "miss", "hit"]
    assert _sent_keys(claude) == [OWN_A, OWN_B]


async def test_the_clients_own_key_is_masked_in_a_relayed_error(claude: AnthropicUpstream,
                                                                start_tiergate: Any) -> None:
    gate = await start_tiergate(_doc(claude), api_keys=(INBOUND,))
    claude.push(Fail(401, "authentication_error", quote_key=True))
    with pytest.raises(anthropic.AuthenticationError) as raised:
        await _client(gate, OWN_A).messages.create(model="general_purpose:standard", max_tokens=16,
                                                   messages=[{"role": "user", "content": "hi"}])
    text = raised.value.response.text + repr(dict(raised.value.response.headers))
    assert "invalid x-api-key" in text and OWN_A not in text and OWN_A[-12:] not in text
    await asyncio.sleep(0)
