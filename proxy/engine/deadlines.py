"""Deadlines of upstream attempts, kept by one timer instead of one per attempt.

aiohttp's `ClientTimeout(total=...)` arms a timer per request and wraps every read of the answer in
a timer context; `asyncio.timeout` arms one too. On a proxy whose every request makes an attempt,
that bookkeeping costs more than the rest of the attempt loop. Here an attempt's deadline goes
into the bucket of the deadlines that fall within the same `RESOLUTION` of loop time (a bucket is
dropped when its last attempt ends); one timer, set for the earliest bucket, cancels the tasks of
the buckets that have run out. The task turns that cancellation into `TimeoutError`, as
`asyncio.timeout` does. The same buckets also hold calls due at a time (`call_at`: the hedge of an
answer whose first byte is late) and let a deadline be brought forward to now (`expire_now`).
A deadline fires up to `RESOLUTION` (plus the loop's lag) late, and at most a millisecond early
(the loop's clock may tick in milliseconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

RESOLUTION = 0.01  # seconds: how late a deadline may fire (the deadlines of one bucket fire together)
_PER_SECOND = 1 / RESOLUTION
_EARLY = 0.001 * _PER_SECOND  # a bucket whose end is this close is due (the loop's clock ticks in ms)
_EXPIRED_MAX = 1024  # tasks remembered as cancelled by a deadline before they saw it
_MESSAGE = "tiergate: the attempt's deadline passed"

try:  # the running task of a known loop, without asyncio.current_task()'s get_running_loop(): CPython
    # 3.11 checks the process id there, a getpid() system call on every call
    from asyncio.tasks import _current_tasks

    _task_of = _current_tasks.get
except ImportError:  # pragma: no cover - a Python that keeps the current task elsewhere
    def _task_of(loop: asyncio.AbstractEventLoop) -> asyncio.Task[object] | None:
        return None


class Deadlines:
    """Cancels a task whose armed deadline passes before it is disarmed; `expired()` tells the task,
    when it catches the cancellation, that it was its deadline."""

    __slots__ = ("_loop", "_buckets", "_timer", "_timer_at", "_expired")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        # bucket number (its end, in RESOLUTIONs of loop time) -> the tasks whose deadline falls in it, each
        # with what its `cancelling()` was when armed (another cancel, such as a client that left, stays a
        # cancel); or a key of `call_at` with its function
        self._buckets: dict[int, dict[Any, Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0  # the bucket the timer is set for
        # tasks cancelled by their deadline (with `cancelling()` as it was when armed)
        self._expired: dict[asyncio.Task[object], int] = {}

    def current_task(self) -> asyncio.Task[object] | None:
        """The task running now (the one `arm` cancels)."""
        task = _task_of(self._loop) if self._loop is not None else None
        return task if task is not None else asyncio.current_task()

    def arm(self, task: asyncio.Task[object], seconds: float) -> int:
        """Cancel `task` once `seconds` have passed, unless `disarm` comes first; returns the bucket
        that `disarm` takes."""
        loop = task.get_loop()
        if loop is not self._loop:  # the first attempt, or a library user's new event loop
            self._restart(loop)
        return self._place(loop, task, task.cancelling(), seconds)

    def call_at(self, key: object, seconds: float, call: Callable[[], object]) -> int:
        """Call `call` once `seconds` have passed, unless `disarm(key, ...)` comes first."""
        if self._loop is None:
            raise RuntimeError("call_at before any arm(): no loop yet")
        return self._place(self._loop, key, call, seconds)

    def _place(self, loop: asyncio.AbstractEventLoop, key: object, value: object, seconds: float) -> int:
        """Put `key` in the bucket `seconds` from now (its end: never before the deadline)."""
        number = int((loop.time() + seconds) * _PER_SECOND) + 1
        bucket = self._buckets.get(number)
        if bucket is None:
            bucket = self._buckets[number] = {}
            if self._timer is None or number < self._timer_at:
                self._schedule(number)
        bucket[key] = value
        return number

    def expire_now(self, task: asyncio.Task[object], number: int) -> bool:
        """Bring an armed deadline forward to now (the attempt is no longer wanted); False when it was
        disarmed or had fired already."""
        bucket = self._buckets.get(number)
        if bucket is None or task not in bucket:
            return False
        cancelling = bucket.pop(task)
        if not bucket:
            del self._buckets[number]
        self._expired[task] = cancelling
        task.cancel(_MESSAGE)
        return True

    def disarm(self, task: object, number: int) -> None:
        """The attempt ended in time (or otherwise): its deadline no longer applies."""
        bucket = self._buckets.get(number)
        if bucket is not None:  # else it fired already
            bucket.pop(task, None)
            if not bucket:
                del self._buckets[number]

    def expired(self, task: asyncio.Task[object]) -> bool:
        """Whether the CancelledError that `task` caught was its deadline and nothing else; then the
        cancellation is taken back and the caller raises TimeoutError instead."""
        before = self._expired.pop(task, None)
        if before is None:
            return False
        return task.uncancel() <= before

    def pending(self) -> int:
        """Attempts with a deadline armed now."""
        return sum(map(len, self._buckets.values()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buckets.clear()
        self._expired.clear()

    def _restart(self, loop: asyncio.AbstractEventLoop) -> None:
        self.close()
        self._loop = loop

    def _schedule(self, number: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = number
        self._timer = self._loop.call_at(number * RESOLUTION, self._fire)  # type: ignore[union-attr]

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time() * _PER_SECOND + _EARLY  # type: ignore[union-attr]
        buckets = self._buckets
        expired = self._expired
        if len(expired) > _EXPIRED_MAX:  # tasks that ended without looking (none should): forget them
            for task in [t for t in expired if t.done()]:
                del expired[task]
        for number in [n for n in buckets if n <= now]:
            for task, cancelling in buckets.pop(number).items():
                if type(cancelling) is not int:  # a call_at
                    cancelling()
                elif not task.done():
                    expired[task] = cancelling
                    task.cancel(_MESSAGE)
        if buckets:  # the live buckets are few (attempts in flight share them): min() is cheap
            self._schedule(min(buckets))
