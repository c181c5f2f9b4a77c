"""Extended thinking on the translated paths, with the official SDKs and the Anthropic-shaped mock: a chat
call's `reasoning_effort` turns on Claude's thinking, its answer's thinking comes back as `reasoning_content`
and `thinking_blocks` (stream: deltas), the blocks given back in a tool-use round trip reach Claude with
their signatures, and a Responses call gets a `reasoning` item with the summary text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.anthropic_upstream import AnthropicUpstream

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
async def claude() -> AsyncIterator[AnthropicUpstream]:
    server = await AnthropicUpstream("claude").start()
    yield server
    await server.stop()


@pytest.fixture
async def client(claude: AnthropicUpstream, start_tiergate: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    doc = {"providers": {"claude": {"kind": "anthropic", "base_url": claude.url, "api_key": "sk-ant-THINK-1"}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "claude/claude-sonnet-4",
                       "temperature": 0.3}]}  # a route default Anthropic refuses beside thinking
    gate = await start_tiergate(doc)
    async with openai.AsyncOpenAI(base_url=gate.v1, api_key="x", max_retries=0) as sdk:
        yield sdk


async def test_chat_reasoning_effort_and_a_tool_round_trip_with_thinking_blocks(
        client: openai.AsyncOpenAI, claude: AnthropicUpstream) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.chat.completions.create(model="general_purpose:standard", reasoning_effort="high",
                                                 max_tokens=500, tools=[WEATHER], messages=messages)
    sent = claude.requests[-1].json
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 4096} and sent["max_tokens"] == 4596
    assert "temperature" not in sent
    reply = first.choices[0].message
    extra = reply.model_extra or {}
    assert extra["reasoning_content"] == "Thinking about weather in Paris?."
    assert extra["thinking_blocks"] == [{"type": "thinking", "thinking": "Thinking about weather in Paris?.",
                                         "signature": "c2lnLW1vY2s="}]
    call = reply.tool_calls[0]
    # the turn given back as it came (thinking_blocks included), with the tool's result
    messages += [reply.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = await client.chat.completions.create(model="general_purpose:standard", reasoning_effort="high",
                                                  max_tokens=500, tools=[WEATHER], messages=messages)
    assert second.choices[0].message.content == "claude: sunny"
    turn = claude.requests[-1].json["messages"][1]["content"]
    assert turn[0] == {"type": "thinking", "thinking": "Thinking about weather in Paris?.",
                       "signature": "c2lnLW1vY2s="}
    assert [b["type"] for b in turn] == ["thinking", "text", "tool_use"]


async def test_chat_stream_carries_reasoning_deltas_and_the_signature(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="general_purpose:standard", stream=True,
                                                  reasoning_effort="low", messages=[{"role": "user", "content": "hi"}])
    reasoning, text, signatures = "", "", []
    async for chunk in stream:
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
            signatures += [b["signature"] for b in extra.get("thinking_blocks") or () if b.get("signature")]
            text += choice.delta.content or ""
    assert reasoning == "Thinking about hi." and signatures == ["c2lnLW1vY2s="] and text == "claude: hi "


async def test_responses_reasoning_reaches_claude_and_comes_back_as_a_reasoning_item(
        client: openai.AsyncOpenAI, claude: AnthropicUpstream) -> None:
    response = await client.responses.create(model="general_purpose:standard", input="hello",
                                             reasoning={"effort": "medium"}, max_output_tokens=3000)
    assert claude.requests[-1].json["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    item = response.output[0]
    assert item.type == "reasoning" and item.summary[0].text == "Thinking about hello."
    assert response.output_text == "claude: hello"
    stream = await client.responses.create(model="general_purpose:standard", input="streamed",
                                           reasoning={"effort": "low"}, stream=True)
    done = [event.item async for event in stream if event.type == "response.output_item.done"]
    assert done[0].type == "reasoning" and done[0].summary[0].text == "Thinking about streamed."


async def test_responses_tool_round_trip_with_thinking_gives_claude_its_blocks_back(
        client: openai.AsyncOpenAI, claude: AnthropicUpstream) -> None:
    """A Responses client that sends the output items back as input (as the agents SDKs do) gives Claude its
    signed thinking blocks back through the reasoning item's encrypted_content: the tool-use turn is accepted."""
    tool = {"type": "function", "name": "weather", "parameters": WEATHER["function"]["parameters"]}
    history: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.responses.create(model="general_purpose:standard", input=history, tools=[tool],
                                          reasoning={"effort": "low"}, store=False)
    assert [o.type for o in first.output] == ["reasoning", "message", "function_call"]
    call = first.output[-1]
    history += [o.model_dump(exclude_none=True) for o in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny"})
    second = await client.responses.create(model="general_purpose:standard", input=history, tools=[tool],
                                           reasoning={"effort": "low"}, store=False)
    assert second.output_text == "claude: sunny"
    turn = claude.requests[-1].json["messages"][1]["content"]
    assert turn[0] == {"type": "thinking", "thinking": "Thinking about weather in Paris?.",
                       "signature": "c2lnLW1vY2s="}
