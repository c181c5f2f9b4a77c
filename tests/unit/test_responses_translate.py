"""The Responses <-> Chat Completions translation (pure functions), table-driven.

Inputs are shaped like what the openai SDK and the OpenAI Agents SDK send and what OpenAI's
chat API answers (recorded payloads, ids shortened); outputs are validated with the openai SDK's
own pydantic types, so a shape the SDK cannot read fails here.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.adapters.responses import ChatStreamTranslator, chat_to_response, to_chat_request
from proxy.types import InvalidRequestError

EVENTS = TypeAdapter(ResponseStreamEvent)

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False},
                "strict": True}

# (name, Responses request, expected chat request)
REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("plain string input",
     {"model": "gpt-4o-mini", "input": "Say hi"},
     {"messages": [{"role": "user", "content": "Say hi"}]}),
    ("instructions, sampling, limits, user",
     {"model": "m", "instructions": "Be brief.", "input": "Hi", "temperature": 0.2, "top_p": 0.9,
      "max_output_tokens": 50, "user": "u1", "store": True, "metadata": {"k": "v"}, "truncation": "auto"},
     {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
      "temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "user": "u1"}),
    ("easy messages with developer role and image",
     {"model": "m", "input": [
         {"role": "developer", "content": "Rules"},
         {"role": "user", "content": [
             {"type": "input_text", "text": "What is this?"},
             {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}]}]},
     {"messages": [{"role": "system", "content": "Rules"},
                   {"role": "user", "content": [
                       {"type": "text", "text": "What is this?"},
                       {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                                           "detail": "low"}}]}]}),
    ("agents SDK turn: assistant output, function call, its output",
     {"model": "m", "instructions": "You are a weather bot.", "input": [
         {"content": "Weather in Paris?", "role": "user"},
         {"id": "msg_1", "content": [{"annotations": [], "text": "Let me check.", "type": "output_text",
                                      "logprobs": []}],
          "role": "assistant", "status": "completed", "type": "message"},
         {"arguments": "{\"city\":\"Paris\"}", "call_id": "call_abc", "name": "get_weather",
          "type": "function_call", "id": "fc_1", "status": "completed"},
         {"call_id": "call_abc", "output": "sunny", "type": "function_call_output"},
         {"id": "rs_1", "summary": [], "type": "reasoning"}],
      "tools": [WEATHER_TOOL], "tool_choice": "auto", "parallel_tool_calls": False, "stream": False,
      "include": [], "text": {"format": {"type": "text"}}},
     {"messages": [
         {"role": "system", "content": "You are a weather bot."},
         {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "Let me check.", "tool_calls": [
             {"id": "call_abc", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
         {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"}],
      "tools": [{"type": "function", "function": {
          "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER_TOOL["parameters"],
          "strict": True}}],
      "tool_choice": "auto", "parallel_tool_calls": False}),
    ("function calls without assistant text, named tool_choice",
     {"model": "m", "input": [
         {"role": "user", "content": "two cities"},
         {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
         {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
         {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "a"}]},
         {"type": "function_call_output", "call_id": "c2", "output": "b"}],
      "tool_choice": {"type": "function", "name": "get_weather"}},
     {"messages": [
         {"role": "user", "content": "two cities"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
             {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "a"},
         {"role": "tool", "tool_call_id": "c2", "content": "b"}],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("structured output, reasoning effort, stream",
     {"model": "m", "input": "JSON please", "reasoning": {"effort": "low", "summary": "auto"},
      "text": {"format": {"type": "json_schema", "name": "city", "strict": True,
                          "schema": {"type": "object", "properties": {"name": {"type": "string"}}}},
               "verbosity": "low"},
      "stream": True, "top_logprobs": 2},
     {"messages": [{"role": "user", "content": "JSON please"}],
      "response_format": {"type": "json_schema", "json_schema": {
          "name": "city", "schema": {"type": "object", "properties": {"name": {"type": "string"}}},
          "strict": True}},
      "verbosity": "low", "reasoning_effort": "low", "logprobs": True, "top_logprobs": 2,
      "stream": True, "stream_options": {"include_usage": True}}),
    ("json_object, file input, unknown field passed on",
     {"model": "m", "text": {"format": {"type": "json_object"}}, "seed": 7, "input": [
         {"type": "message", "role": "user", "content": [
             {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}]}]},
     {"messages": [{"role": "user", "content": [
         {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}}]}],
      "response_format": {"type": "json_object"}, "seed": 7}),
]


@pytest.mark.parametrize(("name", "request_body", "expected"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_translation(name: str, request_body: dict[str, Any], expected: dict[str, Any]) -> None:
    before = orjson.dumps(request_body)
    assert to_chat_request(request_body) == expected
    assert orjson.dumps(request_body) == before  # the client's request is not modified


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "x", "tools": [WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[1]"),
    ({"input": "x", "tools": [{"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                               "environment": "linux"}]}, "tools[0]"),
    ({"input": "x", "tools": [{"type": "mcp", "server_label": "s"}]}, "tools[0]"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input[0].content[0]"),
]


@pytest.mark.parametrize(("request_body", "param"), REFUSED, ids=[p for _, p in REFUSED])
def test_untranslatable_requests_are_refused(request_body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        to_chat_request(request_body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert "Chat Completions" in caught.value.message


@pytest.mark.parametrize("request_body", [{}, {"input": 3}, {"input": [{"role": "robot", "content": "x"}]},
                                          {"input": [{"type": "function_call", "call_id": "c"}]},
                                          {"input": "x", "text": {"format": {"type": "xml"}}},
                                          {"input": "x", "tools": ["not an object"]}])
def test_malformed_requests_are_400(request_body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        to_chat_request(request_body)


# recorded from OpenAI's chat API (ids shortened)
CHAT_TEXT = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion", "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I assist you today?",
                                         "refusal": None, "annotations": []},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
              "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "service_tier": "default"}
CHAT_TOOL = {
    "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1699896916, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc123", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\n\"city\": \"Boston\"\n}"}}]},
                 "logprobs": None, "finish_reason": "tool_calls"}],
    "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99}}
CHAT_LENGTH = {"id": "c", "object": "chat.completion", "created": 1, "model": "llama3",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Once upon",
                                                    "reasoning_content": "think"},
                            "finish_reason": "length"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def test_chat_completion_to_response_text() -> None:
    request = {"model": "gpt-4.1", "input": "hi", "instructions": "Be kind.", "temperature": 0.5,
               "metadata": {"a": "b"}}
    body = chat_to_response(CHAT_TEXT, request, "resp_tg1")
    response = Response.model_validate(body)
    assert response.id == "resp_tg1"
    assert response.status == "completed"
    assert response.output_text == "Hello! How can I assist you today?"
    assert response.model == "gpt-4.1-2025-04-14"
    assert response.instructions == "Be kind." and response.temperature == 0.5
    assert response.metadata == {"a": "b"}
    assert response.usage.input_tokens == 19 and response.usage.output_tokens == 10
    assert response.usage.input_tokens_details.cached_tokens == 4
    assert response.usage.output_tokens_details.reasoning_tokens == 2
    assert list(body)[-1] == "usage"  # metrics read usage from the tail


def test_chat_completion_to_response_tool_call() -> None:
    request = {"model": "m", "input": "weather?", "tools": [WEATHER_TOOL]}
    response = Response.model_validate(chat_to_response(CHAT_TOOL, request, "resp_tg2"))
    (call,) = response.output
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == ("call_abc123", "get_weather", "{\n\"city\": \"Boston\"\n}")
    assert response.tools[0].name == "get_weather"


def test_chat_completion_to_response_incomplete_with_reasoning() -> None:
    response = Response.model_validate(chat_to_response(CHAT_LENGTH, {"input": "x", "max_output_tokens": 2},
                                                        "resp_tg3"))
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == "Once upon"


def _sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


_BASE = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1741569952,
         "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_06737a9306"}
# recorded from OpenAI's chat API with stream_options.include_usage
TEXT_STREAM = _sse(
    {**_BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                           "logprobs": None, "finish_reason": None}], "usage": None},
    {**_BASE, "choices": [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}],
     "usage": None},
    {**_BASE, "choices": [{"index": 0, "delta": {"content": " there"}, "logprobs": None, "finish_reason": None}],
     "usage": None},
    {**_BASE, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], "usage": None},
    {**_BASE, "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10,
                                       "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                                       "completion_tokens_details": {"reasoning_tokens": 0}}})
TOOL_STREAM = _sse(
    {**_BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}], "refusal": None},
                           "logprobs": None, "finish_reason": None}]},
    {**_BASE, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\""}}]},
                           "logprobs": None, "finish_reason": None}]},
    {**_BASE, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
        "arguments": "city\":\"Paris\"}"}}]}, "logprobs": None, "finish_reason": None}]},
    {**_BASE, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                           "logprobs": None, "finish_reason": None}]},
    {**_BASE, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]},
    {**_BASE, "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}})


def _events(data: bytes) -> list[Any]:
    """Parse the translator's SSE output with the SDK's event types; check `event:` matches `type`."""
    events = []
    for block in data.split(b"\n\n"):
        if not block:
            continue
        name_line, data_line = block.split(b"\n")
        payload = orjson.loads(data_line.removeprefix(b"data: "))
        assert name_line == b"event: " + payload["type"].encode()
        events.append(EVENTS.validate_python(payload))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def _feed_split(translator: ChatStreamTranslator, data: bytes, size: int) -> bytes:
    out = b"".join(translator.feed(data[i:i + size]) for i in range(0, len(data), size))
    return out + translator.close()


@pytest.mark.parametrize("split", [1, 7, 64, 100_000])
def test_text_stream_translation(split: int) -> None:
    translator = ChatStreamTranslator({"model": "m", "input": "hi"}, "resp_s1", 1741569952, "m")
    events = _events(_feed_split(translator, TEXT_STREAM, split))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello there"
    completed = events[-1].response
    assert completed.output_text == "Hello there"
    assert completed.model == "gpt-4o-mini-2024-07-18"
    assert completed.usage.input_tokens == 8 and completed.usage.output_tokens == 2
    assert events[0].response.status == "in_progress" and completed.status == "completed"


def test_tool_call_stream_translation() -> None:
    translator = ChatStreamTranslator({"model": "m", "input": "hi", "tools": [WEATHER_TOOL]}, "resp_s2", 1, "m")
    events = _events(_feed_split(translator, TOOL_STREAM, 13))
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    calls = events[-1].response.output
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", "{\"city\":\"Paris\"}"),
        ("call_2", "get_time", "{}")]
    assert events[-1].response.usage.total_tokens == 70


def test_stream_that_breaks_ends_with_failed_and_error() -> None:
    translator = ChatStreamTranslator({"input": "hi"}, "resp_s3", 1, "m")
    head = TEXT_STREAM[:TEXT_STREAM.index(b"data:", 10)]  # the first chunk only
    out = translator.feed(head)
    out += translator.feed(b'data: {"error": {"message": "the upstream stream broke off", "type": "upstream_error",'
                           b' "param": null, "code": "upstream_connection"}}\n\n')
    out += translator.feed(b"data: [DONE]\n\n") + translator.close()  # nothing after the end
    events = _events(out)
    assert [e.type for e in events][-2:] == ["response.failed", "error"]
    assert events[-2].response.status == "failed"
    assert events[-2].response.error.message == "the upstream stream broke off"
    last = orjson.loads(out.rsplit(b"data: ", 1)[1])
    assert last["error"]["message"] == "the upstream stream broke off"  # the SDK raises APIError on it


def test_reasoning_and_crlf_stream() -> None:
    data = _sse({**_BASE, "choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}, "finish_reason": None}]},
                {**_BASE, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "length"}]},
                ).replace(b"\n\n", b"\r\n\r\n")
    translator = ChatStreamTranslator({"input": "x"}, "resp_s4", 1, "m")
    events = _events(_feed_split(translator, data, 5).replace(b"\r\n", b"\n"))
    final = events[-1]
    assert final.type == "response.incomplete"
    assert [o.type for o in final.response.output] == ["reasoning", "message"]
    assert final.response.output_text == "ok"


def test_empty_stream_still_completes() -> None:
    translator = ChatStreamTranslator({"input": "x"}, "resp_s5", 1, "m")
    events = _events(translator.close())
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == ""


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=10)
_item = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "input_text",
                             "web_search_call", "item_reference"]) | _json,
    "role": st.sampled_from(["user", "assistant", "system", "developer"]) | _json,
    "content": _json | st.lists(st.fixed_dictionaries({"type": st.sampled_from(
        ["input_text", "input_image", "input_file", "output_text", "refusal"]) | _json, "text": _json}), max_size=2),
    "call_id": _json, "name": _json, "arguments": _json, "output": _json})
_request = st.fixed_dictionaries({}, optional={
    "input": st.text(max_size=5) | st.lists(_item, max_size=4) | _json, "instructions": _json,
    "tools": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search"]) | _json,
                                             "name": _json}), max_size=2) | _json,
    "tool_choice": _json, "text": _json, "reasoning": _json, "max_output_tokens": _json, "stream": _json})


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(_request)
def test_any_request_translates_or_is_a_400(request_body: dict[str, Any]) -> None:
    try:
        orjson.dumps(to_chat_request(request_body))
    except InvalidRequestError:
        pass


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.binary(max_size=64) | st.builds(lambda v: b"data: " + orjson.dumps(v) + b"\n\n", _json | st.builds(
    lambda d, f, u: {"choices": [{"index": 0, "delta": d, "finish_reason": f}], "usage": u},
    st.fixed_dictionaries({}, optional={"content": _json, "reasoning_content": _json, "tool_calls": st.lists(
        st.fixed_dictionaries({}, optional={"index": _json, "id": _json, "function": _json}), max_size=2),
        "thinking_blocks": _json | st.lists(st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["thinking", "redacted_thinking"]) | _json, "thinking": _json,
            "signature": _json, "data": _json}), max_size=2)}),
    _json, _json)), max_size=6))
def test_any_upstream_bytes_end_in_a_well_formed_stream(chunks: list[bytes]) -> None:
    translator = ChatStreamTranslator({"input": "x"}, "resp_f", 1, "m")
    out = b"".join(translator.feed(c) for c in chunks) + translator.close()
    assert _events(out)[-1].type in ("response.completed", "response.incomplete", "error")


SIGNED = [{"type": "thinking", "thinking": "first, ", "signature": "c2ln"},
          {"type": "redacted_thinking", "data": "ZW5j"}]


def test_claudes_thinking_blocks_travel_in_a_reasoning_items_encrypted_content_and_back() -> None:
    """A chat answer carrying Claude's thinking blocks: the reasoning item holds them (opaque) in
    `encrypted_content`; given back as input, they return on the assistant turn after it, for Claude."""
    chat = {"id": "c", "model": "claude", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "reasoning_content": "first, ", "thinking_blocks": SIGNED,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    response = chat_to_response(chat, {"input": "x"}, "resp_t1")
    reasoning = response["output"][0]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == [{"type": "summary_text", "text": "first, "}]
    assert reasoning["encrypted_content"].startswith("tiergate-thinking:")
    again = to_chat_request({"model": "m", "input": [
        {"role": "user", "content": "x"}, *response["output"],
        {"type": "function_call_output", "call_id": "call_1", "output": "42"}]})
    assert again["messages"][1]["thinking_blocks"] == SIGNED and again["messages"][1]["tool_calls"]
    # an encrypted_content tiergate did not write (OpenAI's own) is left out, as before
    other = to_chat_request({"model": "m", "input": [{"type": "reasoning", "id": "rs", "summary": [],
                                                      "encrypted_content": "gAAAA..."},
                                                     {"role": "assistant", "content": "ok"}]})
    assert "thinking_blocks" not in other["messages"][0]


def test_streamed_thinking_blocks_are_put_back_together_in_the_reasoning_item() -> None:
    data = _sse({**_BASE, "choices": [{"index": 0, "delta": {"reasoning_content": "first", "thinking_blocks": [
                    {"type": "thinking", "thinking": "first"}]}, "finish_reason": None}]},
                {**_BASE, "choices": [{"index": 0, "delta": {"reasoning_content": ", ", "thinking_blocks": [
                    {"type": "thinking", "thinking": ", "}]}, "finish_reason": None}]},
                {**_BASE, "choices": [{"index": 0, "delta": {"thinking_blocks": [
                    {"type": "thinking", "thinking": "", "signature": "c2ln"}]}, "finish_reason": None}]},
                {**_BASE, "choices": [{"index": 0, "delta": {"thinking_blocks": [SIGNED[1]]}, "finish_reason": None}]},
                {**_BASE, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]})
    events = _events(_feed_split(ChatStreamTranslator({"input": "x"}, "resp_t2", 1, "m"), data, 9))
    item = events[-1].response.output[0]
    assert item.type == "reasoning" and item.summary[0].text == "first, "
    output = [o.model_dump(exclude_none=True) for o in events[-1].response.output]
    again = to_chat_request({"model": "m", "input": [{"role": "user", "content": "x"}, *output]})
    assert again["messages"][1]["thinking_blocks"] == SIGNED
