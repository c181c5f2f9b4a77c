"""The stored objects a routed body names, per family (adapters/references.py), table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.adapters.references import stored_references

CASES: list[tuple[str, dict[str, Any], list[tuple[str, str]]]] = [
    ("plain chat", {"messages": [{"role": "user", "content": "hi"}]}, []),
    ("chat file part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "read"}, {"type": "file", "file": {"file_id": "file-1"}}]}]},
     [("file_id", "file-1")]),
    ("chat file part with inline data only", {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": "data:...", "filename": "a.pdf"}}]}]}, []),
    ("responses input_file in a message", {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-2"}, {"type": "input_image", "file_id": "file-3"}]}]},
     [("file_id", "file-2"), ("file_id", "file-3")]),
    ("responses input item that is a part", {"input": [{"type": "input_file", "file_id": "file-4"}]},
     [("file_id", "file-4")]),
    ("responses string input", {"input": "hi"}, []),
    ("responses conversation id", {"input": "hi", "conversation": "conv_1"}, [("conversation", "conv_1")]),
    ("responses conversation object", {"conversation": {"id": "conv_2"}}, [("conversation", "conv_2")]),
    ("file_search tool", {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1", "vs_2"]}]},
     [("vector_store_ids", "vs_1"), ("vector_store_ids", "vs_2")]),
    ("code_interpreter container id", {"tools": [{"type": "code_interpreter", "container": "cntr_1"}]},
     [("container", "cntr_1")]),
    ("code_interpreter auto container", {"tools": [{"type": "code_interpreter",
                                                    "container": {"type": "auto", "file_ids": ["file-5"]}}]},
     [("file_ids", "file-5")]),
    ("function tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, []),
    ("messages document from a file", {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "file_011"}}]}]}, [("file_id", "file_011")]),
    ("messages image as base64", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "..."}}]}]}, []),
    ("messages tool_result holding a document", {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "document", "source": {"type": "file", "file_id": "file_012"}}]}]}]},
     [("file_id", "file_012")]),
    ("responses prompt variables holding files", {"prompt": {"id": "pmpt_1", "version": "2", "variables": {
        "doc": {"type": "input_file", "file_id": "file-6"}, "photo": {"type": "input_image", "file_id": "file-7"},
        "name": "plain text"}}}, [("file_id", "file-6"), ("file_id", "file-7")]),
    # the provider project's template and a stored response's item: owners tiergate cannot know, not read
    ("responses prompt id alone", {"prompt": {"id": "pmpt_1"}, "input": "hi"}, []),
    ("responses item_reference", {"input": [{"type": "item_reference", "id": "msg_1"},
                                            {"role": "user", "content": "next"}]}, []),
    ("prompt and variables of wrong types", {"prompt": "pmpt_1"}, []),
    ("wrong types are no references", {"messages": "x", "input": 3, "conversation": 5, "tools": {"a": 1}}, []),
    ("ids that are not strings", {"messages": [{"content": [{"type": "file", "file": {"file_id": 7}}]}]}, []),
]


@pytest.mark.parametrize(("payload", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stored_references(payload: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert stored_references(payload) == expected
