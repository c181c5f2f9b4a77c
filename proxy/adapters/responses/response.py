"""A chat completion as a Response object (the shape of `openai.types.responses.Response`)."""

from __future__ import annotations

import base64
from typing import Any

import orjson

# chat finish_reason -> (Response status, incomplete_details.reason)
_FINISH = {"length": ("incomplete", "max_output_tokens"), "content_filter": ("incomplete", "content_filter")}


def response_skeleton(request: dict[str, Any], response_id: str, created_at: float, model: str,
                      status: str = "in_progress") -> dict[str, Any]:
    """The Response object's fields that echo the request; `output` and `usage` are filled in later.
    Keys in OpenAI's order, `usage` last (metrics read it from the tail of a body or stream)."""
    text = request.get("text") if isinstance(request.get("text"), dict) else None
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": (reasoning or {}).get("summary")},
        "service_tier": request.get("service_tier"),
        "store": False,  # translated answers are not stored anywhere: they cannot be retrieved
        "temperature": request.get("temperature"),
        "text": {"format": (text or {}).get("format") or {"type": "text"}},
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
        "usage": None,
    }


def translate_usage(usage: Any) -> dict[str, Any] | None:
    """Chat usage (`prompt_tokens`, `completion_tokens`, details) in the Responses API's names."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage, "prompt_tokens")
    completion = _count(usage, "completion_tokens")
    prompt_details = usage.get("prompt_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    completion_details = usage.get("completion_tokens_details")
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _count(prompt_details, "cached_tokens"),
                                 "cache_write_tokens": _count(prompt_details, "cache_write_tokens")},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": _count(completion_details, "reasoning_tokens")},
        "total_tokens": _count(usage, "total_tokens") or prompt + completion,
    }


def _count(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    return value if type(value) is int and value >= 0 else 0


def message_item(item_id: str, text: str, status: str = "completed", refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append(output_text_part(text))
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "arguments": arguments,
            "call_id": call_id, "name": name}


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    """A chat answer's reasoning (`reasoning_content`) as a Responses `reasoning` item: the text both as its
    content and as its summary (what Responses clients show of a model's reasoning; Claude's thinking is
    itself a summary)."""
    return {"id": item_id, "type": "reasoning", "summary": reasoning_summary(text),
            "content": [{"type": "reasoning_text", "text": text}]}


def reasoning_summary(text: str) -> list[dict[str, str]]:
    return [{"type": "summary_text", "text": text}] if text else []


_THINKING = "tiergate-thinking:"  # what tiergate's own encrypted_content starts with


def thinking_content(blocks: list[dict[str, Any]]) -> str | None:
    """A chat answer's `thinking_blocks` (Claude's, with their signatures) as a reasoning item's
    `encrypted_content`: opaque to the client, which gives the item back as input so that the blocks
    reach Claude again (it requires them back with tool use). None when no block can be given back."""
    kept = [b for b in blocks if isinstance(b, dict) and (b.get("signature") or b.get("type") == "redacted_thinking")]
    if not kept:
        return None
    return _THINKING + base64.urlsafe_b64encode(orjson.dumps(kept)).decode()


def thinking_from(encrypted: Any) -> list[dict[str, Any]] | None:
    """The thinking blocks in an input reasoning item's `encrypted_content`, when tiergate wrote it."""
    if not isinstance(encrypted, str) or not encrypted.startswith(_THINKING):
        return None
    try:
        blocks = orjson.loads(base64.urlsafe_b64decode(encrypted[len(_THINKING):]))
    except (ValueError, orjson.JSONDecodeError):
        return None
    return [b for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else None


def finish_status(finish_reason: Any) -> tuple[str, dict[str, str] | None]:
    status, reason = _FINISH.get(finish_reason, ("completed", None)) if isinstance(finish_reason, str) \
        else ("completed", None)
    return status, ({"reason": reason} if reason else None)


def chat_to_response(chat: Any, request: dict[str, Any], response_id: str) -> dict[str, Any]:
    """The Response object for chat completion `chat` (parsed), answering Responses request `request`."""
    if not isinstance(chat, dict):
        chat = {}
    created = chat.get("created") if isinstance(chat.get("created"), (int, float)) else 0
    response = response_skeleton(request, response_id, created, str(chat.get("model") or request.get("model")),
                                 "completed")
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    output: list[dict[str, Any]] = []
    suffix = response_id.removeprefix("resp_")
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    encrypted = thinking_content(message["thinking_blocks"]) if isinstance(message.get("thinking_blocks"), list) \
        else None
    if isinstance(reasoning, str) and reasoning or encrypted is not None:
        item = reasoning_item(f"rs_{suffix}", reasoning if isinstance(reasoning, str) else "")
        if encrypted is not None:
            item["encrypted_content"] = encrypted
        output.append(item)
    content = message.get("content")
    refusal = message.get("refusal")
    if isinstance(content, str) and content or isinstance(refusal, str) and refusal:
        output.append(message_item(f"msg_{suffix}", content if isinstance(content, str) else "",
                                   refusal=refusal if isinstance(refusal, str) else None))
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        output.append(function_call_item(f"fc_{suffix}_{i}", str(call.get("id") or f"call_{suffix}_{i}"),
                                         str(function.get("name") or ""), str(function.get("arguments") or "")))
    if not output:  # an empty answer is still a message (the SDK's output_text reads "")
        output.append(message_item(f"msg_{suffix}", ""))
    status, incomplete = finish_status(choice.get("finish_reason"))
    response["status"] = status
    response["incomplete_details"] = incomplete
    response["output"] = output
    response["usage"] = translate_usage(chat.get("usage"))
    return response
