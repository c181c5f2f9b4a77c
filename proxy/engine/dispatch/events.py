"""The attempt loop's signals, after aiohttp's `TraceConfig`: named lists of subscribers, each
called with a small value. Health, metrics and fleet health subscribe; the loop never knows them.
A request's own observer (its trace) is passed with the call instead."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ...outcome import Attempt
    from ...types import ModelRef


@dataclass(frozen=True, slots=True)
class CooldownStarted:
    """A deployment answered 429: it is skipped for `seconds` (by every tiergate that hears of it)."""

    deployment: str  # provider/model
    seconds: float
    reason: str


class AttemptEvents:
    """`on_attempt_end`: every attempt and skip, as reported in errors and logs.
    `on_cooldown_start`: a deployment rate-limited by its provider."""

    __slots__ = ("on_attempt_end", "on_cooldown_start")

    def __init__(self) -> None:
        self.on_attempt_end: list[Callable[[Attempt], None]] = []
        self.on_cooldown_start: list[Callable[[CooldownStarted], None]] = []

    def attempt_ended(self, attempt: Attempt) -> None:
        for subscriber in self.on_attempt_end:
            subscriber(attempt)

    def cooldown_started(self, event: CooldownStarted) -> None:
        for subscriber in self.on_cooldown_start:
            subscriber(event)


class AttemptObserver(Protocol):
    """Sees each upstream attempt of one request (tracing): may replace its headers, e.g. with a
    `traceparent`."""

    def attempt_started(self, ref: ModelRef, headers: Mapping[str, str] | None) -> Mapping[str, str] | None: ...

    def attempt_ended(self, attempt: Attempt) -> None: ...
