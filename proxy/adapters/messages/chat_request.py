"""A Chat Completions request as a Messages request (for a provider that speaks only Messages), or a 400
naming what Messages cannot honour (several choices, log probabilities, JSON modes, audio).

Extended thinking, as OpenAI-compatible gateways carry it in chat: `reasoning_effort` (or a `thinking`
object passed as it is) turns on Anthropic's `thinking` with a token budget, and an assistant turn's
`thinking_blocks` (with their signatures, which Anthropic requires back with tool use) go first in that
turn's content."""

from __future__ import annotations

from typing import Any

import orjson

from ...types import InvalidRequestError

# Messages requires max_tokens; a chat client may send none
DEFAULT_MAX_TOKENS = 4096
# chat fields with no Messages equivalent that change what the answer is: refused, naming the field
_REFUSED = {"logprobs": "log probabilities", "top_logprobs": "log probabilities", "logit_bias": "logit_bias",
            "audio": "audio output", "prediction": "predicted outputs",
            "functions": "legacy functions (send tools)", "function_call": "legacy function_call (send tool_choice)"}
# `reasoning_effort` as a thinking budget (Anthropic's least is 1024 tokens), as LiteLLM maps it
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter", "pause_turn": "stop"}


def _refuse(what: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} cannot be translated to Anthropic's Messages API", param=param,
                               code="untranslatable_field")


def finish_reason(stop_reason: Any) -> str:
    return _FINISH.get(stop_reason, "stop") if stop_reason else "stop"


