"""`Tally`: what one run of the attempt loop has done so far."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...outcome import Attempt

if TYPE_CHECKING:
    from ...types import ModelRef
    from .classify import Retryable
    from .events import AttemptEvents, AttemptObserver

_NONE: dict = {}  # shared, never written: no failure yet
_NEVER: frozenset = frozenset()


class Tally:
    """What one run of the loop has done so far: its attempts, the failures per deployment, the
    failure that decides the answer when none answers, and how many attempts it may still send."""

    __slots__ = ("attempts", "failures", "retry_after", "last", "sent", "max_attempts", "deadline", "events",
                 "observer", "needs", "excluded", "again")

    def __init__(self, deadline: float, max_attempts: int, events: AttemptEvents,
                 observer: AttemptObserver | None):
        self.attempts: list[Attempt] = []
        # per deployment, this request; made at the first failure (the usual request has none)
        self.failures: dict[ModelRef, int] = _NONE
        self.retry_after: dict[ModelRef, float] = _NONE
        self.last: Retryable | None = None
        self.sent = 0
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.events = events
        self.observer = observer
        self.needs = -1  # the context window the request needs (tokens); -1: not estimated yet
        self.excluded: frozenset[ModelRef] | set[ModelRef] = _NEVER  # not to be tried again in this request
        self.again = 0  # tries of the same deployment left for its failure just now (see `retry_same`)

    def note(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)
        for subscriber in self.events.on_attempt_end:
            subscriber(attempt)
        if self.observer is not None:
            self.observer.attempt_ended(attempt)

    def skip(self, ref: ModelRef, outcome: str) -> None:
        self.note(Attempt(ref.provider, ref.model, outcome))

    def failed(self, ref: ModelRef, failure: Retryable) -> None:
        self.last = failure
        if self.failures is _NONE:
            self.failures, self.retry_after = {}, {}
        self.failures[ref] = self.failures.get(ref, 0) + 1
        if failure.retry_after is not None:
            self.retry_after[ref] = failure.retry_after

    def exclude(self, ref: ModelRef) -> None:
        if self.excluded is _NEVER:
            self.excluded = set()
        self.excluded.add(ref)  # type: ignore[union-attr]
