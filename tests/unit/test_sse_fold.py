"""`fold` reads a long stream a part at a time into what `partial` reads of it whole: the answer a
recovery continues is the same whichever way it was read."""

from __future__ import annotations

import orjson
import pytest

from proxy.protocol.sse import Partial, fold, partial


def event(delta: dict, *, index: int = 0, finish: str | None = None, **extra) -> bytes:
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
           "choices": [{"index": index, "delta": delta, "finish_reason": finish}], **extra}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


PLAIN = [event({"content": f'w{i} "q\\" \u00e9 \n'}) for i in range(30)]
STREAMS = {
    "plain": [event({"role": "assistant", "content": ""})] + PLAIN,
    "content null": [event({"role": "assistant"})] + PLAIN + [event({"content": None})] + PLAIN,
    "finished": [event({"role": "assistant"})] + PLAIN + [event({}, finish="stop")],
    "tool call": [event({"role": "assistant"})] + PLAIN + [
        event({"tool_calls": [{"index": 0, "function": {"arguments": '{"content":"x"}'}}]})],
    "second choice": [event({"role": "assistant"})] + PLAIN + [event({"content": "other"}, index=1)] + PLAIN,
    "refusal": [event({"role": "assistant"})] + PLAIN + [event({"refusal": "no"})],
    "refusal null": [event({"role": "assistant"})] + [event({"content": "a", "refusal": None})] + PLAIN,
    "spaced": [event({"role": "assistant"})] + PLAIN + [b'data: {"id": "x", "choices": [{"index": 0, "delta": '
                                                          b'{"content": "spaced"}, "finish_reason": null}]}\n\n'],
    "usage null": [event({"role": "assistant"})] + [event({"content": "u"}, usage=None) for _ in range(5)],
}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("part", [1, 3, 7])
def test_a_stream_folded_in_parts_reads_as_it_does_whole(name, part):
    events = STREAMS[name]
    whole = partial(events)
    folded: Partial | None = None
    for at in range(0, len(events), part):
        folded = fold(b"".join(events[at:at + part]), folded)
    assert folded is not None
    assert (folded.text, folded.id, folded.model, folded.created, folded.role_sent, folded.finished,
            folded.tool_call, folded.other_choices, folded.error) == (
        whole.text, whole.id, whole.model, whole.created, whole.role_sent, whole.finished, whole.tool_call,
        whole.other_choices, whole.error)