def to_messages_request(chat: dict[str, Any]) -> dict[str, Any]:
    """The Messages request that asks what `chat` (Chat Completions) asks."""
    _check_refused(chat)
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(chat["messages"]):
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content"), f"messages[{i}].content"))
        elif role == "tool":
            result = {"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                      "content": _text(message.get("content"), f"messages[{i}].content")}
            if messages and messages[-1]["role"] == "user" and _all_results(messages[-1]["content"]):
                messages[-1]["content"].append(result)  # the answers to one turn's calls go together
            else:
                messages.append({"role": "user", "content": [result]})
        elif role == "assistant":
            messages.append(_assistant(message))
        elif role == "user":
            messages.append({"role": "user", "content": _user(message.get("content"), f"messages[{i}].content")})
        else:
            raise InvalidRequestError(f"messages[{i}].role: {role!r} has no Messages equivalent",
                                      param=f"messages[{i}].role")
    out: dict[str, Any] = {"model": chat.get("model"), "messages": messages,
                           "max_tokens": chat.get("max_completion_tokens") or chat.get("max_tokens")
                           or DEFAULT_MAX_TOKENS}
    if system:
        out["system"] = "\n\n".join(system)
    thinking = _thinking(chat, out)
    for name in ("temperature", "top_p", "stream"):
        # with thinking on, Anthropic takes only its own sampling (temperature 1): a route's or client's
        # temperature would make every such call a 400
        if chat.get(name) is not None and (thinking is None or name == "stream"):
            out[name] = chat[name]
    stop = chat.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if isinstance(chat.get("user"), str):
        out["metadata"] = {"user_id": chat["user"]}
    if chat.get("tools"):
        out["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(chat["tools"])]
    choice = _tool_choice(chat.get("tool_choice"), chat.get("parallel_tool_calls"))
    if choice is not None and out.get("tools"):
        out["tool_choice"] = choice
    return out


def _thinking(chat: dict[str, Any], out: dict[str, Any]) -> dict[str, Any] | None:
    """Anthropic's `thinking` for the chat call (None: off), put in `out` with `max_tokens` raised above its
    budget where needed (Anthropic counts thinking inside `max_tokens` and requires the budget below it: the
    client's answer budget is kept on top of the thinking)."""
    thinking = chat.get("thinking")
    effort = chat.get("reasoning_effort")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
            raise InvalidRequestError("'thinking' must be an object whose type is 'enabled' or 'disabled'",
                                      param="thinking")
        if thinking["type"] == "disabled":
            return None
        budget = thinking.get("budget_tokens")
        if type(budget) is not int or budget < 1024:
            raise InvalidRequestError("thinking.budget_tokens: must be an integer of at least 1024",
                                      param="thinking.budget_tokens")
        thinking = {"type": "enabled", "budget_tokens": budget}
    elif effort is not None and effort != "none":
        budget = THINKING_BUDGETS.get(effort) if isinstance(effort, str) else None
        if budget is None:
            raise InvalidRequestError(f"reasoning_effort: {effort!r} is not one of none, "
                                      f"{', '.join(THINKING_BUDGETS)}", param="reasoning_effort")
        thinking = {"type": "enabled", "budget_tokens": budget}
    else:
        return None
    out["thinking"] = thinking
    if out["max_tokens"] <= thinking["budget_tokens"]:
        out["max_tokens"] += thinking["budget_tokens"]
    return thinking


def _check_refused(chat: dict[str, Any]) -> None:
    for name, what in _REFUSED.items():
        if chat.get(name) not in (None, False):
            raise _refuse(what, name)
    if chat.get("n") not in (None, 1):
        raise _refuse("more than one choice (n)", "n")
    fmt = chat.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise _refuse(f"response_format {fmt.get('type')!r}", "response_format")
    modalities = chat.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise _refuse("output modalities other than text", "modalities")


def _all_results(content: Any) -> bool:
    return isinstance(content, list) and all(b.get("type") == "tool_result" for b in content)


def _text(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequestError(f"{param}[{i}]: only text parts are accepted here", param=f"{param}[{i}]")
            parts.append(str(part.get("text", "")))
        return "\n\n".join(parts)
    raise InvalidRequestError(f"{param}: must be a string or an array of parts", param=param)


def _user(content: Any, param: str) -> Any:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequestError(f"{param}: must be a string or an array of parts", param=param)
    blocks = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            blocks.append({"type": "image", "source": _image_source(url)})
        elif kind == "file" and str((part.get("file") or {}).get("file_data", "")).startswith("data:application/pdf"):
            data = part["file"]["file_data"].partition(",")[2]
            blocks.append({"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                          "data": data}})
        else:
            raise _refuse(f"a content part of type {kind!r}", f"{param}[{i}]")
    return blocks


def _image_source(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        return {"type": "base64", "media_type": head[5:].split(";")[0] or "image/png", "data": data}
    return {"type": "url", "url": url}


def _assistant(message: dict[str, Any]) -> dict[str, Any]:
    blocks = _thinking_blocks(message.get("thinking_blocks"))
    text = message.get("content")
    if text:
        blocks.append({"type": "text", "text": _text(text, "content")})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {"_raw_arguments": function.get("arguments")}
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                       "input": arguments if isinstance(arguments, dict) else {"value": arguments}})
    return {"role": "assistant", "content": blocks or ""}


def _thinking_blocks(given: Any) -> list[dict[str, Any]]:
    """An assistant turn's thinking as the client gave it back (`thinking_blocks`, as tiergate answered them):
    sent back first in the turn, signatures and redacted data as they were. A block without its signature
    is left out (Anthropic refuses one it cannot verify); so is chat's bare `reasoning_content`."""
    blocks: list[dict[str, Any]] = []
    for block in given if isinstance(given, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "thinking" and isinstance(block.get("signature"), str) and block["signature"]:
            blocks.append({"type": "thinking", "thinking": str(block.get("thinking") or ""),
                           "signature": block["signature"]})
        elif block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str):
            blocks.append({"type": "redacted_thinking", "data": block["data"]})
    return blocks


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise _refuse("a tool other than a function", param)
    function = tool["function"]
    out = {"name": function.get("name"), "input_schema": function.get("parameters") or {"type": "object"}}
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise InvalidRequestError("tool_choice: must be auto, required, none or a function", param="tool_choice")
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out
