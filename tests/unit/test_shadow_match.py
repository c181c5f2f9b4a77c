"""Comparing a shadow's answer with the primary's: exact text, else the same finish reason and a length
within 20%; what cannot be compared is `unknown`."""

from __future__ import annotations

import orjson

from proxy.engine.shadow_match import Answer, compare, of_body, of_stream


def body(text: str | None, reason: str = "stop") -> bytes:
    message = {"role": "assistant", "content": text}
    return orjson.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": message,
                                                                    "finish_reason": reason}]})


def stream(text: str, reason: str = "stop") -> list[bytes]:
    chunks = [b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n']
    chunks += [b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}) + b"\n\n"
               for w in text.split(" ")]
    chunks.append(b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
                  + b"\n\ndata: [DONE]\n\n")
    return chunks


def test_answers_are_read_from_bodies_and_streams():
    assert of_body(body("hello there"), 2) == Answer("hello there", "stop", 2)
    assert of_stream(stream("hello there", "length")) == Answer("hellothere", "length", None)
    assert of_body(b"not json") == Answer(None, None, None)
    assert of_stream([b": keep-alive\n\n"]) == Answer(None, None, None)


def test_the_same_text_is_exact_whatever_else_differs():
    assert compare(of_body(body("same")), of_stream(stream("same"))) == "exact"


def test_free_text_is_similar_with_the_same_finish_reason_and_a_length_within_a_fifth():
    assert compare(Answer("a" * 100, "stop"), Answer("b" * 81, "stop")) == "similar"
    assert compare(Answer("a" * 100, "stop"), Answer("b" * 79, "stop")) == "different"
    assert compare(Answer("a" * 100, "stop"), Answer("b" * 100, "length")) == "different"


def test_without_text_the_output_tokens_are_compared():
    assert compare(Answer(None, "tool_calls", 50), Answer(None, "tool_calls", 45)) == "similar"
    assert compare(Answer("", "tool_calls", 50), Answer("", "tool_calls", 20)) == "different"


def test_what_cannot_be_compared_is_unknown():
    assert compare(Answer(None, None, None), Answer("x", "stop", 1)) == "unknown"
    assert compare(Answer(None, "stop", None), Answer(None, "stop", 3)) == "unknown"
