"""`POST /v1/responses` and the stored-response endpoints through tiergate, with the official SDK.

Upstreams are real aiohttp servers: `MockUpstream(responses=True)` speaks the Responses API,
a plain `MockUpstream` only Chat Completions (declared `apis: [chat, ...]` in the table, so
tiergate translates).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from ..conftest import BACKUP_KEY, PRIMARY_KEY
from ..upstream import BreakStream, Fail, MockUpstream, Ok

CHAT_ONLY = ["chat", "completions", "embeddings"]
REDIS_URL = os.environ.get("TIERGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
async def native() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("native", responses=True).start()
    yield server
    await server.stop()


@pytest.fixture
async def native2() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("native2", responses=True).start()
    yield server
    await server.stop()


@pytest.fixture
async def chat_only() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("chatonly").start()
    yield server
    await server.stop()


def doc(primary: MockUpstream, backup: MockUpstream | None = None, *, primary_apis: list[str] | None = None,
        backup_apis: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    providers: dict[str, Any] = {"primary": {"base_url": primary.url, "api_key": PRIMARY_KEY}}
    if primary_apis is not None:
        providers["primary"]["apis"] = primary_apis
    fallbacks = []
    if backup is not None:
        providers["backup"] = {"base_url": backup.url, "api_key": BACKUP_KEY}
        if backup_apis is not None:
            providers["backup"]["apis"] = backup_apis
        fallbacks = ["backup/model-b"]
    return {"providers": providers,
            "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "primary/model-a",
                        "fallbacks": fallbacks},
                       {"use_case": "code_generation", "tier": "premium", "model": "primary/model-p",
                        "max_tokens": 99, "temperature": 0.1, "system_prompt": "You write code."}],
            "pricing": {"primary/model-a": {"input": 1.0, "output": 2.0}}, **extra}


def client(running: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key="sk-client", max_retries=0)


def paths(upstream: MockUpstream) -> list[str]:
    return [r.path for r in upstream.requests]


async def test_native_create_and_stream(native, start_tiergate):
    running = await start_tiergate(doc(native))
    async with client(running) as c:
        raw = await c.responses.with_raw_response.create(model="general_purpose", input="Say hi",
                                                         instructions="Be brief.", max_output_tokens=20)
        response = raw.parse()
        assert response.output_text == "native responded model-a"
        assert raw.headers["x-tiergate-model"] == "primary/model-a"
        assert raw.headers["x-tiergate-route"] == "general_purpose:standard"
        # usage feeds cost: 12 input tokens at $1/M + 4 output at $2/M
        assert float(raw.headers["x-tiergate-cost-usd"]) == pytest.approx(20e-6)
        sent = native.requests[-1]
        assert sent.path == "/v1/responses"
        assert sent.json["model"] == "model-a" and sent.json["input"] == "Say hi"
        assert sent.json["instructions"] == "Be brief." and sent.json["max_output_tokens"] == 20
        assert sent.headers["Authorization"] == f"Bearer {PRIMARY_KEY}"

        stream = await c.responses.create(model="general_purpose", input="Say hi", stream=True)
        events = [e async for e in stream]
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "native responded model-a"


async def test_route_defaults_use_the_responses_names(native, start_tiergate):
    running = await start_tiergate(doc(native))
    async with client(running) as c:
        await c.responses.create(model="code_generation:premium", input="x")
    sent = native.requests[-1].json
    assert (sent["max_output_tokens"], sent["temperature"], sent["instructions"]) == (99, 0.1, "You write code.")
    assert "max_tokens" not in sent


async def test_translated_create_sync_and_async(chat_only, start_tiergate):
    running = await start_tiergate(doc(chat_only, primary_apis=CHAT_ONLY))
    tools = [{"type": "function", "name": "lookup", "description": "Look up",
              "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    async with client(running) as c:
        response = await c.responses.create(
            model="general_purpose", instructions="Be brief.", max_output_tokens=40, temperature=0.3,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                                {"type": "input_image", "image_url": "https://x.example/a.png"}]}],
            tools=tools, reasoning={"effort": "low"},
            text={"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}})
    assert response.output_text == "chatonly answered model-a"
    assert response.status == "completed" and response.usage.input_tokens == 10
    assert response.id.startswith("resp_")
    sent = chat_only.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent.json["messages"][1]["content"][1] == {"type": "image_url",
                                                      "image_url": {"url": "https://x.example/a.png"}}
    assert sent.json["tools"][0]["function"]["name"] == "lookup"
    assert sent.json["response_format"]["type"] == "json_schema"
    assert (sent.json["max_tokens"], sent.json["temperature"], sent.json["reasoning_effort"]) == (40, 0.3, "low")

    def sync_call() -> str:
        with openai.OpenAI(base_url=running.v1, api_key="sk-client", max_retries=0) as sync:
            return sync.responses.create(model="general_purpose", input="hi").output_text

    assert await asyncio.to_thread(sync_call) == "chatonly answered model-a"


async def test_translated_stream_with_tool_calls(chat_only, start_tiergate):
    running = await start_tiergate(doc(chat_only, primary_apis=CHAT_ONLY))
    chat_only.push(Ok(tool_calls=[("lookup", '{"q": "tiergate"}')]))
    async with client(running) as c:
        async with c.responses.stream(model="general_purpose", input="find it",
                                      tools=[{"type": "function", "name": "lookup", "parameters": {}}]) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    (call,) = final.output
    assert (call.type, call.name, call.arguments) == ("function_call", "lookup", '{"q": "tiergate"}')
    assert chat_only.requests[-1].json["stream_options"] == {"include_usage": True}
    assert final.usage.input_tokens == 10


async def test_stream_failure_before_first_event_falls_back(native, chat_only, start_tiergate):
    running = await start_tiergate(doc(native, chat_only, backup_apis=CHAT_ONLY))
    native.push(Fail(503))
    async with client(running) as c:
        raw = await c.responses.with_raw_response.create(model="general_purpose", input="x", stream=True)
        assert raw.headers["x-tiergate-model"] == "backup/model-b"
        events = [e async for e in raw.parse()]
    assert events[-1].response.output_text == "chatonly answered model-b"
    assert paths(native) == ["/v1/responses"] and paths(chat_only) == ["/v1/chat/completions"]


@pytest.mark.parametrize("translated", [False, True])
async def test_stream_break_later_raises_in_the_sdk(native, chat_only, start_tiergate, translated):
    upstream = chat_only if translated else native
    running = await start_tiergate(doc(upstream, primary_apis=CHAT_ONLY if translated else None))
    upstream.push(BreakStream(after=3))
    seen = []
    async with client(running) as c:
        stream = await c.responses.create(model="general_purpose", input="a b c d e f", stream=True)
        with pytest.raises(openai.APIError, match="broke off"):
            async for event in stream:
                seen.append(event.type)
    assert seen[0] == "response.created"
    if translated:
        assert seen[-1] == "response.failed"


async def test_a_native_stream_that_breaks_is_not_continued_though_recovery_is_on(native, native2, start_tiergate):
    """Stream recovery (on by default) continues chat streams; a native Responses stream is typed events
    it cannot carry on: it ends with the error, and the fallback is never asked."""
    running = await start_tiergate(doc(native, native2))
    native.push(BreakStream(after=3))
    async with client(running) as c:
        stream = await c.responses.create(model="general_purpose", input="a b c d e f", stream=True)
        with pytest.raises(openai.APIError, match="broke off"):
            async for _ in stream:
                pass
    assert paths(native2) == []


async def test_builtin_tools_refused_for_chat_only_and_kept_from_them(native, chat_only, start_tiergate):
    running = await start_tiergate(doc(chat_only, primary_apis=CHAT_ONLY))
    async with client(running) as c:
        with pytest.raises(openai.BadRequestError) as caught:
            await c.responses.create(model="general_purpose", input="news?", tools=[{"type": "web_search"}])
    assert caught.value.body["param"] == "tools[0]"
    assert "web_search" in caught.value.message and "Chat Completions" in caught.value.message
    assert chat_only.calls == 0
    # a route with a Responses provider as fallback: only that one is tried
    running = await start_tiergate(doc(chat_only, native, primary_apis=CHAT_ONLY))
    async with client(running) as c:
        response = await c.responses.create(model="general_purpose", input="news?", tools=[{"type": "web_search"}])
    assert response.output_text == "native responded model-b"
    assert chat_only.calls == 0


async def test_stored_id_follows_its_provider_after_a_fallback(native, native2, start_tiergate):
    running = await start_tiergate(doc(native, native2))
    native.push(Fail(500))
    async with client(running) as c:
        first = await c.responses.create(model="general_purpose", input="remember me")
        assert first.id.startswith("resp_native2_")  # the fallback answered
        # the primary is healthy again: every follow-up still goes to the provider that holds the id
        again = await c.responses.retrieve(first.id)
        assert again.id == first.id and again.output_text == first.output_text
        items = await c.responses.input_items.list(first.id)
        assert items.data[0].content[0].text == "remember me"
        follow = await c.responses.create(model="general_purpose", input="and then?", previous_response_id=first.id)
        assert follow.output_text == f"native2 responded model-b after {first.id}"
        streamed = await c.responses.create(model="general_purpose", input="more", previous_response_id=first.id,
                                            stream=True)
        assert [e async for e in streamed][-1].type == "response.completed"
        cancelled = await c.responses.cancel(first.id)
        assert cancelled.status == "cancelled"
        await c.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(first.id)
        # a later call answered by the primary: its id stays with the primary
        later = await c.responses.create(model="general_purpose", input="later")
        assert later.id.startswith("resp_native_")
        assert (await c.responses.retrieve(later.id)).output_text == "native responded model-a"
    assert paths(native) == ["/v1/responses"] * 2 + [f"/v1/responses/{later.id}"]
    assert [r.method for r in native2.requests] == ["POST", "GET", "GET", "POST", "POST", "POST", "DELETE"]
    assert native2.requests[1].headers["Authorization"] == f"Bearer {BACKUP_KEY}"


async def test_ids_tiergate_cannot_follow_are_clear_errors(native, chat_only, start_tiergate):
    running = await start_tiergate(doc(chat_only, primary_apis=CHAT_ONLY))
    async with client(running) as c:
        translated = await c.responses.create(model="general_purpose", input="hi")
        assert translated.store is False
        with pytest.raises(openai.NotFoundError, match="Chat Completions"):
            await c.responses.retrieve(translated.id)
        with pytest.raises(openai.BadRequestError, match="nothing was stored"):
            await c.responses.create(model="general_purpose", input="x", previous_response_id=translated.id)
        with pytest.raises(openai.NotFoundError, match="resp_nobody"):
            await c.responses.retrieve("resp_nobody")
        with pytest.raises(openai.BadRequestError, match="unknown to tiergate"):
            await c.responses.create(model="general_purpose", input="x", previous_response_id="resp_nobody")
    assert paths(chat_only) == ["/v1/chat/completions"]


async def test_store_false_is_not_remembered(native, start_tiergate):
    running = await start_tiergate(doc(native))
    async with client(running) as c:
        response = await c.responses.create(model="general_purpose", input="x", store=False)
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(response.id)


async def test_fleet_shares_affinity_through_redis(native, native2, start_tiergate):
    redis = pytest.importorskip("redis.asyncio")
    probe = redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await probe.ping()
    except OSError:
        pytest.skip(f"Redis at {REDIS_URL} is unreachable")
    finally:
        await probe.aclose()
    namespace = f"tiergate-test-{uuid.uuid4().hex}"
    settings = {"redis_url": REDIS_URL, "cache_namespace": namespace}
    one = await start_tiergate(doc(native, native2), **settings)
    two = await start_tiergate(doc(native, native2), **settings)
    native.push(Fail(500))
    async with client(one) as c1, client(two) as c2:
        first = await c1.responses.create(model="general_purpose", input="hi")
        assert first.id.startswith("resp_native2_")
        assert (await c2.responses.retrieve(first.id)).id == first.id  # the other sidecar knows the holder


async def test_usage_of_native_and_translated_streams_feeds_metrics(native, chat_only, start_tiergate):
    running = await start_tiergate(doc(native, chat_only, backup_apis=CHAT_ONLY))
    async with client(running) as c:
        async for _ in await c.responses.create(model="general_purpose", input="x", stream=True):
            pass  # native: 12 input, 4 output tokens from response.completed
        native.push(Fail(500))
        async for _ in await c.responses.create(model="general_purpose", input="x", stream=True):
            pass  # translated: 10 prompt, 3 completion tokens from the chat stream's usage chunk
    stats = running.router.get_metrics()
    assert stats["tokens"] == {"prompt": 22, "completion": 7, "total": 29, "cached_prompt": 9, "reasoning": 3}


async def test_redis_down_this_process_still_remembers(native, start_tiergate):
    running = await start_tiergate(doc(native), redis_url="redis://127.0.0.1:1/15")  # nothing listens there
    async with client(running) as c:
        first = await c.responses.create(model="general_purpose", input="hi")
        assert (await c.responses.retrieve(first.id)).id == first.id


async def test_sync_client_native_create_stream_and_retrieve(native, start_tiergate):
    running = await start_tiergate(doc(native))

    def sync_calls() -> tuple[str, list[str], str]:
        with openai.OpenAI(base_url=running.v1, api_key="sk-client", max_retries=0) as sync:
            created = sync.responses.create(model="general_purpose", input="hi")
            kinds = [e.type for e in sync.responses.create(model="general_purpose", input="hi", stream=True)]
            return created.output_text, kinds, sync.responses.retrieve(created.id).id

    text, kinds, retrieved = await asyncio.to_thread(sync_calls)
    assert text == "native responded model-a"
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert retrieved.startswith("resp_native_")


async def test_a_stored_prompt_and_item_references_reach_a_responses_provider_as_written(native, start_tiergate):
    # with inbound keys too: a template is the provider project's and an item a stored response's, owners
    # tiergate cannot know, so neither is refused (a file among the template's variables is checked)
    running = await start_tiergate(doc(native), api_keys=("team-a=sk-team-a-1234567890",))
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="sk-team-a-1234567890", max_retries=0) as c:
        first = await c.responses.create(model="general_purpose", input="hi")
        prompt = {"id": "pmpt_1", "version": "2", "variables": {"city": "Paris"}}
        reference = {"type": "item_reference", "id": first.output[0].id}
        answer = await c.responses.create(model="general_purpose", prompt=prompt, input=[reference])
        assert answer.status == "completed"
    sent = native.requests[-1].json
    assert sent["prompt"] == prompt and sent["input"] == [reference]
