"""The hedge of a slow non-stream attempt: the rest of the plan, started alongside it once its first
byte (its response headers) is later than its first-byte budget.

The slow attempt is not cut: whichever answers first is the answer. If the rest answers first, the
slow attempt's deadline is brought forward to now; if the slow attempt fails, the rest decides; if it
answers, the rest is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ...outcome import tried
from ...types import TiergateError

if TYPE_CHECKING:
    from ...outcome import Attempt, Result
    from ..deadlines import Deadlines


class Hedge:
    __slots__ = ("_deadlines", "_start", "task", "_primary", "_watch")

    def __init__(self, deadlines: Deadlines, start: Callable[[], Awaitable[Result]]):
        self._deadlines = deadlines
        self._start = start
        self.task: asyncio.Task[Result] | None = None
        self._primary: tuple[asyncio.Task[object], int] | None = None  # the slow attempt's task and deadline
        self._watch: int | None = None

    def watch(self, task: asyncio.Task[object], armed: int, first_byte: float) -> None:
        self._primary = (task, armed)
        self._watch = self._deadlines.call_at(self, first_byte, self._begin)

    def unwatch(self) -> None:
        if self._watch is not None:
            self._deadlines.disarm(self, self._watch)
            self._watch = None

    def _begin(self) -> None:
        self._watch = None
        if self.task is None and self._primary is not None:
            self.task = self._primary[0].get_loop().create_task(self._run())

    async def _run(self) -> Result:
        result = await self._start()
        primary = self._primary
        if primary is not None:  # still waiting: it gives way
            self._deadlines.expire_now(*primary)
        return result

    def settle(self) -> None:
        """The slow attempt ended (answered, or the request is over): the rest is not needed."""
        self._primary = None
        self.unwatch()
        task = self.task
        if task is not None:
            if task.done():
                if not task.cancelled():
                    task.exception()  # seen: a failure of the rest is no "never retrieved" warning
            else:
                task.cancel()

    async def join(self, attempts: list[Attempt]) -> Result:
        """The slow attempt failed or gave way: the answer (or the error) is the rest's."""
        self._primary = None
        assert self.task is not None
        try:
            result = await self.task
        except BaseException as exc:
            self.settle()  # cancelled while waiting: the rest goes too
            if isinstance(exc, TiergateError):  # the slow attempt came first
                exc.attempts = attempts + exc.attempts
            raise
        result.attempts = attempts + result.attempts
        result.tries = tried(result.attempts)
        return result
