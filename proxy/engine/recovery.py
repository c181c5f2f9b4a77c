"""Recovery mid-answer (on by default; a route's `stream_recovery: off` turns it off): a stream that
breaks after content was relayed and before its final chunk is continued by the route's next candidate,
so the client reads one unbroken answer.

The next candidate gets the original request plus the text relayed so far as the assistant's message,
through its `continuation` (its fallback entry's, else the table's `model_rules`, else its provider's):
`prefix` (`"prefix": true` on that message, as DeepSeek and Mistral take it), `continue_final_message`
(vLLM), `instruction` (a user message asking to go on where the answer stopped), or `none` (never
asked). Candidates that prefill (`prefix`, `continue_final_message`) are preferred to those that take an
instruction; one that refuses the prefill with a 400 is asked by instruction instead. An instructed
continuation is checked before any of it is relayed (joining.py): the part that repeats the relayed
text is dropped, and one that restarts the answer differently is refused. Only the continuation is
relayed: its leading role chunk is dropped and its `id`, `model` and `created` are rewritten to what
the client already received.

What it cannot guarantee: the continuation is another model's (or another call's) text, so its style
may differ, and an instructed model may rephrase rather than repeat; `max_tokens` applies to the
continuation afresh; the broken attempt's own tokens are not charged. Never attempted in the middle of
a tool call, a refusal, a structured (`json_schema`) output or several choices, nor after the final
chunk, nor with no candidate able to continue, nor past KEEP_TEXT characters of answer (what a stream
keeps for a recovery is bounded): those end with the original SSE error event, as without recovery.
At most one recovery per stream; a continuation that breaks, or is refused, ends with an error event,
never with `[DONE]`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ..planner.plan import Candidate, Plan
from ..protocol.sse import Partial, fold, partial, split_events
from ..types import ModelRef, Route, TiergateError
from .joining import JoinCheck

if TYPE_CHECKING:
    from ..outcome import Result, StreamState
    from .dispatch import AttemptLoop, Call

CONTINUE_INSTRUCTION = ("Your previous answer was cut off. Continue it exactly where it stopped, without "
                        "repeating anything and without any preamble.")
OUTCOMES = ("recovered", "failed", "refused_tool_call", "refused_structured", "refused_finished",
            "refused_choices", "refused_join", "refused_long", "no_candidate")
# What recovery keeps of a stream: the events as they came up to KEEP_EVENTS bytes (most answers: nothing
# is read from them unless the stream breaks), then read into the answer's text (an event is ~30 times
# its text), which is given up past KEEP_TEXT characters (~64k tokens): such a stream, broken, ends with
# its error event. A stream holds at most about both.
KEEP_EVENTS = 32 * 1024
KEEP_TEXT = 256 * 1024
PREFILLS = ("prefix", "continue_final_message")  # continue the assistant's message itself
_ERROR_EVENT = b'data: {"error"'  # a provider's error event (in content it would be escaped: \"error\")
_ROLE_ONLY = re.compile(rb'"delta"\s*:\s*\{\s*"role"\s*:\s*"assistant"\s*(,\s*"content"\s*:\s*(""|null)\s*)?'
                        rb'(,\s*"refusal"\s*:\s*null\s*)?\}')


class StreamRecovery:
    """Wraps a recoverable route's stream; counts recoveries by outcome."""

    def __init__(self, loop: AttemptLoop):
        self.loop = loop
        self.outcomes: Counter[str] = Counter()

    def wrap(self, result: Result, call: Call) -> AsyncIterator[bytes]:
        assert result.stream is not None and result.stream_state is not None
        return self._relay(result.stream, result.stream_state, result.ref,
                           call.narrowed(call.plan, payload=dict(call.payload)))

    async def _relay(self, inner: AsyncIterator[bytes], state: StreamState, ref: ModelRef,
                     call: Call) -> AsyncIterator[bytes]:
        relayed: list[bytes] = []  # the events relayed since the last fold, as they came
        size = 0  # their bytes; -1: the answer outgrew what recovery keeps, so nothing is kept
        folded: Partial | None = None  # the events before them, read into the answer's text
        broke: bytes | None = None
        try:
            async for chunk in inner:
                if state.error is not None:  # the relay's error event: the stream broke
                    broke = chunk
                    break
                if _ERROR_EVENT in chunk:  # the provider's error event mid-stream: withheld, a break
                    at = chunk.index(_ERROR_EVENT)
                    if at == 0 or chunk[:at].endswith(b"\n"):  # at an event's start
                        if at:
                            relayed.append(chunk[:at])
                            yield chunk[:at]
                        state.error = "error_event"
                        broke = chunk[at:]
                        break
                if size >= 0:
                    relayed.append(chunk)
                    size += len(chunk)
                    if size > KEEP_EVENTS:
                        folded, size = _fold(relayed, folded)
                yield chunk
        finally:
            await inner.aclose()  # type: ignore[attr-defined]
            if broke is None:
                # ended, or the client left: a client that leaves leaves this frame in a reference cycle
                # (its cancellation's traceback), so what it holds is freed now, not at a full collection
                relayed.clear()
                folded = None
                chunk = b""
        if broke is None:
            return
        so_far = partial(relayed, folded) if size >= 0 else None
        relayed.clear()
        folded = None
        outcome = "refused_long" if so_far is None else self._refusal(call.payload, so_far)
        after = call.plan.after(ref)
        found = self._continuation(after) if outcome is None else None
        if found is None:
            self._count(state, outcome or "no_candidate")
            yield broke
            return
        async for chunk in self._continued(call, after, *found, so_far, state, broke):
            yield chunk

    async def _continued(self, call: Call, after: Plan, plan: Plan, mode: str, so_far: Any, state: StreamState,
                         broke: bytes) -> AsyncIterator[bytes]:
        """The next candidate's continuation of the answer, relayed as the rest of the same stream."""
        try:
            second, mode = await self._second(call, after, plan, mode, so_far.text)
        except TiergateError:
            self._count(state, "failed")
            yield broke
            return
        rewrite = _Rewrite(so_far.id, so_far.model, so_far.created, drop_role=so_far.role_sent)
        join = JoinCheck(so_far.text) if mode == "instruction" and so_far.text else None
        inner2, state2 = second.stream, second.stream_state
        assert inner2 is not None and state2 is not None
        try:
            async for chunk in inner2:
                if state2.error is not None:  # the continuation broke too: its error event ends it
                    rest = rewrite.flush()
                    yield (join.finish(rest) if join is not None else rest) + chunk
                    continue
                out = rewrite.feed(chunk)
                if join is not None:
                    out = join.feed(out)
                    if join.refused:
                        break
                if out:
                    yield out
            else:
                rest = rewrite.flush()
                if join is not None:
                    rest = join.finish(rest)
                if rest:
                    yield rest
        finally:
            await inner2.aclose()  # type: ignore[attr-defined]
            refused = join is not None and join.refused
            if refused:  # a second answer, not the rest of the first: none of it was relayed
                self._count(state, "refused_join")
            else:
                self._settle(state, second.ref, state2)
        if refused and state2.error is None:
            yield broke

    async def _second(self, call: Call, after: Plan, plan: Plan, mode: str, text: str) -> tuple[Result, str]:
        """The continuation's stream and the way it was asked for. A model that refuses a prefill with a
        400 (OpenAI's models answer an assistant message last so) is asked again by instruction, whose
        join is checked, with the candidates that take one."""
        try:
            body = continuation_payload(call.payload, text, mode)
            return await self.loop.run(call.narrowed(plan, payload=body, timeout=None, recover=False)), mode
        except TiergateError as exc:
            if mode not in PREFILLS or exc.status != 400 or not text:
                raise
            instructed = Plan(after.name, after.route, tuple(c for c in after.candidates
                                                               if self._mode(c, after.route) not in (None, "none")))
            if not instructed.candidates:
                raise
        body = continuation_payload(call.payload, text, "instruction")
        return await self.loop.run(call.narrowed(instructed, payload=body, timeout=None, recover=False)), "instruction"

    def _settle(self, state: StreamState, by: ModelRef, state2: StreamState) -> None:
        """The stream's state after a continuation: the continuation's end is the stream's."""
        state.recovered_by = str(by)
        state.bytes += state2.bytes
        state.chunks += state2.chunks
        state.tail = state2.tail  # the continuation's usage event
        state.request_bytes = state2.request_bytes
        if state2.completed:
            state.error = None
            state.completed = True
            self._count(state, "recovered")
        else:
            state.error = state2.error or state.error
            self._count(state, "failed")

    def _continuation(self, after: Plan) -> tuple[Plan, str] | None:
        """The candidates after the one that broke that continue an answer the same way, and that way:
        the first that prefills and those like it, else those that take an instruction; None when no
        candidate may continue it."""
        capable = [(c, mode) for c in after.candidates if (mode := self._mode(c, after.route)) not in (None, "none")]
        if not capable:
            return None
        mode = next((m for _, m in capable if m in PREFILLS), capable[0][1])
        return Plan(after.name, after.route, tuple(c for c, m in capable if m == mode)), mode  # type: ignore[return-value]

    def _mode(self, candidate: Candidate, route: Route | None) -> str | None:
        """How `candidate` continues an answer: as the route's fallback entry says, else its model rule's
        `continuation`, else its provider's."""
        if route is not None and route.continuations:
            for ref, mode in route.continuations:
                if ref == candidate.ref:
                    return mode
        rule = candidate.rule
        if rule is not None and rule.continuation is not None:
            return rule.continuation
        provider = self.loop.providers.get(candidate.ref.provider)
        return provider.spec.continuation if provider is not None else None

    @staticmethod
    def _refusal(payload: dict[str, Any], so_far: Any) -> str | None:
        """Why this stream may not be continued, or None."""
        response_format = payload.get("response_format")
        if type(response_format) is dict and response_format.get("type") in ("json_schema", "json_object"):
            return "refused_structured"
        if so_far.tool_call or so_far.error:
            return "refused_tool_call"
        if so_far.other_choices:
            return "refused_choices"
        if so_far.finished:
            return "refused_finished"
        return None

    def _count(self, state: StreamState, outcome: str) -> None:
        state.recovery = outcome
        self.outcomes[outcome] += 1

    def stats(self) -> dict[str, int]:
        return dict(self.outcomes)


