"""What is reported of shadow calls (a route's `shadow`): their own metric families, apart from the
requests' (a shadow is no request of the client's: it is not in `tiergate_requests_total`, nor in the
cost budgets are charged from), and a request-log line of their own, `"msg": "shadow"`, naming the
request it mirrored. Labels come from the table only (route names, `provider/model` or `other`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter

from ..outcome import ShadowRecord
from ..types import ModelRef
from .metrics import LATENCY_BUCKETS, TTFT_BUCKETS

SHADOW_METRIC_NAMES = (
    "tiergate_shadow_requests_total", "tiergate_shadow_duration_seconds",
    "tiergate_shadow_time_to_first_token_seconds", "tiergate_shadow_tokens_total",
    "tiergate_shadow_cost_usd_total", "tiergate_shadow_matches_total",
)


class ShadowMetrics:
    """The shadow calls' families, registered on the metrics' registry the first time a route mirrors one."""

    def __init__(self, registry: CollectorRegistry):
        self.calls = PromCounter("tiergate_shadow_requests_total", "Shadow calls by route, shadow model and "
                                 "outcome (ok, error, dropped_cap, dropped_load, cancelled)",
                                 ["route", "model", "outcome"], registry=registry)
        self.duration = Histogram("tiergate_shadow_duration_seconds", "Shadow calls: time from start to the "
                                  "end of the answer (streams: read to the end)", ["route", "model"],
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("tiergate_shadow_time_to_first_token_seconds", "Shadow streams: time to the "
                              "first chunk", ["route", "model"], buckets=TTFT_BUCKETS, registry=registry)
        self.tokens = PromCounter("tiergate_shadow_tokens_total", "Tokens shadow calls used, by type (prompt, "
                                  "completion)", ["route", "model", "type"], registry=registry)
        self.cost = PromCounter("tiergate_shadow_cost_usd_total", "Shadow calls' cost in USD (models with a "
                                "price); not charged to any key's budget", ["route", "model"], registry=registry)
        self.matches = PromCounter("tiergate_shadow_matches_total", "Shadow answers compared with the primary's: "
                                   "exact, similar (same finish reason, length within 20%), different, unknown",
                                   ["route", "model", "match"], registry=registry)

    def count(self, records: list[ShadowRecord], model_label: Callable[[ModelRef], str]) -> None:
        for record in records:
            model = model_label(record.ref)
            route = record.route
            self.calls.labels(route, model, record.outcome).inc()
            if record.latency_ms is not None:
                self.duration.labels(route, model).observe(record.latency_ms / 1000)
            if record.first_byte_ms is not None:
                self.ttft.labels(route, model).observe(record.first_byte_ms / 1000)
            usage = record.usage
            if usage is not None:
                self.tokens.labels(route, model, "prompt").inc(usage.prompt)
                self.tokens.labels(route, model, "completion").inc(usage.completion)
            if record.cost_usd:
                self.cost.labels(route, model).inc(record.cost_usd)
            if record.match is not None:
                self.matches.labels(route, model, record.match).inc()


def log_line(record: ShadowRecord, model_name: str) -> dict[str, Any]:
    """The request-log line of one shadow call (never a key or prompt text)."""
    usage = record.usage
    return {
        "level": "info", "msg": "shadow", "request_id": record.request_id, "route": record.route,
        "model": model_name, "provider": record.ref.provider, "stream": record.stream, "outcome": record.outcome,
        "latency_ms": None if record.latency_ms is None else int(record.latency_ms * 1000) / 1000,
        "ttft_ms": None if record.first_byte_ms is None else int(record.first_byte_ms * 1000) / 1000,
        "prompt_tokens": usage and usage.prompt, "completion_tokens": usage and usage.completion,
        "cost_usd": record.cost_usd, "error": record.error, "match": record.match,
    }
