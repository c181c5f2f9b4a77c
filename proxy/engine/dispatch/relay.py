"""Relaying an upstream stream to the client, chunk by chunk as it arrives.

The stream is complete only when the provider's final event came; a break, an idle timeout or an end
without it ends the client's stream with an SSE error event (the OpenAI SDK raises it), never with a
clean end that looks complete. One exception: a Chat Completions or Completions stream whose body ended
cleanly after every choice's `finish_reason` (and the usage event, when asked for) lacked only
`data: [DONE]`; tiergate ends it with `[DONE]` itself, as the answer is whole. A chat stream passes on
whole events at a time, and an event that is neither JSON nor `[DONE]` breaks it like a cut connection:
it is not relayed, and the stream ends with the error event (`upstream_malformed`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from ...adapters.base import DONE, stream_error_event
from ...protocol.sse import WholeEvents, finished, first_malformed
from .classify import CONNECTION_ERRORS

if TYPE_CHECKING:
    from ...outcome import StreamState
    from ...protocol.sse import UsageFilter
    from ...types import ModelRef
    from ..breaker import AsyncCircuitBreaker
    from ..providers import UpstreamResponse


_CHAT_DONE = (DONE,)  # the final event of Chat Completions and Completions streams
DONE_EVENT = DONE + b"\n\n"
_WHAT = {"incomplete": "ended before its final event", "malformed": "sent an event that is not JSON"}


class Incomplete(Exception):
    """The upstream stream ended cleanly but without its final event."""


class Malformed(Exception):
    """The upstream chat stream sent an event that is neither JSON nor `[DONE]`."""


async def relay(resp: UpstreamResponse, first: bytes, ref: ModelRef, breaker: AsyncCircuitBreaker,
                state: StreamState, done: tuple[bytes, ...], usage: UsageFilter | None = None,
                error_event: Callable[..., bytes] = stream_error_event) -> AsyncIterator[bytes]:
    """Yield upstream chunks as they arrive, filling in `state`. `usage` takes out the usage event
    tiergate asked for (whole events pass, an event split across reads waits for its end);
    `error_event` is the stream's API's own error event (its endpoint's `stream_error`), which ends
    a stream that breaks."""
    # a chat stream (`[DONE]` its only final event) may be whole without it; a typed stream may not
    single = done[0] if len(done) == 1 else None
    # a chat stream is checked event by event, so it passes on whole events (a split one waits for its end)
    events = WholeEvents() if done == _CHAT_DONE else None
    clean = False
    ended = False
    try:
        chunk = first
        while chunk:
            state.chunks += 1
            state.bytes += len(chunk)
            state.tail = (state.tail + chunk)[-4096:]
            if not ended:
                if single is not None:
                    ended = single in chunk
                else:  # a loop, not any(...): a generator per chunk would cost a typed stream more than chat's check
                    for marker in done:
                        if marker in chunk:
                            ended = True
                            break
            if events is not None and not (chunk.endswith(b"}\n\n") and chunk.startswith(b"data: {")
                                           and chunk.find(b"\n") == len(chunk) - 2 and not events.carry):
                # not the usual read (one whole event, one `data:` line holding an object): a closer look
                chunk = events.feed(chunk)
                bad = first_malformed(chunk)
                if bad >= 0:
                    out = chunk[:bad] if usage is None else usage.feed(chunk[:bad])  # the sound events before it
                    if out:
                        yield out
                    raise Malformed
            out = chunk if usage is None else usage.feed(chunk)
            if out:
                yield out
            chunk = await resp.content.readany()
        whole = ended or any(marker in state.tail for marker in done)
        if not whole and (done != _CHAT_DONE or not finished(state.tail, usage_asked=usage is not None)):
            raise Incomplete
        rest = events.flush() if events is not None else b""
        if usage is not None and (rest or usage.carry):
            rest = usage.feed(rest) + usage.flush()
        if rest:
            yield rest
        if not whole:
            yield DONE_EVENT  # the answer was whole: the end the provider left out
        clean = True
        state.completed = True
        breaker.record_success()
    except (TimeoutError, Incomplete, Malformed, *CONNECTION_ERRORS) as exc:
        cause = ("timeout" if isinstance(exc, TimeoutError) else
                 "incomplete" if isinstance(exc, Incomplete) else
                 "malformed" if isinstance(exc, Malformed) else "connection")
        state.error = cause
        breaker.record_failure(cause)
        what = _WHAT.get(cause) or f"broke off ({cause})"
        yield error_event(f"the upstream stream from {ref} {what} after {state.chunks} chunks",
                          code=f"upstream_{cause}")
    finally:
        if clean:
            resp.release()
        else:
            breaker.release_trial()
            resp.close()
