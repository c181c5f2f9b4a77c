"""`Call`: one request as the attempt loop carries it, a frozen value (a named tuple: one is made
per request, and a tuple is made at C speed where a frozen dataclass sets each field in Python).

The hedge and stream recovery re-enter the loop with a narrowed call (`call.narrowed(plan, ...)`),
never with flags of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from ...adapters.base import Endpoint
    from ...outcome import Result
    from ...planner.plan import Plan
    from .events import AttemptObserver


class Call(NamedTuple):
    """What to send (`payload`, in `endpoint`'s API), where (`plan`), and under which terms.

    `timeout` is the client's deadline (else the route's, else the setting for non-stream calls; a
    stream has none by default). `headers` are the client's, to forward (lower-case names).
    `observer` (the request's trace) sees each attempt start and end and may replace its headers.
    `raw_usage`: a stream's usage event, asked for by tiergate, is left in (a shared stream filters
    it for each subscriber). `recover`: a stream of a route with `stream_recovery: continue` is
    continued by the next candidate if it breaks mid-answer (false for the continuation itself).
    `max_attempts` lowers TIERGATE_MAX_RETRIES (the rest of a request already under way)."""

    endpoint: Endpoint
    payload: dict[str, Any]
    plan: Plan
    stream: bool = False
    headers: Mapping[str, str] | None = None
    timeout: float | None = None
    observer: AttemptObserver | None = None
    raw_usage: bool = False
    recover: bool = True
    max_attempts: int | None = None
    # the inbound key's own headers per provider name (OpenAI-Project, its own provider key), which
    # replace the client's and the provider's for that provider only
    credentials: Mapping[str, Mapping[str, str]] | None = None

    def narrowed(self, plan: Plan, **changes: Any) -> Call:
        """The same call, to fewer candidates (a hedge's rest, a recovery's continuation)."""
        return self._replace(plan=plan, **changes)


class StreamContinuer(Protocol):
    """Continues a recoverable route's stream that breaks mid-answer (recovery.py)."""

    def wrap(self, result: Result, call: Call) -> AsyncIterator[bytes]: ...
