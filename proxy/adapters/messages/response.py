"""A Chat Completions answer as a Message: content blocks, the stop reason, the usage in Messages' terms."""

from __future__ import annotations

from typing import Any

import orjson

# finish_reason -> stop_reason
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                 "content_filter": "refusal"}


def stop_reason(finish_reason: Any) -> str:
    return _STOP_REASONS.get(finish_reason, "end_turn") if finish_reason else "end_turn"


def message_usage(usage: Any) -> dict[str, int]:
    """Chat usage in Messages' terms: `input_tokens` are those the cache did not serve."""
    if type(usage) is not dict:
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = usage.get("prompt_tokens") or 0
    details = usage.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") or 0) if type(details) is dict else 0
    out = {"input_tokens": max(prompt - cached, 0), "output_tokens": usage.get("completion_tokens") or 0}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def tool_input(arguments: Any) -> Any:
    """A tool call's arguments (a JSON string) as the `input` object of a tool_use block."""
    if type(arguments) is not str or not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw_arguments": arguments}  # not JSON: kept, not lost
    return parsed if type(parsed) is dict else {"value": parsed}


def chat_to_message(completion: dict[str, Any], request: dict[str, Any], message_id: str) -> dict[str, Any]:
    """The Message `request` would have had, from the chat `completion` that answered it."""
    choices = completion.get("choices")
    choice = choices[0] if type(choices) is list and choices and type(choices[0]) is dict else {}
    message = choice.get("message") if type(choice.get("message")) is dict else {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if type(text) is str and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "", "name": function.get("name") or "",
                        "input": tool_input(function.get("arguments"))})
    reason = stop_reason(choice.get("finish_reason"))
    if reason == "end_turn" and len(content) > (1 if text else 0):  # tool calls, whatever the provider said
        reason = "tool_use"
    return {"id": message_id, "type": "message", "role": "assistant",
            "model": completion.get("model") or request.get("model"), "content": content,
            "stop_reason": reason, "stop_sequence": None,
            "usage": message_usage(completion.get("usage"))}
