"""A stream tiergate ends before its final event ends with the error event of the client's own API: Anthropic's
`event: error` on /v1/messages, the Responses API's `error` event on /v1/responses, OpenAI's `data: {"error"}`
on chat completions; each raised by the client's official SDK. Covered: a break, a stall past the idle bound,
a recovery that cannot continue, and the shutdown drain (a real `tiergate serve` process)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import yaml

from tests.anthropic_upstream import AnthropicUpstream, Cut, Hold
from tests.integration.test_cli import ENV, free_port, wait_healthy
from tests.upstream import BreakStream, MockUpstream, Ok

CLAUDE_KEY = "sk-ant-shapes-SECRET-1111"
RESPONSES_ASK = {"model": "general_purpose:standard", "input": "hi", "stream": True}


@pytest.fixture
async def claude() -> AsyncIterator[AnthropicUpstream]:
    server = await AnthropicUpstream("claude").start()
    yield server
    await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    """An OpenAI-shaped provider that serves Chat Completions and the Responses API."""
    server = await MockUpstream("primary", responses=True).start()
    yield server
    await server.stop()


def _doc(claude: AnthropicUpstream, upstream: MockUpstream, **route: Any) -> dict[str, Any]:
    return {"providers": {"claude": {"kind": "anthropic", "base_url": claude.url, "api_key": CLAUDE_KEY},
                          "chat": {"base_url": upstream.url, "api_key": "sk-chat-SECRET-3333",
                                   "apis": ["chat", "responses"]}},
            "routes": [{"use_case": "code_generation", "tier": "standard", "model": "claude/claude-sonnet-4", **route},
                       {"use_case": "general_purpose", "tier": "standard", "model": "chat/model-a", **route}]}


def _last_event(body: bytes) -> tuple[str | None, dict[str, Any]]:
    """The stream's last event: its `event:` name (None without one) and its data."""
    last = body.strip().split(b"\n\n")[-1]
    name, data = None, b""
    for line in last.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data = line[5:].strip()
    return name, orjson.loads(data)


