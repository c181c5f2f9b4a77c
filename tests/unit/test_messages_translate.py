"""The Messages <-> Chat Completions translation (proxy/adapters/messages/), table-driven: requests, whole
answers, stream event sequences, usage in Messages' terms, and the refusals that name their field."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.adapters.anthropic import anthropic_error, error_type_for
from proxy.adapters.messages import (
    DEFAULT_MAX_TOKENS,
    ChatToMessagesStream,
    MessagesToChatStream,
    chat_to_message,
    message_to_chat,
    to_chat_request,
    to_messages_request,
)
from proxy.protocol.usage import Usage, find_usage, messages_start_usage, messages_stream_usage
from proxy.types import InvalidRequestError, RateLimitError, UpstreamStatusError

USER = [{"role": "user", "content": "hi"}]

REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("plain", {"model": "m", "max_tokens": 5, "messages": USER},
     {"model": "m", "max_tokens": 5, "messages": USER}),
    ("system string", {"system": "be brief", "messages": USER},
     {"messages": [{"role": "system", "content": "be brief"}, *USER]}),
    ("system blocks, cache marker dropped",
     {"system": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "b"}],
      "messages": USER},
     {"messages": [{"role": "system", "content": "a\n\nb"}, *USER]}),
    ("sampling, stop, user", {"messages": USER, "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["X"],
                              "metadata": {"user_id": "u1"}},
     {"messages": USER, "temperature": 0.2, "top_p": 0.9, "stop": ["X"], "user": "u1"}),
    ("stream asks for usage", {"messages": USER, "stream": True},
     {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}),
    ("image base64 and url",
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "look"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]},
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
         {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
    ("text document", {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}]}]},
     {"messages": [{"role": "user", "content": "doc"}]}),
    ("tool round trip",
     {"messages": [*USER, {"role": "assistant", "content": [
         {"type": "thinking", "thinking": "t", "signature": "s"}, {"type": "text", "text": "ok"},
         {"type": "tool_use", "id": "tu1", "name": "f", "input": {"a": 1}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu1", "content": [
             {"type": "text", "text": "42"}]}, {"type": "text", "text": "and?"}]}],
      "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
      "tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
     {"messages": [*USER, {"role": "assistant", "content": "ok", "tool_calls": [
         {"id": "tu1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
         {"role": "tool", "tool_call_id": "tu1", "content": "42"}, {"role": "user", "content": "and?"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}],
      "tool_choice": "required", "parallel_tool_calls": False}),
    ("tool choice tool", {"messages": USER, "tool_choice": {"type": "tool", "name": "f"}},
     {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("tool choice none, error result",
     {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "bad",
                                                 "is_error": True}]}], "tool_choice": {"type": "none"}},
     {"messages": [{"role": "tool", "tool_call_id": "t", "content": "Error: bad"}], "tool_choice": "none"}),
    ("thinking disabled is fine", {"messages": USER, "thinking": {"type": "disabled"}}, {"messages": USER}),
]


@pytest.mark.parametrize(("request_", "expected"), [(r, e) for _, r, e in REQUESTS], ids=[n for n, _, _ in REQUESTS])
def test_request(request_: dict[str, Any], expected: dict[str, Any]) -> None:
    chat = to_chat_request(request_)
    if "model" not in expected:
        chat.pop("model", None)
    assert chat == expected


REFUSED = [
    ("thinking", {"messages": USER, "thinking": {"type": "enabled", "budget_tokens": 1024}}),
    ("tools.0", {"messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    ("mcp_servers", {"messages": USER, "mcp_servers": [{"type": "url", "url": "https://m"}]}),
    ("messages.0.content.0", {"messages": [{"role": "user", "content": [{"type": "search_result", "x": 1}]}]}),
    ("messages.0.content.0.source", {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "f"}}]}]}),
    ("messages.0.content.0", {"messages": [{"role": "assistant", "content": [{"type": "server_tool_use"}]}]}),
    ("tool_choice", {"messages": USER, "tool_choice": {"type": "sometimes"}}),
]


@pytest.mark.parametrize(("param", "request_"), REFUSED, ids=[p for p, _ in REFUSED])
def test_refused_names_the_field(param: str, request_: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        to_chat_request(request_)
    assert raised.value.param == param


ANSWERS = [
    ("text", {"message": {"content": "hello"}, "finish_reason": "stop"},
     [{"type": "text", "text": "hello"}], "end_turn"),
    ("length", {"message": {"content": "he"}, "finish_reason": "length"},
     [{"type": "text", "text": "he"}], "max_tokens"),
    ("tool calls", {"message": {"content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        "finish_reason": "tool_calls"},
     [{"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}], "tool_use"),
    ("tool calls said stop", {"message": {"content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
        "finish_reason": "stop"},
     [{"type": "text", "text": "x"}, {"type": "tool_use", "id": "c1", "name": "f",
                                      "input": {"_raw_arguments": "not json"}}], "tool_use"),
    ("filtered", {"message": {"content": ""}, "finish_reason": "content_filter"}, [], "refusal"),
]


@pytest.mark.parametrize(("choice", "content", "reason"), [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS])
def test_answer(choice: dict[str, Any], content: list[Any], reason: str) -> None:
    completion = {"model": "m-1", "choices": [choice],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}}
    message = chat_to_message(completion, {"model": "x"}, "msg_1")
    assert message["content"] == content and message["stop_reason"] == reason
    assert message["usage"] == {"input_tokens": 6, "output_tokens": 3, "cache_read_input_tokens": 4}
    assert message["id"] == "msg_1" and message["type"] == "message" and message["model"] == "m-1"


def _events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in data.split(b"\n\n"):
        if block:
            name, payload = block.split(b"\n")
            out.append((name.removeprefix(b"event: ").decode(), orjson.loads(payload.removeprefix(b"data: "))))
    return out


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


def test_stream_text_then_tool_call_split_across_reads() -> None:
    translator = ChatToMessagesStream("msg_1", "m")
    data = (_chunk({"role": "assistant", "content": "Hel"}) + _chunk({"content": "lo"})
            + _chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]})
            + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]})
            + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]})
            + _chunk({}, "tool_calls")
            + b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}\n\ndata: [DONE]\n\n')
    out = b"".join(translator.feed(data[i:i + 7]) for i in range(0, len(data), 7)) + translator.close()
    events = _events(out)
    assert [n for n, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert events[7][1]["delta"] == {"type": "input_json_delta", "partial_json": ": 1}"} and events[7][1]["index"] == 1
    assert events[9][1]["delta"]["stop_reason"] == "tool_use"
    assert events[9][1]["usage"] == {"input_tokens": 9, "output_tokens": 4}


def test_stream_error_event_ends_without_message_stop() -> None:
    translator = ChatToMessagesStream("msg_1", "m")
    out = translator.feed(_chunk({"content": "partial"}))
    out += translator.feed(b'data: {"error": {"message": "broke off", "code": "upstream_connection"}}\n\n')
    out += translator.close()
    events = _events(out)
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "broke off"}})
    assert "message_stop" not in [n for n, _ in events]


USAGES = [
    ("plain", {"input_tokens": 12, "output_tokens": 7}, Usage(12, 7)),
    ("cache read and write on top of input",
     {"input_tokens": 12, "output_tokens": 7, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 100},
     Usage(142, 7, 100, 30)),
    ("openai names keep their meaning", {"prompt_tokens": 10, "completion_tokens": 2,
                                         "prompt_tokens_details": {"cached_tokens": 4}}, Usage(10, 2, 4, 0)),
]


@pytest.mark.parametrize(("usage", "expected"), [u[1:] for u in USAGES], ids=[u[0] for u in USAGES])
def test_usage(usage: dict[str, Any], expected: Usage) -> None:
    assert find_usage(orjson.dumps({"id": "x", "usage": usage})) == expected


def test_stream_usage_from_first_and_last_events() -> None:
    start = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":5,'
             b'"cache_read_input_tokens":20,"cache_creation_input_tokens":0,"output_tokens":1}}}\n\n')
    head = messages_start_usage(start + b"event: ping\ndata: {}\n\n")
    assert head == Usage(25, 1, 20, 0)
    tail = b'data: {"type":"message_delta","usage":{"output_tokens":33}}\n\nevent: message_stop\n'
    assert messages_stream_usage(head, tail) == Usage(25, 33, 20, 0)
    assert messages_start_usage(b"data: {}") is None


ERRORS = [
    (InvalidRequestError("bad"), 400, "invalid_request_error"),
    (RateLimitError("slow down"), 429, "rate_limit_error"),
    (UpstreamStatusError(404, b'{"error": {"message": "no such model", "type": "invalid_request_error"}}'), 404,
     "not_found_error"),
]


@pytest.mark.parametrize(("exc", "status", "kind"), ERRORS, ids=["own", "limit", "openai-shaped upstream"])
def test_error_shape(exc: Any, status: int, kind: str) -> None:
    body = orjson.loads(anthropic_error(exc))
    assert exc.status == status and body["type"] == "error" and body["error"]["type"] == kind
    assert body["error"]["message"]


def test_anthropic_error_body_passes_as_it_came() -> None:
    raw = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert anthropic_error(UpstreamStatusError(529, raw)) == raw
    assert error_type_for(529) == "overloaded_error" and error_type_for(418) == "invalid_request_error"
    assert error_type_for(503) == "api_error"


# -- the other way: Chat Completions calls to a provider that speaks only Messages --------------------

CHAT_REQUESTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("defaults max_tokens", {"messages": USER}, {"messages": USER, "max_tokens": DEFAULT_MAX_TOKENS}),
    ("system, stop, user, sampling",
     {"messages": [{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}, *USER],
      "stop": "X", "user": "u", "temperature": 0.3, "max_completion_tokens": 9},
     {"system": "a\n\nb", "messages": USER, "stop_sequences": ["X"], "metadata": {"user_id": "u"},
      "temperature": 0.3, "max_tokens": 9}),
    ("image data url and url",
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,QQ=="}},
         {"type": "image_url", "image_url": {"url": "https://x/i.png"}}]}], "max_tokens": 5},
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "see"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": "QQ=="}},
         {"type": "image", "source": {"type": "url", "url": "https://x/i.png"}}]}], "max_tokens": 5}),
    ("tools and results, parallel off",
     {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
         {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "1"},
         {"role": "tool", "tool_call_id": "c2", "content": "2"}],
      "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": False, "max_tokens": 5},
     {"messages": [*USER, {"role": "assistant", "content": [
         {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
         {"type": "tool_use", "id": "c2", "name": "f", "input": {}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "1"},
                                      {"type": "tool_result", "tool_use_id": "c2", "content": "2"}]}],
      "tools": [{"name": "f", "input_schema": {"type": "object"}, "description": "d"}],
      "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True}, "max_tokens": 5}),
    ("reasoning_effort: a thinking budget, max_tokens kept above it, sampling left to Anthropic",
     {"messages": USER, "reasoning_effort": "high", "max_tokens": 1000, "temperature": 0.2, "top_p": 0.5},
     {"messages": USER, "thinking": {"type": "enabled", "budget_tokens": 4096}, "max_tokens": 5096}),
    ("reasoning_effort low, room enough", {"messages": USER, "reasoning_effort": "low", "max_tokens": 8000},
     {"messages": USER, "thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 8000}),
    ("reasoning_effort none: no thinking", {"messages": USER, "reasoning_effort": "none", "temperature": 0.2},
     {"messages": USER, "max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.2}),
    ("thinking passed as it is", {"messages": USER, "thinking": {"type": "enabled", "budget_tokens": 2000}},
     {"messages": USER, "thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": DEFAULT_MAX_TOKENS}),
    ("thinking disabled", {"messages": USER, "thinking": {"type": "disabled"}, "max_tokens": 5},
     {"messages": USER, "max_tokens": 5}),
    ("thinking blocks given back first, with their signatures; unsigned and bare reasoning left out",
     {"messages": [*USER, {"role": "assistant", "content": "calling", "reasoning_content": "let me see",
                           "thinking_blocks": [{"type": "thinking", "thinking": "let me see", "signature": "c2ln"},
                                               {"type": "thinking", "thinking": "unsigned"},
                                               {"type": "redacted_thinking", "data": "ZW5j"}],
                           "tool_calls": [{"id": "c1", "type": "function",
                                           "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "1"}],
      "reasoning_effort": "medium", "max_tokens": 5},
     {"messages": [*USER, {"role": "assistant", "content": [
         {"type": "thinking", "thinking": "let me see", "signature": "c2ln"},
         {"type": "redacted_thinking", "data": "ZW5j"}, {"type": "text", "text": "calling"},
         {"type": "tool_use", "id": "c1", "name": "f", "input": {}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "1"}]}],
      "thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 2053}),
]


@pytest.mark.parametrize(("chat", "expected"), [(c, e) for _, c, e in CHAT_REQUESTS],
                         ids=[n for n, _, _ in CHAT_REQUESTS])
def test_chat_request(chat: dict[str, Any], expected: dict[str, Any]) -> None:
    request = to_messages_request(chat)
    request.pop("model")
    assert request == expected


@pytest.mark.parametrize(("param", "chat"), [
    ("n", {"messages": USER, "n": 2}), ("logprobs", {"messages": USER, "logprobs": True}),
    ("response_format", {"messages": USER, "response_format": {"type": "json_object"}}),
    ("reasoning_effort", {"messages": USER, "reasoning_effort": "extreme"}),
    ("thinking.budget_tokens", {"messages": USER, "thinking": {"type": "enabled", "budget_tokens": 10}}),
    ("thinking", {"messages": USER, "thinking": "on"}),
    ("messages[0].content[0]", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
])
def test_chat_refused_names_the_field(param: str, chat: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        to_messages_request(chat)
    assert raised.value.param == param


def test_message_to_chat() -> None:
    message = {"id": "msg_1", "model": "claude", "stop_reason": "tool_use", "content": [
        {"type": "thinking", "thinking": "t"}, {"type": "text", "text": "ok"},
        {"type": "tool_use", "id": "tu", "name": "f", "input": {"a": 1}}],
        "usage": {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 10,
                  "cache_creation_input_tokens": 3}}
    chat = message_to_chat(message, 1)
    choice = chat["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "ok", "tool_calls": [
        {"id": "tu", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
        "reasoning_content": "t", "thinking_blocks": [{"type": "thinking", "thinking": "t"}]}
    assert choice["finish_reason"] == "tool_calls"
    assert chat["usage"]["prompt_tokens"] == 18 and chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 10
    assert find_usage(orjson.dumps(chat)) == Usage(18, 2, 10, 3)


def test_messages_stream_to_chat_chunks() -> None:
    def ev(data: dict[str, Any]) -> bytes:
        return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    stream = (ev({"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 4, "output_tokens": 1}}})
              + ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
              + ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}})
              + ev({"type": "content_block_start", "index": 1,
                    "content_block": {"type": "tool_use", "id": "tu", "name": "f", "input": {}}})
              + ev({"type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": "{}"}})
              + ev({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 6}})
              + ev({"type": "message_stop"}))
    translator = MessagesToChatStream("claude", 1, include_usage=True)
    out = b"".join(translator.feed(stream[i:i + 11]) for i in range(0, len(stream), 11))
    chunks = [orjson.loads(line[6:]) for line in out.split(b"\n\n") if line and line != b"data: [DONE]"]
    assert out.endswith(b"data: [DONE]\n\n")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[1] == {"content": "hi"}
    assert deltas[2]["tool_calls"][0]["id"] == "tu" and deltas[3]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["prompt_tokens"] == 4 and chunks[-1]["usage"]["completion_tokens"] == 6


def test_messages_error_event_becomes_openai_error() -> None:
    translator = MessagesToChatStream("claude", 1, include_usage=False)
    out = translator.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
                          b'"message":"busy"}}\n\n')
    assert orjson.loads(out[6:])["error"]["message"] == "busy" and b"[DONE]" not in out


def test_message_thinking_to_chat_with_signatures_and_redacted_blocks() -> None:
    message = {"id": "msg_1", "model": "claude", "stop_reason": "end_turn", "content": [
        {"type": "thinking", "thinking": "first, ", "signature": "c2ln"},
        {"type": "redacted_thinking", "data": "ZW5j"}, {"type": "text", "text": "done"}], "usage": {}}
    reply = message_to_chat(message, 1)["choices"][0]["message"]
    assert reply["content"] == "done" and reply["reasoning_content"] == "first, "
    assert reply["thinking_blocks"] == [{"type": "thinking", "thinking": "first, ", "signature": "c2ln"},
                                        {"type": "redacted_thinking", "data": "ZW5j"}]
    # the client gives the turn back as it got it: the blocks return to Anthropic as they came
    again = to_messages_request({"messages": [*USER, reply, {"role": "user", "content": "and?"}]})
    assert again["messages"][1]["content"][:2] == message["content"][:2]


def test_messages_stream_thinking_to_chat_deltas() -> None:
    def ev(data: dict[str, Any]) -> bytes:
        return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    stream = (ev({"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 4}}})
              + ev({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})
              + ev({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}})
              + ev({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "c2"}})
              + ev({"type": "content_block_start", "index": 1,
                    "content_block": {"type": "redacted_thinking", "data": "ZW5j"}})
              + ev({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}})
              + ev({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "hi"}})
              + ev({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 6}})
              + ev({"type": "message_stop"}))
    out = MessagesToChatStream("claude", 1, include_usage=False).feed(stream)
    deltas = [orjson.loads(line[6:])["choices"][0]["delta"] for line in out.split(b"\n\n")
              if line.startswith(b"data: {")]
    assert deltas[1] == {"reasoning_content": "hm", "thinking_blocks": [{"type": "thinking", "thinking": "hm"}]}
    assert deltas[2] == {"thinking_blocks": [{"type": "thinking", "thinking": "", "signature": "c2"}]}
    assert deltas[3] == {"thinking_blocks": [{"type": "redacted_thinking", "data": "ZW5j"}]}
    assert deltas[4] == {"content": "hi"}
