"""What tiergate reports about each request: one record per request, handed to metrics and logs.

`RequestRecord` is filled in along the request's path and given to `Telemetry.finish` once,
when the response (or the stream) has ended.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .dispatch import Attempt, tried
from .types import ModelRef

log = logging.getLogger("tiergate")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str
    route: str = ""
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    ref: ModelRef | None = None
    attempts: list[Attempt] = field(default_factory=list)
    cache: str = "bypass"
    usage: dict[str, Any] | None = None
    error: str | None = None
    first_byte_at: float | None = None

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class Telemetry:
    """Counts requests for `Router.get_metrics()` and writes one JSON log line per request."""

    def __init__(self, enabled: bool = True, *, stream: Any = None):
        self.enabled = enabled
        self._out = stream or sys.stderr
        self.requests = 0
        self.succeeded = 0

    def finish(self, record: RequestRecord) -> None:
        self.requests += 1
        if 200 <= record.status < 400:
            self.succeeded += 1
        if not self.enabled:
            return
        line = {
            "ts": round(time.time(), 3), "level": "info" if record.status < 500 else "error",
            "msg": "request", "request_id": record.request_id, "endpoint": record.endpoint,
            "route": record.route, "model": str(record.ref) if record.ref else None,
            "status": record.status, "latency_ms": round(record.latency_ms, 3),
            "stream": record.stream, "cache": record.cache, "attempts": tried(record.attempts),
            "error": record.error,
        }
        self._out.write(orjson.dumps(line).decode() + "\n")

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests,
                "success_rate": (self.succeeded / self.requests) if self.requests else 1.0}