async def _raw(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    async with http.post(url, json=body, headers={"x-api-key": "x"}) as resp:
        assert resp.status == 200
        return await resp.read()


def _ask(model: str) -> dict[str, Any]:
    return {"model": model, "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "one two"}]}


def _anthropic_error(body: bytes) -> dict[str, Any]:
    name, data = _last_event(body)
    assert name == "error" and data["type"] == "error", body[-300:]
    assert b"message_stop" not in body
    return data["error"]


def _responses_error(body: bytes) -> dict[str, Any]:
    name, data = _last_event(body)
    assert name == "error" and data["type"] == "error" and data["error"]["code"] == data["code"], body[-300:]
    assert b"response.completed" not in body
    return data


async def test_a_native_messages_stream_that_stalls_ends_with_anthropics_error(
        claude: AnthropicUpstream, upstream: MockUpstream, start_tiergate: Any, http: aiohttp.ClientSession) -> None:
    gate = await start_tiergate(_doc(claude, upstream), stream_idle_timeout=0.2)
    claude.push(Hold(asyncio.Event(), after=3), Hold(asyncio.Event(), after=3))
    body = await _raw(http, gate.v1 + "/messages", _ask("code_generation:standard"))
    error = _anthropic_error(body)
    assert error["type"] == "timeout_error" and "ended" not in error["message"]
    client = anthropic.AsyncAnthropic(base_url=gate.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError):
        async with client.messages.stream(model="code_generation:standard", max_tokens=16,
                                          messages=[{"role": "user", "content": "one two"}]) as stream:
            async for _ in stream:
                pass


async def test_a_native_messages_stream_cut_ends_with_anthropics_error_not_openais(
        claude: AnthropicUpstream, upstream: MockUpstream, start_tiergate: Any, http: aiohttp.ClientSession) -> None:
    gate = await start_tiergate(_doc(claude, upstream))
    claude.push(Cut(after=4))
    body = await _raw(http, gate.v1 + "/messages", _ask("code_generation:standard"))
    assert _anthropic_error(body)["type"] == "api_error"
    assert b'data: {"error"' not in body


async def test_a_chat_stream_from_claude_cut_ends_with_openais_error(
        claude: AnthropicUpstream, upstream: MockUpstream, start_tiergate: Any, http: aiohttp.ClientSession) -> None:
    gate = await start_tiergate(_doc(claude, upstream))
    claude.push(Cut(after=4))
    body = await _raw(http, gate.v1 + "/chat/completions", {"model": "code_generation:standard", "stream": True,
                                                            "messages": [{"role": "user", "content": "one two"}]})
    name, data = _last_event(body)
    assert name is None and data["error"]["message"] and b"[DONE]" not in body and b"event:" not in body


async def test_a_native_responses_stream_cut_or_stalled_ends_with_the_responses_error_event(
        claude: AnthropicUpstream, upstream: MockUpstream, start_tiergate: Any, http: aiohttp.ClientSession) -> None:
    gate = await start_tiergate(_doc(claude, upstream), stream_idle_timeout=0.2)
    upstream.push(BreakStream(after=5))
    body = await _raw(http, gate.v1 + "/responses", RESPONSES_ASK)
    assert _responses_error(body)["code"] == "upstream_connection"
    upstream.push(Ok(gate=asyncio.Event()))
    body = await _raw(http, gate.v1 + "/responses", RESPONSES_ASK)
    assert _responses_error(body)["code"] == "upstream_timeout"
    upstream.push(BreakStream(after=5))
    client = openai.AsyncOpenAI(base_url=gate.v1, api_key="x", max_retries=0)
    kinds = []
    with pytest.raises(openai.APIError):
        async for event in await client.responses.create(model="general_purpose:standard", input="hi", stream=True):
            kinds.append(event.type)
    assert "response.created" in kinds and "response.completed" not in kinds


async def test_a_translated_messages_stream_recovery_cannot_continue_ends_with_anthropics_error(
        claude: AnthropicUpstream, upstream: MockUpstream, start_tiergate: Any, http: aiohttp.ClientSession) -> None:
    """A Messages call answered by a chat provider on a `stream_recovery: continue` route with no candidate to
    continue it: the chat-level break (OpenAI's event) reaches the client as Anthropic's error event."""
    gate = await start_tiergate(_doc(claude, upstream, stream_recovery="continue"))
    upstream.push(BreakStream(after=3))
    body = await _raw(http, gate.v1 + "/messages", _ask("general_purpose:standard"))
    assert _anthropic_error(body)["message"]
    assert b'data: {"error"' not in body
    assert "recovered" not in gate.router.recovery.stats()


async def test_a_drain_ends_messages_and_responses_streams_each_in_its_own_apis_error(
        tmp_path: Any, claude: AnthropicUpstream, upstream: MockUpstream) -> None:
    """SIGTERM with a native Messages stream, a Messages stream translated for a chat provider and a native
    Responses stream open: past the drain each ends with its own API's error event (`server_shutting_down`)."""
    never = asyncio.Event()
    claude.push(Hold(never, after=3))
    upstream.push(Ok(gate=never), Ok(gate=never))
    config = tmp_path / "routes.yaml"
    config.write_text(yaml.safe_dump(_doc(claude, upstream)))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
        env={**ENV, "TIERGATE_DRAIN_TIMEOUT": "0.5", "TIERGATE_HEALTH_CHECK_INTERVAL": "0"},
        cwd=str(tmp_path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        asks = [("/v1/messages", {"model": "code_generation:standard", "max_tokens": 16, "stream": True,
                                  "messages": [{"role": "user", "content": "one two"}]}),
                ("/v1/messages", {"model": "general_purpose:standard", "max_tokens": 16, "stream": True,
                                  "messages": [{"role": "user", "content": "one two"}]}),
                ("/v1/responses", {"model": "general_purpose:standard", "input": "hi", "stream": True})]
        async with aiohttp.ClientSession() as http:
            responses = [await http.post(url + path, json=body) for path, body in asks]
            for resp in responses:
                assert resp.status == 200
                await resp.content.readuntil(b"\n\n")
            proc.send_signal(signal.SIGTERM)
            bodies = [await asyncio.wait_for(resp.content.read(), 10) for resp in responses]
            for resp in responses:
                resp.close()
        assert _anthropic_error(bodies[0])["message"].startswith("tiergate is shutting down")
        assert _anthropic_error(bodies[1])["message"].startswith("tiergate is shutting down")
        assert _responses_error(bodies[2])["code"] == "server_shutting_down"
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        never.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_responses_stream_from_claude_cut_ends_failed_with_the_responses_error_event(
        claude: AnthropicUpstream, upstream: MockUpstream, start_tiergate: Any, http: aiohttp.ClientSession) -> None:
    """Responses -> chat -> Messages: Claude's stream cut mid-answer ends, through both translations back,
    with `response.failed` and the Responses error event."""
    gate = await start_tiergate(_doc(claude, upstream))
    claude.push(Cut(after=4))
    body = await _raw(http, gate.v1 + "/responses", {**RESPONSES_ASK, "model": "code_generation:standard"})
    assert b"event: response.failed" in body
    assert _responses_error(body)["message"]


async def test_a_translated_responses_stream_recovery_cannot_continue_ends_failed_with_the_responses_error(
        claude: AnthropicUpstream, upstream: MockUpstream, backup: MockUpstream, start_tiergate: Any,
        http: aiohttp.ClientSession) -> None:
    """A Responses call answered by a chat-only provider on a recovering route with nothing to continue it:
    the chat-level break reaches the client as `response.failed` and the Responses error event."""
    doc = _doc(claude, upstream)
    doc["providers"]["chatonly"] = {"base_url": backup.url, "api_key": "sk-chat-only-4444", "apis": ["chat"]}
    doc["routes"].append({"use_case": "debugging", "tier": "standard", "model": "chatonly/model-a",
                          "stream_recovery": "continue"})
    gate = await start_tiergate(doc)
    backup.push(BreakStream(after=3))
    body = await _raw(http, gate.v1 + "/responses", {**RESPONSES_ASK, "model": "debugging:standard"})
    assert b"event: response.failed" in body and b'data: {"error"' not in body
    assert _responses_error(body)["message"]
    assert "recovered" not in gate.router.recovery.stats()
