"""`Tally`: what one run of the attempt loop has done so far."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...outcome import Attempt

if TYPE_CHECKING:
    from ...types import ModelRef
    from .classify import Retryable
    from .events import AttemptEvents, AttemptObserver


class Tally:
    """What one run of the loop has done so far: its attempts, the failures per deployment, the
    failure that decides the answer when none answers, and how many attempts it may still send."""

    __slots__ = ("attempts", "failures", "retry_after", "last", "sent", "max_attempts", "deadline", "events",
                 "observer")

    def __init__(self, deadline: float, max_attempts: int, events: AttemptEvents,
                 observer: AttemptObserver | None):
        self.attempts: list[Attempt] = []
        self.failures: dict[ModelRef, int] = {}  # per deployment, this request
        self.retry_after: dict[ModelRef, float] = {}
        self.last: Retryable | None = None
        self.sent = 0
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.events = events
        self.observer = observer

    def note(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)
        self.events.attempt_ended(attempt)
        if self.observer is not None:
            self.observer.attempt_ended(attempt)

    def skip(self, ref: ModelRef, outcome: str) -> None:
        self.note(Attempt(ref.provider, ref.model, outcome))

    def failed(self, ref: ModelRef, failure: Retryable) -> None:
        self.last = failure
        self.failures[ref] = self.failures.get(ref, 0) + 1
        if failure.retry_after is not None:
            self.retry_after[ref] = failure.retry_after
