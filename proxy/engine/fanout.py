"""Shared streams: one upstream stream relayed to every identical request in flight at once.

The first request starts the upstream call in a task of its own; every identical request that comes
while the stream runs subscribes to it and receives the chunks already relayed, then the live ones.
The chunks are kept in one list for the stream's length (a late subscriber starts at its beginning,
and a complete stream is stored in the cache as the completion it adds up to); each subscriber only
holds its position in that list, so the upstream never waits for a reader and a slow reader never
slows the others. A subscriber further behind than `max_lag` bytes is cut with an SSE error event
(code `stream_subscriber_too_slow`) rather than holding the stream's memory for it; for the same
reason a request arriving once the stream has relayed more than `max_lag` bytes starts its own call.
A subscriber that leaves never stops the upstream while another reads; the upstream is cancelled
when the last one has left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..outcome import Result, StreamState
from ..protocol.sse import UsageFilter
from .dispatch import stream_error_event


class SharedStream:
    """One upstream stream and its subscribers."""

    def __init__(self, call: Callable[[], Awaitable[Result]], *, max_lag: int,
                 on_complete: Callable[[Result, list[bytes]], Awaitable[None]] | None = None,
                 on_end: Callable[[SharedStream], None] | None = None):
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = False
        self.max_lag = max_lag
        self.subscribers = 0
        self.result: Result | None = None
        self._more = asyncio.Event()
        self._on_complete = on_complete
        self._on_end = on_end
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[Result] = loop.create_future()
        self.ready.add_done_callback(_retrieve)
        self.task = loop.create_task(self._pump(call))

    @property
    def joinable(self) -> bool:
        """A newcomer can still get the whole stream: not ended, not cancelled, not too far along."""
        return not self.ended and not self.task.done() and self.size <= self.max_lag

    async def _pump(self, call: Callable[[], Awaitable[Result]]) -> None:
        try:
            try:
                result = await call()
            except BaseException as exc:
                if not self.ready.done():
                    if isinstance(exc, asyncio.CancelledError):
                        self.ready.cancel()
                    else:
                        self.ready.set_exception(exc)
                raise
            self.result = result
            self.ready.set_result(result)
            stream = result.stream
            if stream is None:
                return
            try:
                async for chunk in stream:
                    self.chunks.append(chunk)
                    self.size += len(chunk)
                    self._wake()
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]
            state = result.stream_state
            # stored before the subscribers see the end: a client's next identical request finds it
            if self._on_complete is not None and state is not None and state.completed:
                await self._on_complete(result, self.chunks)
        finally:
            self.ended = True
            self._wake()
            if self._on_end is not None:
                self._on_end(self)

    def _wake(self) -> None:
        more, self._more = self._more, asyncio.Event()
        more.set()

    def subscribe(self) -> Subscriber:
        self.subscribers += 1
        return Subscriber(self)

    def left(self) -> None:
        self.subscribers -= 1
        if self.subscribers <= 0 and not self.task.done():
            self.task.cancel()  # nobody reads any more: stop the upstream


class Subscriber:
    """One request's view of a shared stream: an async iterator of the bytes its client receives."""

    def __init__(self, shared: SharedStream):
        self.shared = shared
        self.index = 0
        self.position = 0  # bytes of the shared stream this subscriber has passed
        self.state = StreamState()
        self.usage: UsageFilter | None = None
        self.closed = False

    async def result(self, *, leader: bool, client_usage: bool) -> Result:
        """The leader's Result for this subscriber (raises the upstream call's error)."""
        try:
            base = await asyncio.shield(self.shared.ready)
        except BaseException:
            self._leave()
            raise
        if base.usage_requested and not client_usage:
            self.usage = UsageFilter()  # the usage event was asked for someone else: not for this client
        self.state.request_bytes = base.stream_state.request_bytes if base.stream_state is not None else 0
        return Result(200, base.ref, base.attempts if leader else [], stream=self,
                      content_type=base.content_type,
                      first_byte_at=base.first_byte_at if leader else time.perf_counter(),
                      stream_state=self.state, tries=base.tries if leader else 0, headers=base.headers)

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> bytes:
        shared = self.shared
        while not self.closed:
            chunks = shared.chunks
            if self.index >= len(chunks):
                if shared.ended:
                    self._finish()
                    rest = self.usage.flush() if self.usage is not None else b""
                    if rest:
                        return rest
                    break
                await shared._more.wait()
                continue
            if shared.size - self.position > shared.max_lag:  # too far behind: cut, never slow the others
                self.state.error = "subscriber_too_slow"
                self._leave()
                return stream_error_event("this client read the stream too slowly to keep up with it",
                                          code="stream_subscriber_too_slow", error_type="server_error")
            chunk = chunks[self.index]
            self.index += 1
            self.position += len(chunk)
            self.state.chunks += 1
            self.state.bytes += len(chunk)
            if self.usage is not None:
                chunk = self.usage.feed(chunk)
                if not chunk:
                    continue
            return chunk
        raise StopAsyncIteration

    def _finish(self) -> None:
        """The shared stream ended and this subscriber read all of it: it ended as the upstream did."""
        upstream = self.shared.result.stream_state if self.shared.result is not None else None
        if upstream is not None:
            self.state.completed = upstream.completed
            self.state.error = upstream.error
        self._leave()

    def _leave(self) -> None:
        if self.closed:
            return
        self.closed = True
        upstream = self.shared.result.stream_state if self.shared.result is not None else None
        if upstream is not None:
            self.state.tail = upstream.tail  # the usage event, for the request's telemetry
        self.shared.left()

    async def aclose(self) -> None:
        self._leave()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """A failure nobody awaited any more is not an 'exception never retrieved' warning."""
    if not future.cancelled():
        future.exception()
