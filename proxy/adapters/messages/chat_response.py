"""A Message as a Chat Completions answer: the text, tool calls, finish reason and usage in chat's terms."""

from __future__ import annotations

from typing import Any

import orjson

from .chat_request import finish_reason


def chat_usage(usage: Any) -> dict[str, Any]:
    """Messages usage in chat's terms: the prompt counts the cached input too (read and written)."""
    if not isinstance(usage, dict):
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    read = usage.get("cache_read_input_tokens") or 0
    write = usage.get("cache_creation_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + read + write
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": read, "cache_creation_tokens": write}}


def thinking_block(block: dict[str, Any]) -> dict[str, Any] | None:
    """A `thinking` / `redacted_thinking` content block as chat's `thinking_blocks` carry it (LiteLLM's shape:
    the block as Anthropic gave it, signature or redacted data included), so a client can send it back."""
    kind = block.get("type")
    if kind == "thinking":
        found = {"type": "thinking", "thinking": str(block.get("thinking") or "")}
        if block.get("signature") is not None:
            found["signature"] = block["signature"]
        return found
    if kind == "redacted_thinking":
        return {"type": "redacted_thinking", "data": block.get("data")}
    return None


def message_to_chat(message: dict[str, Any], created: int) -> dict[str, Any]:
    """The chat completion a Message answers. Its thinking comes as OpenAI-compatible gateways give it:
    the text in `reasoning_content`, the blocks (with their signatures) in `thinking_blocks`."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        else:
            found = thinking_block(block)
            if found is not None:
                thinking.append(found)
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        reply["tool_calls"] = calls
    if thinking:
        reply["reasoning_content"] = "".join(b.get("thinking", "") for b in thinking)
        reply["thinking_blocks"] = thinking
    return {"id": "chatcmpl-" + str(message.get("id") or ""), "object": "chat.completion", "created": created,
            "model": message.get("model"),
            "choices": [{"index": 0, "message": reply, "finish_reason": finish_reason(message.get("stop_reason")),
                         "logprobs": None}],
            "usage": chat_usage(message.get("usage"))}
