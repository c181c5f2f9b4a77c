"""A Responses API request as a Chat Completions request.

Every field is mapped, passed on unchanged (fields both APIs share, and fields tiergate does not
know: the provider decides), dropped where it only concerns the Responses API's own bookkeeping
(`store`, `include`, `truncation`, `metadata`), or refused with a 400 when a chat-only provider
cannot honour it (built-in tools, server-side state, background runs).
"""

from __future__ import annotations

from typing import Any

from ...types import InvalidRequestError
from .response import thinking_from

# Responses-only fields that describe bookkeeping on the Responses side; a chat call has no use for them
_DROPPED = frozenset({"store", "include", "truncation", "metadata", "instructions", "input", "text",
                      "reasoning", "max_output_tokens", "tools", "tool_choice", "stream", "top_logprobs",
                      "stream_options", "model"})
# fields that need state or machinery only a Responses provider has
_REFUSED = {
    "previous_response_id": "continues a response stored at a Responses API provider",
    "conversation": "continues a conversation stored at a Responses API provider",
    "background": "runs in the background at a Responses API provider",
    "prompt": "names a prompt template stored at a Responses API provider",
    "max_tool_calls": "limits built-in tool calls, which Chat Completions does not make",
}
_CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_BUILTIN_CALLS = frozenset({"web_search_call", "file_search_call", "computer_call", "computer_call_output",
                            "code_interpreter_call", "image_generation_call", "local_shell_call",
                            "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call",
                            "apply_patch_call_output", "mcp_call", "mcp_list_tools", "mcp_approval_request",
                            "mcp_approval_response", "custom_tool_call", "custom_tool_call_output",
                            "tool_search_call", "tool_search_output"})
_WHY = "a provider that serves only Chat Completions"


def _refuse(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"{message}; {_WHY} cannot do that (route this call to a provider "
                               "that serves the Responses API)", param=param, code="unsupported_for_chat_provider")


