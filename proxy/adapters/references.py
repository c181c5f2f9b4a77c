"""The stored objects a routed request names in its body: files in content parts, a Responses
conversation, vector stores and a container in tools. Only the key that created an object may use it,
so the router checks these against the objects' owners before anything is sent.

Not read, because tiergate cannot know their owner and refusing them would refuse every use: a prompt
template's `prompt.id` (made in the provider's dashboard, its project's, never created through tiergate;
its `variables` are read: a file there is a file like any other) and an `item_reference`'s id (an item
of a stored response or conversation, made by the provider, input items included, which tiergate never
sees one by one). docs/security.md says so, and how a key's own `OpenAI-Project` closes it.

One reader serves every family: the fields are each family's own (Chat Completions' `{"type": "file",
"file": {"file_id"}}`, Responses' `input_file`/`input_image` `file_id`, `conversation` and
`tools[].vector_store_ids`/`container`, Messages' `source: {"type": "file", "file_id"}`), and a field a
family does not have is one `dict.get` that finds nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..outcome import Result

Reference = tuple[str, str]  # (the field, the object id it names)
_ANSWER_ID = re.compile(rb'"id"\s*:\s*"([^"]{1,256})"')  # the first id of a stream: its answer's


def stored_references(payload: dict[str, Any]) -> list[Reference]:
    """Every (field, id) of a stored object `payload` names; empty for most requests."""
    found: list[Reference] = []
    for field in ("messages", "input"):  # chat and Messages; Responses
        items = payload.get(field)
        if type(items) is list:
            for item in items:
                if type(item) is dict:
                    _item(item, found)
    conversation = payload.get("conversation")  # Responses: an id, or {"id": ...}
    if type(conversation) is dict:
        conversation = conversation.get("id")
    if type(conversation) is str:
        found.append(("conversation", conversation))
    prompt = payload.get("prompt")  # Responses: a prompt template, its variables maybe input_file/input_image parts
    if type(prompt) is dict and type(prompt.get("variables")) is dict:
        for value in prompt["variables"].values():
            if type(value) is dict:
                _part(value, found)
    tools = payload.get("tools")
    if type(tools) is list:
        for tool in tools:
            if type(tool) is dict and ("vector_store_ids" in tool or "container" in tool):
                _tool(tool, found)
    return found


def _item(item: dict[str, Any], found: list[Reference]) -> None:
    """A message (its content parts) or a Responses input item (itself a part, or holding parts)."""
    content = item.get("content")
    if type(content) is list:
        for part in content:
            if type(part) is dict:
                _part(part, found)
                inner = part.get("content")  # a Messages tool_result holds parts of its own
                if type(inner) is list:
                    for nested in inner:
                        if type(nested) is dict:
                            _part(nested, found)
    else:
        _part(item, found)


def _part(part: dict[str, Any], found: list[Reference]) -> None:
    file_id = part.get("file_id")  # Responses input_file / input_image
    if type(file_id) is str:
        found.append(("file_id", file_id))
    for holder in ("file", "source"):  # chat's `file` part; Messages' document/image `source`
        inner = part.get(holder)
        if type(inner) is dict:
            file_id = inner.get("file_id")
            if type(file_id) is str:
                found.append(("file_id", file_id))


def _tool(tool: dict[str, Any], found: list[Reference]) -> None:
    stores = tool.get("vector_store_ids")  # file_search
    if type(stores) is list:
        found.extend(("vector_store_ids", s) for s in stores if type(s) is str)
    container = tool.get("container")  # code_interpreter: a container's id, or {"file_ids": [...]}
    if type(container) is str:
        found.append(("container", container))
    elif type(container) is dict and type(container.get("file_ids")) is list:
        found.extend(("file_ids", f) for f in container["file_ids"] if type(f) is str)



def stored_answer_id(result: Result) -> str | None:
    """The id of an answer the provider stores (a chat call with `store: true`): from the parsed answer,
    or a stream's first event."""
    data = result.data
    if type(data) is dict:
        found = data.get("id")
        return found if type(found) is str else None
    state = result.stream_state
    head = state.head if state is not None else None
    if head:
        match = _ANSWER_ID.search(head)
        if match is not None:
            return match[1].decode("utf-8", "replace")
    return None