def _fold(relayed: list[bytes], folded: Partial | None) -> tuple[Partial | None, int]:
    """The complete events of `relayed` read into `folded`; `relayed` keeps only an event not ended yet.
    Returns the reading and the bytes still kept, or (None, -1) when the answer is longer than recovery
    keeps."""
    events, rest = split_events(b"".join(relayed))
    relayed.clear()
    folded = fold(events, folded)
    if len(folded.text) > KEEP_TEXT:
        return None, -1
    if rest:
        relayed.append(rest)
    return folded, len(rest)


def continuation_payload(payload: dict[str, Any], text: str, mode: str) -> dict[str, Any]:
    """The original request plus the partial answer, in the provider's way of continuing one."""
    messages = list(payload.get("messages") or ())
    body = {k: v for k, v in payload.items() if k not in ("n",)}
    if text:
        if mode == "prefix":
            messages.append({"role": "assistant", "content": text, "prefix": True})
        elif mode == "continue_final_message":
            messages.append({"role": "assistant", "content": text})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        else:
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": CONTINUE_INSTRUCTION}]
    body["messages"] = messages
    return body


class _Rewrite:
    """The continuation's events as the client's stream: its leading role chunk dropped, its id, model
    and created those the client already received (whole events at a time; bytes replaced, not
    re-serialised)."""

    def __init__(self, id: Any, model: Any, created: Any, *, drop_role: bool):
        self.target = (id, model, created)
        self.replace: list[tuple[bytes, bytes]] | None = None
        self.drop_role = drop_role
        self.carry = b""

    def feed(self, chunk: bytes) -> bytes:
        events, self.carry = split_events(self.carry + chunk)
        if not events:
            return b""
        if self.replace is None:
            self.replace = self._replacements(events)
        if self.drop_role:
            events = self._drop_role(events)
        for old, new in self.replace:
            events = events.replace(old, new)
        return events

    def flush(self) -> bytes:
        rest, self.carry = self.carry, b""
        return rest

    def _replacements(self, events: bytes) -> list[tuple[bytes, bytes]]:
        first = next((line[5:].strip() for line in events.splitlines() if line.startswith(b"data:")), b"")
        try:
            obj = orjson.loads(first)
        except orjson.JSONDecodeError:
            return []
        out = []
        if type(obj) is dict:
            for key, want in zip(("id", "model", "created"), self.target, strict=True):
                have = obj.get(key)
                if want is not None and have is not None and have != want:
                    out.append((b'"' + key.encode() + b'":' + orjson.dumps(have),
                                b'"' + key.encode() + b'":' + orjson.dumps(want)))
        return out

    def _drop_role(self, events: bytes) -> bytes:
        """Drop the continuation's first event when it only opens the assistant's message."""
        self.drop_role = False
        head, sep, rest = events.partition(b"\n\n")
        if _ROLE_ONLY.search(head) and b'"finish_reason":"' not in head:
            return rest
        return events
