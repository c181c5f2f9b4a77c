"""Context windows in the attempt loop: a prompt that cannot fit a candidate is not sent to it.

A candidate's window is known from the table (`model_rules`' `context_window`, `context_windows`, what
discovery stored) or learned from a provider's own context-window 400 that named it. A prompt whose
estimate is larger than a known window skips that candidate; after a context-window 400, the request
needs a window larger than the one that refused it, and that deployment is not tried again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...limits.estimate import estimate_prompt_tokens

if TYPE_CHECKING:
    from ...planner.plan import Candidate
    from ...types import ModelRef
    from .call import Call
    from .classify import ContextTooLong
    from .tally import Tally

_LEARNED_MAX = 4096  # deployments remembered (overrides may name any model)


class ContextWindows:
    """The windows providers named in their 400s (the table's come with each candidate's rule)."""

    __slots__ = ("learned",)

    def __init__(self) -> None:
        self.learned: dict[ModelRef, int] = {}

    def learn(self, windows: dict[ModelRef, int]) -> None:
        """Windows found by discovery (a table file names none)."""
        for ref, tokens in windows.items():
            if len(self.learned) < _LEARNED_MAX:
                self.learned[ref] = tokens

    def of(self, candidate: Candidate) -> int | None:
        rule = candidate.rule
        if rule is not None and rule.context_window is not None:
            return rule.context_window
        return self.learned.get(candidate.ref) if self.learned else None

    def too_small(self, candidate: Candidate, call: Call, tally: Tally) -> bool:
        """Is this candidate's known window smaller than what the request needs (its prompt's estimate,
        or more than a window that already refused it)? The skip is noted."""
        window = self.of(candidate)
        if window is None:
            return False
        if tally.needs < 0:  # estimated once per request, and only when a window is known
            tally.needs = estimate_prompt_tokens(call.payload)
        if window >= tally.needs:
            return False
        tally.skip(candidate.ref, "context_window")
        return True

    def refused(self, candidate: Candidate, failure: ContextTooLong, call: Call, tally: Tally) -> None:
        """A context-window 400: never this deployment again in the request; the next must be larger."""
        tally.exclude(candidate.ref)
        window = failure.window
        if window is not None and len(self.learned) < _LEARNED_MAX:
            self.learned[candidate.ref] = window
        else:
            window = self.of(candidate)
        if window is not None:
            if tally.needs < 0:
                tally.needs = estimate_prompt_tokens(call.payload)
            tally.needs = max(tally.needs, window + 1)
