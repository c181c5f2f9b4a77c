"""The official `anthropic` SDK through tiergate: Messages routed to an Anthropic-shaped upstream (native,
with fallback) and to an OpenAI-shaped one (translated), sync, async, streaming, tool use, count_tokens,
and errors the SDK raises as its own classes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import orjson
import pytest

from tests.anthropic_upstream import AnthropicUpstream, Cut, ErrorEvent, Fail
from tests.conftest import until
from tests.upstream import MockUpstream, Ok

INBOUND = "tg-inbound-KEY-123456"
CLAUDE_KEY = "sk-ant-primary-SECRET-1111"
SPARE_KEY = "sk-ant-spare-SECRET-2222"
WEATHER = {"name": "weather", "description": "the weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
async def claude() -> AsyncIterator[AnthropicUpstream]:
    server = await AnthropicUpstream("claude").start()
    yield server
    await server.stop()


@pytest.fixture
async def spare() -> AsyncIterator[AnthropicUpstream]:
    server = await AnthropicUpstream("spare").start()
    yield server
    await server.stop()


@pytest.fixture
async def gate(claude: AnthropicUpstream, spare: AnthropicUpstream, upstream: MockUpstream, start_tiergate: Any):
    doc = {"providers": {"claude": {"kind": "anthropic", "base_url": claude.url, "api_key": CLAUDE_KEY},
                         "spare": {"kind": "anthropic", "base_url": spare.url, "api_key": SPARE_KEY},
                         "chat": {"base_url": upstream.url, "api_key": "sk-chat-SECRET-3333"}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "claude/claude-sonnet-4",
                       "fallbacks": ["spare/claude-haiku"]},
                      {"use_case": "code_generation", "tier": "premium", "model": "chat/model-a"}],
           "aliases": {"claude-sonnet-4": "claude/claude-sonnet-4"},
           "pricing": {"claude/claude-sonnet-4": {"input": 3.0, "output": 15.0, "cached_input": 0.3}}}
    return await start_tiergate(doc, api_keys=(INBOUND,))


def _client(gate: Any, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gate.url, api_key=INBOUND, max_retries=0, **kw)


async def test_sync_message_native_as_written(gate: Any, claude: AnthropicUpstream) -> None:
    client = anthropic.Anthropic(base_url=gate.url, api_key=INBOUND, max_retries=0)  # the sync client, in a thread
    system = [{"type": "text", "text": "You are terse. " * 50, "cache_control": {"type": "ephemeral"}}]
    raw = await asyncio.to_thread(
        client.messages.with_raw_response.create,
        model="claude-sonnet-4", max_tokens=64, system=system, metadata={"user_id": "u-1"},
        messages=[{"role": "user", "content": "hello"}], extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    message = raw.parse()
    assert message.content[0].text == "claude: hello"
    assert message.usage.cache_read_input_tokens == 100
    assert raw.headers["x-tiergate-model"] == "claude/claude-sonnet-4"
    # cost: 12 uncached + 100 cached input, 7 output
    assert float(raw.headers["x-tiergate-cost-usd"]) == pytest.approx((12 * 3 + 100 * 0.3 + 7 * 15) / 1e6)
    sent = claude.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == CLAUDE_KEY and "Authorization" not in sent.headers
    assert sent.headers["anthropic-version"]  # the SDK's own, passed on
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert sent.json["system"] == system and sent.json["metadata"] == {"user_id": "u-1"}
    assert sent.json["model"] == "claude-sonnet-4"
    assert INBOUND not in str(sent.headers)


async def test_beta_query_and_thinking_pass_as_written(gate: Any, claude: AnthropicUpstream) -> None:
    client = _client(gate)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig=="},
                                                 {"type": "text", "text": "hello"}]},
               {"role": "user", "content": "again"}]
    message = await client.beta.messages.create(model="claude-sonnet-4", max_tokens=2048, thinking=thinking,
                                          messages=history, betas=["interleaved-thinking-2025-05-14"],
                                                extra_query={"beta": "true"})  # as Claude Code sends it
    assert message.content[0].type == "thinking" and message.content[0].signature
    assert message.content[1].text == "claude: again"
    sent = claude.requests[-1]
    assert sent.query == "beta=true"
    assert sent.json["thinking"] == thinking and sent.json["messages"] == history
    assert sent.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"


async def test_async_stream_with_tool_use_round_trip(gate: Any, claude: AnthropicUpstream) -> None:
    client = anthropic.AsyncAnthropic(base_url=gate.url, api_key=INBOUND, max_retries=0)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather in Paris?"}]
    async with client.messages.stream(model="claude-sonnet-4", max_tokens=128, tools=[WEATHER],
                                      messages=messages) as stream:
        first = await stream.get_final_message()
    assert first.stop_reason == "tool_use"
    call = first.content[1]
    assert call.type == "tool_use" and call.name == "weather" and call.input == {"city": "Paris"}
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    second = await client.messages.create(model="claude-sonnet-4", max_tokens=128, tools=[WEATHER], messages=messages)
    assert second.content[0].text == "claude: sunny" and second.stop_reason == "end_turn"
    await client.close()


async def test_count_tokens(gate: Any, claude: AnthropicUpstream) -> None:
    counted = await _client(gate).messages.count_tokens(model="claude-sonnet-4",
                                                  messages=[{"role": "user", "content": "count me"}])
    assert counted.input_tokens > 0
    assert claude.requests[-1].path == "/v1/messages/count_tokens"


async def test_fallback_before_first_event(gate: Any, claude: AnthropicUpstream, spare: AnthropicUpstream) -> None:
    claude.push(Fail(529, "overloaded_error"), ErrorEvent())
    client = _client(gate)
    message = await client.messages.create(model="general_purpose:standard", max_tokens=16,
                                     messages=[{"role": "user", "content": "a"}])
    assert message.content[0].text == "spare: a"
    async with client.messages.stream(model="general_purpose:standard", max_tokens=16,
                                      messages=[{"role": "user", "content": "b"}]) as stream:
        assert (await stream.get_final_text()).strip() == "spare: b"
    assert spare.requests[-1].headers["x-api-key"] == SPARE_KEY


async def test_stream_cut_after_start_ends_with_error_event(gate: Any, claude: AnthropicUpstream) -> None:
    claude.push(Cut(after=4))
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with _client(gate).messages.stream(model="general_purpose:standard", max_tokens=16,
                                                 messages=[{"role": "user", "content": "one two three"}]) as stream:
            async for _ in stream:
                pass
    assert "broke off" in str(raised.value) or "ended before" in str(raised.value)


async def test_errors_are_the_sdks_own_classes(gate: Any, claude: AnthropicUpstream, spare: AnthropicUpstream) -> None:
    claude.push(Fail(400, "invalid_request_error"))
    with pytest.raises(anthropic.BadRequestError) as bad:
        await _client(gate).messages.create(model="general_purpose:standard", max_tokens=16,
                                            messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    claude.push(Fail(429, "rate_limit_error", retry_after="7"))
    spare.push(Fail(429, "rate_limit_error", retry_after="7"))
    with pytest.raises(anthropic.RateLimitError) as limited:
        await _client(gate).messages.create(model="general_purpose:standard", max_tokens=16,
                                            messages=[{"role": "user", "content": "x"}])
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(base_url=gate.url, api_key="wrong", max_retries=0).messages.create(
            model="general_purpose:standard", max_tokens=16,
                                            messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as invalid:
        await _client(gate).messages.create(model="general_purpose:standard", max_tokens=16, messages=[])
    assert invalid.value.body["error"]["type"] == "invalid_request_error"


async def test_translated_to_chat_provider(gate: Any, upstream: MockUpstream) -> None:
    client = _client(gate)
    message = await client.messages.create(model="code_generation:premium", max_tokens=32, system="be brief",
                                     stop_sequences=["END"], messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "primary answered model-a"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 3
    assert message.usage.cache_read_input_tokens == 4 and message.usage.input_tokens == 6
    sent = upstream.requests[-1].json
    assert sent["messages"][0] == {"role": "system", "content": "be brief"} and sent["stop"] == ["END"]
    async with client.messages.stream(model="code_generation:premium", max_tokens=32,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "primary answered model-a" and final.usage.output_tokens == 3


async def test_translated_tool_use_stream(gate: Any, upstream: MockUpstream) -> None:
    upstream.push(Ok(tool_calls=[("weather", '{"city": "Paris"}')]))
    async with _client(gate).messages.stream(model="code_generation:premium", max_tokens=32, tools=[WEATHER],
                                             tool_choice={"type": "tool", "name": "weather"},
                                             messages=[{"role": "user", "content": "weather?"}]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris"}
    sent = upstream.requests[-1].json
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


async def test_untranslatable_is_a_400_naming_the_field(gate: Any) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        await _client(gate).messages.create(model="code_generation:premium", max_tokens=2048,
                                      thinking={"type": "enabled", "budget_tokens": 1024},
                                      messages=[{"role": "user", "content": "hi"}])
    assert "thinking" in raised.value.body["error"]["message"]


async def test_default_version_header_and_bearer_key(gate: Any, claude: AnthropicUpstream, http: Any) -> None:
    async with http.post(gate.v1 + "/messages", headers={"Authorization": f"Bearer {INBOUND}"},
                         json={"model": "claude-sonnet-4", "max_tokens": 8,
                               "messages": [{"role": "user", "content": "x"}]}) as resp:
        assert resp.status == 200
    assert claude.requests[-1].headers["anthropic-version"] == "2023-06-01"


# -- Claude behind the OpenAI SDK: chat completions to `kind: anthropic`, translated --------------------


def _openai(gate: Any) -> Any:
    import openai
    return openai.AsyncOpenAI(base_url=gate.v1, api_key=INBOUND, max_retries=0)


async def test_openai_chat_to_claude(gate: Any, claude: AnthropicUpstream) -> None:
    client = _openai(gate)
    raw = await client.chat.completions.with_raw_response.create(
        model="claude-sonnet-4", messages=[{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "hello"}], stop="END", user="u-9")
    completion = raw.parse()
    assert completion.choices[0].message.content == "claude: hello"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 12 and completion.usage.completion_tokens == 7
    sent = claude.requests[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == CLAUDE_KEY
    assert sent.json["system"] == "be brief" and sent.json["stop_sequences"] == ["END"]
    assert sent.json["max_tokens"] == 4096 and sent.json["metadata"] == {"user_id": "u-9"}
    assert "stream_options" not in sent.json and sent.json["messages"] == [{"role": "user", "content": "hello"}]
    assert float(raw.headers["x-tiergate-cost-usd"]) == pytest.approx((12 * 3 + 7 * 15) / 1e6)


async def test_openai_stream_and_tools_to_claude(gate: Any, claude: AnthropicUpstream, http: Any) -> None:
    client = _openai(gate)
    tool = {"type": "function", "function": {"name": "weather", "parameters": WEATHER["input_schema"]}}
    stream = await client.chat.completions.create(
        model="claude-sonnet-4", stream=True, stream_options={"include_usage": True}, tools=[tool],
        tool_choice="required", messages=[{"role": "user", "content": "weather in Paris?"}])
    text, arguments, finish, usage, call_id = "", "", None, None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                call_id = call.id or call_id
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert text == "Let me check. " and finish == "tool_calls"
    assert orjson.loads(arguments) == {"city": "Paris"} and usage is not None and usage.completion_tokens == 7
    assert claude.requests[-1].json["tool_choice"] == {"type": "any"}
    await until(lambda: _metric_has(http, gate, 'tiergate_tokens_total{model="claude/claude-sonnet-4",'
                                              'type="completion"} 7.0'))  # counted when the stream has ended
    answer = await client.chat.completions.create(model="claude-sonnet-4", tools=[tool], messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": "weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"}])
    assert answer.choices[0].message.content == "claude: sunny"
    sent = claude.requests[-1].json["messages"]
    assert sent[1]["content"][0] == {"type": "tool_use", "id": call_id, "name": "weather", "input": {"city": "Paris"}}
    assert sent[2] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": "sunny"}]}


async def test_openai_errors_from_claude(gate: Any, claude: AnthropicUpstream) -> None:
    import openai
    claude.push(Fail(400, "invalid_request_error"))
    with pytest.raises(openai.BadRequestError):
        await _openai(gate).chat.completions.create(model="claude-sonnet-4",
                                                    messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as refused:
        await _openai(gate).chat.completions.create(model="claude-sonnet-4", n=2,
                                                    messages=[{"role": "user", "content": "x"}])
    assert refused.value.body["param"] == "n"
    claude.push(Cut(after=4))
    with pytest.raises(openai.APIError):
        stream = await _openai(gate).chat.completions.create(model="claude-sonnet-4", stream=True,
                                                             messages=[{"role": "user", "content": "a b c"}])
        async for _ in stream:
            pass


async def test_coding_agent_conversation_through_a_fallback(gate: Any, claude: AnthropicUpstream,
                                                            spare: AnthropicUpstream, http: Any) -> None:
    """Shaped like a coding agent's turn: a long cached system prompt, tools, a streamed tool call, a beta
    header; the primary is overloaded, the fallback answers; the stream's tokens reach the metrics."""
    claude.push(Fail(529, "overloaded_error"))
    client = _client(gate, default_headers={"anthropic-beta": "claude-code-20250219,fine-grained-tool-streaming"})
    system = [{"type": "text", "text": "You are a coding agent. " * 400, "cache_control": {"type": "ephemeral"}}]
    tools = [WEATHER, {"name": "bash", "description": "run a command",
                       "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]
    async with client.messages.stream(model="general_purpose:standard", max_tokens=1024, system=system,
                                      tools=tools, messages=[{"role": "user", "content": "fix the build"}]) as stream:
        events = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert "input_json" in events and final.stop_reason == "tool_use" and final.content[1].input == {"city": "Paris"}
    sent = spare.requests[-1]
    assert sent.json["system"] == system and sent.json["tools"] == tools
    assert sent.headers["anthropic-beta"] == "claude-code-20250219,fine-grained-tool-streaming"
    # 12 uncached + 100 cached input from message_start, 7 output from the last message_delta
    await until(lambda: _metric_has(http, gate, 'tiergate_tokens_total{model="spare/claude-haiku",type="prompt"} 112.0',
                                    'tiergate_tokens_total{model="spare/claude-haiku",type="completion"} 7.0'))


async def _metric_has(http: Any, gate: Any, *lines: str) -> bool:
    async with http.get(gate.url + "/metrics", headers={"Authorization": f"Bearer {INBOUND}"}) as resp:
        metrics = await resp.text()
    return all(line in metrics for line in lines)


async def test_openai_responses_to_claude(gate: Any, claude: AnthropicUpstream) -> None:
    """The Responses API to a provider that speaks only Messages: Responses -> chat -> Messages, and back."""
    client = _openai(gate)
    response = await client.responses.create(model="claude-sonnet-4", instructions="be brief", input="hello",
                                             max_output_tokens=50)
    assert response.output_text == "claude: hello" and response.usage.input_tokens == 12
    sent = claude.requests[-1]
    assert sent.path == "/v1/messages" and sent.json["system"] == "be brief" and sent.json["max_tokens"] == 50
    stream = await client.responses.create(model="claude-sonnet-4", input="streamed", stream=True)
    kinds, text = [], ""
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert text == "claude: streamed " and kinds[-1] == "response.completed"


async def test_recovery_route_ends_a_cut_messages_stream_with_an_error(claude: AnthropicUpstream,
                                                                      spare: AnthropicUpstream,
                                                                      start_tiergate: Any) -> None:
    """Stream recovery continues chat-shaped streams only: a native Messages stream cut mid-answer on a
    `stream_recovery: continue` route ends with Anthropic's error event, never a second message_start."""
    doc = {"providers": {"claude": {"kind": "anthropic", "base_url": claude.url, "api_key": CLAUDE_KEY},
                         "spare": {"kind": "anthropic", "base_url": spare.url, "api_key": SPARE_KEY}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "claude/claude-sonnet-4",
                       "fallbacks": ["spare/claude-haiku"], "stream_recovery": "continue"}]}
    gate = await start_tiergate(doc)
    claude.push(Cut(after=4))
    client = anthropic.AsyncAnthropic(base_url=gate.url, api_key="x", max_retries=0)
    starts = 0
    with pytest.raises(anthropic.APIStatusError):
        async with client.messages.stream(model="general_purpose:standard", max_tokens=16,
                                          messages=[{"role": "user", "content": "one two three"}]) as stream:
            async for event in stream:
                starts += event.type == "message_start"
    assert starts == 1 and not spare.requests


async def test_cache_keeps_answers_of_different_beta_headers_apart(gate: Any, claude: AnthropicUpstream) -> None:
    """A temperature-0 call is cached, but an answer serves only calls with the same `anthropic-version` and
    `anthropic-beta` (a beta can change the answer: thinking blocks, caching, ...)."""
    client = _client(gate)

    async def ask(beta: str) -> str:
        raw = await client.messages.with_raw_response.create(
            model="claude-sonnet-4", max_tokens=16, extra_body={"temperature": 0},
            extra_headers={"anthropic-beta": beta}, messages=[{"role": "user", "content": "the same question"}])
        return raw.headers["x-tiergate-cache"]

    assert await ask("interleaved-thinking-2025-05-14") == "miss"
    assert await ask("prompt-caching-2024-07-31") == "miss"
    assert await ask("interleaved-thinking-2025-05-14") == "hit"
    assert len(claude.requests) == 2
    assert claude.requests[1].headers["anthropic-beta"] == "prompt-caching-2024-07-31"
