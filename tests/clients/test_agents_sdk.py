"""End-to-end: the OpenAI Agents SDK (its default model speaks the Responses API) running a
tool-using agent through tiergate, whose only provider speaks Chat Completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from ..conftest import PRIMARY_KEY
from ..upstream import MockUpstream, Ok

agents = pytest.importorskip("agents")


@pytest.fixture
async def chat_only() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("chatonly").start()
    yield server
    await server.stop()


@pytest.mark.parametrize("streamed", [False, True])
async def test_tool_using_agent_over_a_chat_only_provider(chat_only, start_tiergate, streamed):
    doc = {"providers": {"local": {"base_url": chat_only.url, "api_key": PRIMARY_KEY,
                                   "apis": ["chat", "completions", "embeddings"]}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "local/llama"}]}
    running = await start_tiergate(doc)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather of a city."""
        calls.append(city)
        return f"sunny in {city}"

    chat_only.push(Ok(tool_calls=[("get_weather", '{"city": "Paris"}')]), Ok(content="It is sunny in Paris."))
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="sk-client", max_retries=0) as client:
        model = agents.OpenAIResponsesModel(model="general_purpose", openai_client=client)
        agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model)
        config = agents.RunConfig(tracing_disabled=True)
        if streamed:
            run = agents.Runner.run_streamed(agent, "Weather in Paris?", run_config=config)
            async for _ in run.stream_events():
                pass
            output = run.final_output
        else:
            output = (await agents.Runner.run(agent, "Weather in Paris?", run_config=config)).final_output
    assert output == "It is sunny in Paris."
    assert calls == ["Paris"]
    first, second = (r.json for r in chat_only.requests)
    assert [r.path for r in chat_only.requests] == ["/v1/chat/completions"] * 2
    assert first["model"] == "llama" and first["tools"][0]["function"]["name"] == "get_weather"
    assert first["messages"][0] == {"role": "system", "content": "Answer with the tool."}
    # the second turn carries the call and its output back as chat messages
    assistant, tool = second["messages"][-2:]
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert tool == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "sunny in Paris"}
