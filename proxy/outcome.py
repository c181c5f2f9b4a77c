"""The outcome of a request: its attempts, its result, the state of its stream, and its record.

The vocabulary the engine fills in and observers (telemetry, tracing, health, the edge) read:
it imports nothing of the engine, so an observer never depends on the loop that produced it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from .protocol.sse import content_chars
from .protocol.usage import Usage
from .types import ModelRef

CLIENT_CLOSED = "client_closed"  # the outcome of a request whose client went away before its end

_ID_PREFIX = "req_" + os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per process (random prefix) and across processes; no system call per request."""
    return f"{_ID_PREFIX}{next(_id_counter):010x}"


@dataclass(slots=True)
class Attempt:
    """One try at one candidate, as reported in errors, logs and traces."""

    provider: str
    model: str
    outcome: str  # ok | client_error | http_<status> | timeout | connection | invalid_response | breaker_open | ...
    status: int | None = None
    latency_ms: float = 0.0

    def describe(self) -> str:
        return f"{self.provider}/{self.model}: {self.outcome}"


@dataclass(slots=True)
class Result:
    """What answered and how. Exactly one of `body` and `stream` is set.

    `headers` are the provider's response headers (relayed to the client); `data` is the parsed
    non-stream body when dispatch parsed it to check it is an answer."""

    status: int
    ref: ModelRef
    attempts: list[Attempt]
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    content_type: str = "application/json"
    first_byte_at: float | None = None
    stream_state: StreamState | None = None
    tries: int = 0  # attempts that reached a provider (see `tried`)
    headers: Mapping[str, str] | None = None
    data: Any = None
    usage_requested: bool = False  # the upstream stream was asked for its usage event (by client or tiergate)


@dataclass(slots=True)
class StreamState:
    """Filled in while a stream is relayed; read by telemetry when it ends."""

    chunks: int = 0
    bytes: int = 0
    tail: bytes = b""  # the upstream's last bytes as it sent them (the usage event, even when not relayed)
    completed: bool = False
    error: str | None = None
    request_bytes: int = 0  # the request body sent upstream (for an estimate of its tokens)
    recovered_by: str | None = None  # the model that continued the answer after a break (see recovery.py)
    recovery: str | None = None  # how a recovery went: recovered, failed, refused_<why>, no_candidate
    head_usage: Usage | None = None  # usage a stream gave in its first event (Messages: the input tokens)
    head: bytes = b""  # the upstream's first chunk, kept so its usage is read once, not watched per chunk

    def estimate(self) -> Usage:
        """Tokens of a stream cut before its usage event: about four characters a token, the prompt
        from the request's size, the completion from the content relayed (its share of the last bytes,
        scaled to all of them)."""
        tail = self.tail
        chars = content_chars(tail[tail.find(b"data:"):]) if tail else 0
        completion = chars * self.bytes / len(tail) if tail else 0
        return Usage(self.request_bytes // 4, int(completion + 3) // 4)


@dataclass(slots=True)
class ShadowRecord:
    """One shadow call (a route's `shadow`): what it did, reported apart from the request it mirrored.

    `outcome`: ok, error, dropped_cap (the route's or the process's shadow cap was full), dropped_load
    (the deployment's connection slots were nearly all taken), cancelled (shutdown); `match`: how its
    answer compared with the primary's (exact, similar, different, unknown), None when it did not answer."""

    request_id: str
    route: str
    ref: ModelRef
    stream: bool
    outcome: str
    latency_ms: float | None = None
    first_byte_ms: float | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    error: str | None = None
    match: str | None = None


def tried(attempts: list[Attempt]) -> int:
    """How many attempts really went to a provider (skips for open breakers do not count)."""
    if len(attempts) == 1:  # the usual case
        return 0 if attempts[0].outcome in SKIPPED else 1
    return sum(1 for a in attempts if a.outcome not in SKIPPED)


SKIPPED = frozenset({"breaker_open", "cooldown", "fleet_blocked", "unknown_provider", "queue_full",
                     "context_window"})



class RequestRecord:
    """What one request did, filled in along its path and handed to `Telemetry.finish` once.

    A plain class whose defaults live on the class: creating one per request sets four fields."""

    route: str = ""
    stream: bool = False
    status: int = 0
    ref: ModelRef | None = None
    cache: str = "bypass"
    usage: Usage | None = None
    usage_estimated: bool = False  # a stream cut before its usage event: tokens estimated from its size
    usage_details: dict[str, int] | None = None  # a stream's cached_tokens / reasoning_tokens, when sent
    error: str | None = None
    first_byte_at: float | None = None
    ended: float = 0.0
    tries: int = 0  # attempts that reached a provider
    cost_usd: float | None = None
    stream_state: StreamState | None = None
    trace: Any = None  # the request's span (tracing.RequestTrace) when tracing is on
    attempts: list[Attempt] | tuple[()] = ()  # the dispatcher's list, once there is one
    quota: Any = None  # what the limits charged this request (limits.admission.Reservation), settled at its end
    key_name: str | None = None  # the inbound key's name, for what is scoped to it (stored objects)
    # a route that chooses per request: which strategy chose which deployment first, and the candidates
    # in the order planned (x-tiergate-strategy, the request log); empty for an `ordered` route
    strategy: str = ""
    candidates: tuple[str, ...] = ()  # provider/model
    shadow: Any = None  # the request's shadow call, when its route mirrored it (engine/shadow.py)

    def __init__(self, request_id: str, endpoint: str):
        self.request_id = request_id
        self.endpoint = endpoint
        self.started = time.perf_counter()

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000