def to_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request for a Responses request `body` (not modified). Raises InvalidRequestError
    naming the field that a chat-only provider cannot honour. `model` is left for the caller."""
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, False):
            raise _refuse(f"'{name}' {why}", name)
    chat: dict[str, Any] = {k: v for k, v in body.items() if k not in _DROPPED and k not in _REFUSED}
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    elif isinstance(instructions, list):
        messages.extend(_input_messages(instructions, "instructions"))
    elif instructions is not None:
        raise InvalidRequestError("'instructions' must be a string or a list of input items",
                                  param="instructions")
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list):
        messages.extend(_input_messages(raw, "input"))
    elif raw is not None:
        raise InvalidRequestError("'input' must be a string or a list of input items", param="input")
    if not messages:
        raise InvalidRequestError("'input' is required: a string or a list of input items", param="input")
    chat["messages"] = messages

    tools = body.get("tools")
    if tools:
        chat["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    text = body.get("text")
    if isinstance(text, dict):
        fmt = text.get("format")
        if fmt is not None:
            response_format = _response_format(fmt)
            if response_format is not None:
                chat["response_format"] = response_format
        if text.get("verbosity") is not None:
            chat["verbosity"] = text["verbosity"]
    elif text is not None:
        raise InvalidRequestError("'text' must be an object", param="text")
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    elif reasoning is not None:
        raise InvalidRequestError("'reasoning' must be an object", param="reasoning")
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]  # the name every chat server knows
    if body.get("top_logprobs"):
        chat["logprobs"] = True
        chat["top_logprobs"] = body["top_logprobs"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # the Responses stream ends with usage
    return chat


def _input_messages(items: list[Any], where: str) -> list[dict[str, Any]]:
    """Input items as chat messages: consecutive function calls join the assistant message before them."""
    out: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] | None = None  # a reasoning item's thinking blocks, for the turn after it
    for i, item in enumerate(items):
        param = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"'{param}' must be an object", param=param)
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"
        if not isinstance(kind, str):
            raise InvalidRequestError(f"'{param}.type' must be a string", param=f"{param}.type")
        if kind == "message":
            out.append(_message(item, param))
            if thinking is not None and out[-1]["role"] == "assistant":
                out[-1]["thinking_blocks"], thinking = thinking, None
        elif kind == "function_call":
            call = {"id": _str(item, "call_id", param), "type": "function",
                    "function": {"name": _str(item, "name", param), "arguments": item.get("arguments") or ""}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_call_id" not in last:
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if thinking is not None:
                    out[-1]["thinking_blocks"], thinking = thinking, None
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _str(item, "call_id", param),
                        "content": _tool_output(item.get("output"), param)})
        elif kind == "reasoning":
            # the model's own earlier reasoning: Chat Completions has no place for it, except Claude's
            # thinking blocks (which tiergate gave as its encrypted_content), sent back with the turn after it
            thinking = thinking_from(item.get("encrypted_content"))
        elif kind == "item_reference":
            raise _refuse(f"'{param}' refers to an item stored at a Responses API provider", param)
        elif kind in _BUILTIN_CALLS:
            raise _refuse(f"'{param}' is a {kind} item of a built-in tool", param)
        else:
            raise InvalidRequestError(f"'{param}' has an unknown item type {kind!r}", param=param)
    return out


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    raw_role = item.get("role")
    role = _CHAT_ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        raise InvalidRequestError(f"'{param}.role' must be one of user, assistant, system, developer",
                                  param=f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequestError(f"'{param}.content' must be a string or a list of content parts",
                                  param=f"{param}.content")
    if role != "user":
        # assistant and system content is text (many chat servers accept nothing else there)
        texts, refusals = [], []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text", "text"):
                texts.append(str(part.get("text", "")))
            elif kind == "refusal":
                refusals.append(str(part.get("refusal", "")))
            else:
                raise InvalidRequestError(f"'{param}.content[{j}]': a {role} message holds text parts only",
                                          param=f"{param}.content[{j}]")
        message: dict[str, Any] = {"role": role, "content": "".join(texts)}
        if refusals and role == "assistant":
            message["refusal"] = "".join(refusals)
        return message
    return {"role": role, "content": [_user_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]}


def _user_part(part: Any, param: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidRequestError(f"'{param}' must be an object", param=param)
    kind = part.get("type")
    if kind in ("input_text", "text", "output_text"):
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            if part.get("file_id"):
                raise _refuse(f"'{param}' names an uploaded file by id", param)
            raise InvalidRequestError(f"'{param}.image_url' is required", param=f"{param}.image_url")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file: dict[str, Any] = {}
        for key in ("file_data", "file_id", "filename"):
            if part.get(key) is not None:
                file[key] = part[key]
        if part.get("file_url") is not None:
            raise _refuse(f"'{param}' names a file by URL", param)
        if not file.get("file_data") and not file.get("file_id"):
            raise InvalidRequestError(f"'{param}' needs file_data or file_id", param=param)
        return {"type": "file", "file": file}
    if kind == "input_audio":
        audio = part.get("input_audio") or {"data": part.get("data"), "format": part.get("format")}
        return {"type": "input_audio", "input_audio": audio}
    raise InvalidRequestError(f"'{param}' has an unknown content type {kind!r}", param=param)


def _tool_output(output: Any, param: str) -> str | list[dict[str, Any]]:
    if isinstance(output, str):
        return output
    if isinstance(output, list):  # content parts: text goes as text, anything else is refused
        texts = []
        for j, part in enumerate(output):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise _refuse(f"'{param}.output[{j}]' is not text", f"{param}.output[{j}]")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise InvalidRequestError(f"'{param}.output' must be a string or a list of content parts",
                              param=f"{param}.output")


def _tool(tool: Any, i: int) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise InvalidRequestError(f"'{param}' must be an object", param=param)
    kind = tool.get("type")
    if kind != "function":
        raise _refuse(f"'{param}' is a {kind!r} tool, a built-in tool of the Responses API", param)
    function: dict[str, Any] = {"name": _str(tool, "name", param)}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice  # auto, none, required
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            return {"type": "function", "function": {"name": _str(choice, "name", "tool_choice")}}
        raise _refuse(f"'tool_choice' of type {kind!r} names a built-in tool or tool set", "tool_choice")
    raise InvalidRequestError("'tool_choice' must be a string or an object", param="tool_choice")


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict):
        raise InvalidRequestError("'text.format' must be an object", param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None  # the chat default
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema: dict[str, Any] = {"name": _str(fmt, "name", "text.format")}
        for key in ("schema", "strict", "description"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequestError(f"'text.format.type' {kind!r} is not text, json_object or json_schema",
                              param="text.format.type")


def _str(obj: dict[str, Any], key: str, param: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"'{param}.{key}' must be a non-empty string", param=f"{param}.{key}")
    return value
