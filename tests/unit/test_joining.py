"""How an instructed continuation joins the answer already relayed: its repeat of the relayed text is
cut out, a restart that departs from the answer is refused, and a true continuation passes unchanged."""

from __future__ import annotations

import orjson
import pytest

from proxy.engine.joining import JoinCheck


def events(pieces: list[str]) -> list[bytes]:
    out = [b"data: " + orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": p},
                                                              "finish_reason": None}]}) + b"\n\n" for p in pieces]
    out.append(b"data: " + orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
               + b"\n\ndata: [DONE]\n\n")
    return out


def joined(relayed: str, pieces: list[str]) -> str | None:
    """The answer the client reads, or None when the continuation is refused."""
    check = JoinCheck(relayed)
    out = b""
    for event in events(pieces):
        out += check.feed(event)
        if check.refused:
            return None
    out += check.finish()
    if check.refused:
        return None
    assert out.endswith(b"data: [DONE]\n\n")
    text = ""
    for event in out.split(b"\n\n"):
        if event.startswith(b"data: {"):
            text += orjson.loads(event[6:])["choices"][0]["delta"].get("content", "")
    return relayed + text


def words(text: str) -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]


@pytest.mark.parametrize(("relayed", "continuation", "answer"), [
    ("one two three", " four five", "one two three four five"),                   # a true continuation
    ("one two three", "one two three four five", "one two three four five"),      # restarted: cut
    ("one two three", "three four five", "one two three four five"),              # the last word again
    ("one two three", "two three four", "one two three four"),                    # the last words again
    ("one two thr", "three four", "one two three four"),                          # a cut word written whole
    ("one two", "one two three", "one two three"),
    ("one two ", "two three", "one two three"),                                   # no doubled space
    ("one two three", "", "one two three"),                                       # nothing more to say
])
def test_the_overlap_is_cut_out(relayed, continuation, answer):
    assert joined(relayed, words(continuation) if continuation else []) == answer


@pytest.mark.parametrize(("relayed", "continuation"), [
    ("one two three four", "one two three for five"),  # a restart that departs: a second answer
    ("one two three four", "one two"),                 # a restart that stops short
])
def test_a_second_answer_is_refused(relayed, continuation):
    assert joined(relayed, words(continuation)) is None


def test_the_continuation_is_held_only_until_the_join_is_known():
    check = JoinCheck("one two three")
    first, second, *_ = events([" four", " five"])
    assert check.feed(first) == first  # a new word: nothing it could repeat
    assert check.feed(second) == second
