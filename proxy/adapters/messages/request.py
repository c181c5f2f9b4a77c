"""A Messages request as a Chat Completions request, or a 400 naming what has no honest translation
(extended thinking, server tools, MCP servers, a document chat cannot carry)."""

from __future__ import annotations

from typing import Any

import orjson

from ...types import InvalidRequestError

# Messages fields that are sent on under the same name and meaning
_SAME = ("max_tokens", "temperature", "top_p", "top_k", "stream")
# fields no chat provider can honour: refused, so the client learns rather than gets another answer
_REFUSED = {"mcp_servers": "MCP servers", "container": "a code-execution container"}


def _refuse(what: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} cannot be translated to Chat Completions", param=param,
                               code="untranslatable_field")


def to_chat_request(request: dict[str, Any]) -> dict[str, Any]:
    """The Chat Completions request that asks what `request` (Messages) asks."""
    for name, what in _REFUSED.items():
        if request.get(name):
            raise _refuse(what, name)
    thinking = request.get("thinking")
    if type(thinking) is dict and thinking.get("type") not in (None, "disabled"):
        raise _refuse("extended thinking", "thinking")
    chat: dict[str, Any] = {"model": request.get("model")}
    messages = _system(request.get("system"))
    for i, message in enumerate(request["messages"]):
        messages += _message(message, f"messages.{i}")
    chat["messages"] = messages
    for name in _SAME:
        if request.get(name) is not None:
            chat[name] = request[name]
    if request.get("stream") is True:
        chat["stream_options"] = {"include_usage": True}  # the usage Messages' last events carry
    stop = request.get("stop_sequences")
    if stop:
        chat["stop"] = stop
    metadata = request.get("metadata")
    if type(metadata) is dict and type(metadata.get("user_id")) is str:
        chat["user"] = metadata["user_id"]
    if request.get("tools"):
        chat["tools"] = [_tool(tool, f"tools.{i}") for i, tool in enumerate(request["tools"])]
    if request.get("tool_choice") is not None:
        _tool_choice(request["tool_choice"], chat)
    return chat


def _text_of(blocks: Any, param: str) -> str:
    """Text blocks as one string (a cache_control marker has no meaning to a chat provider)."""
    if type(blocks) is str:
        return blocks
    parts = []
    for i, block in enumerate(blocks):
        if type(block) is not dict or block.get("type") != "text" or type(block.get("text")) is not str:
            raise InvalidRequestError(f"{param}.{i}: only text blocks are accepted here", param=f"{param}.{i}")
        parts.append(block["text"])
    return "\n\n".join(parts)


def _system(system: Any) -> list[dict[str, Any]]:
    if not system:
        return []
    return [{"role": "system", "content": _text_of(system, "system")}]


def _message(message: dict[str, Any], param: str) -> list[dict[str, Any]]:
    """One Messages message as chat messages: a user turn's tool results become `tool` messages (first,
    as they answer the assistant's calls just before), an assistant turn's tool_use blocks `tool_calls`."""
    role, content = message["role"], message["content"]
    if type(content) is str:
        return [{"role": role, "content": content}]
    if role == "assistant":
        return [_assistant(content, param)]
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        where = f"{param}.content.{i}"
        kind = block.get("type") if type(block) is dict else None
        if kind == "tool_result":
            tools.append(_tool_result(block, where))
        else:
            parts.append(_user_part(block, kind, where))
    out = tools
    if parts:
        plain = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "\n\n".join(p["text"] for p in parts) if plain else parts})
    return out


def _user_part(block: Any, kind: Any, where: str) -> dict[str, Any]:
    if kind == "text" and type(block.get("text")) is str:
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _source_url(block.get("source"), where)}}
    if kind == "document":
        return _document(block.get("source"), where)
    raise _refuse(f"a content block of type {kind!r}", where)


def _source_url(source: Any, where: str) -> str:
    if type(source) is dict and source.get("type") == "base64" and type(source.get("data")) is str:
        return f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
    if type(source) is dict and source.get("type") == "url" and type(source.get("url")) is str:
        return source["url"]
    raise _refuse("an image source other than base64 or url", f"{where}.source")


def _document(source: Any, where: str) -> dict[str, Any]:
    """A plain-text document as text, a base64 PDF as a chat `file` part; others have no chat form."""
    if type(source) is dict and source.get("type") == "text" and type(source.get("data")) is str:
        return {"type": "text", "text": source["data"]}
    if type(source) is dict and source.get("type") == "base64" and source.get("media_type") == "application/pdf":
        return {"type": "file", "file": {"filename": "document.pdf",
                                         "file_data": f"data:application/pdf;base64,{source.get('data')}"}}
    raise _refuse("a document other than plain text or a base64 PDF", f"{where}.source")


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content")
    text = "" if content is None else _text_of(content, f"{where}.content")
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}


def _assistant(content: list[Any], param: str) -> dict[str, Any]:
    """Text and tool calls; thinking blocks stay behind (a chat provider can neither read nor verify them)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        kind = block.get("type") if type(block) is dict else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):
            raise _refuse(f"a content block of type {kind!r}", f"{param}.content.{i}")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if type(tool) is not dict or tool.get("type") not in (None, "custom") or type(tool.get("name")) is not str:
        kind = tool.get("type") if type(tool) is dict else None
        raise _refuse(f"the server tool {kind!r}", param)
    function: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if type(choice) is dict else None
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and type(choice.get("name")) is str:
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise InvalidRequestError("tool_choice: type must be auto, any, tool (with a name) or none",
                                  param="tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False
