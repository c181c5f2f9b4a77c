"""What tiergate reports about each request: one record per request, handed to metrics, traces and logs.

`RequestRecord` is filled in along the request's path and given to `Telemetry.finish` once,
when the response (or the stream) has ended. `Telemetry` composes the Prometheus metrics
(metrics.py), the in-process statistics behind `Router.get_metrics()` (stats.py), traces
(tracing.py) and the one structured JSON log line per request (here). Usage and cost are read
from the upstream bytes (usage.py) without re-serialising them.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import sys
import time
from typing import Any

import orjson

from .dispatch import Attempt, Result, StreamState, tried
from .metrics import CONTENT_TYPE, PrometheusMetrics, multiprocess_dir
from .settings import RouterConfig
from .stats import RequestStats
from .tracing import RequestTrace, Tracing
from .types import ConfigError, ModelRef
from .usage import Usage, cost_usd, find_usage, finish_reasons, price_for, response_model

log = logging.getLogger("tiergate")
request_log = logging.getLogger("tiergate.requests")

_FLUSH_AFTER_S = 0.2  # the request log reaches stderr at most this late
_SAMPLE_EVERY_S = 1.0  # multiprocess mode: how often a worker refreshes its state gauges
_UNPAID_CACHE_RESULTS = frozenset({"hit", "coalesced"})  # answered without an upstream call of their own
REQUEST_LOG_TARGETS = ("stderr", "logging", "off")
_UNKNOWN = object()
_MEMO_LIMIT = 4096  # entries in the per-model memos (labels, prices)


class RequestRecord:
    """What one request did, filled in along its path and handed to `Telemetry.finish` once.

    A plain class whose defaults live on the class: creating one per request sets four fields."""

    route: str = ""
    stream: bool = False
    status: int = 0
    ref: ModelRef | None = None
    cache: str = "bypass"
    usage: Usage | None = None
    error: str | None = None
    first_byte_at: float | None = None
    cost_usd: float | None = None
    stream_state: StreamState | None = None
    trace: RequestTrace | None = None

    def __init__(self, request_id: str, endpoint: str):
        self.request_id = request_id
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.attempts: list[Attempt] = []

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def _buffered_stderr() -> io.BufferedWriter | None:
    """A buffered writer on stderr's file descriptor, or None when stderr has none."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return open(fd, "wb", buffering=1 << 16, closefd=False)  # noqa: SIM115 - lives as long as the router


class Telemetry:
    """Metrics, traces and request logs of one router. `enabled=False` (ENABLE_MONITORING=false)
    leaves only the request and success counts behind `get_metrics()`."""

    def __init__(self, config: RouterConfig | None = None, router: Any = None, *,
                 tracer_provider: Any = None):
        config = config or RouterConfig()
        self.enabled = config.enable_monitoring
        self._router = router
        self.stats = RequestStats()
        self.metrics: PrometheusMetrics | None = None
        self.tracing: Tracing | None = None
        self._multiproc = multiprocess_dir()
        self._sampled_at = 0.0
        self._flush_pending = False
        self._labels: dict[ModelRef, str] = {}  # provider/model label per model, built once
        self._priced_table: Any = None
        self._prices: dict[ModelRef, Any] = {}  # price per model for `_priced_table`
        self.request_log = config.request_log.strip().lower()
        if self.request_log not in REQUEST_LOG_TARGETS:
            raise ConfigError(f"request_log = {config.request_log!r}: expected one of "
                              f"{', '.join(REQUEST_LOG_TARGETS)}", param="request_log")
        self._log_stream = _buffered_stderr() if self.enabled and self.request_log == "stderr" else None
        if not self.enabled:
            return
        self.metrics = PrometheusMetrics(multiproc_dir=self._multiproc)
        if tracer_provider is not None:
            self.tracing = Tracing(tracer_provider, log_prompts=config.log_prompts)
        else:
            tracing = Tracing.from_env(config.env, log_prompts=config.log_prompts)
            self.tracing = tracing if tracing.enabled else None

    # -- along the request ----------------------------------------------------------------------

    def start_trace(self, operation: str, record: RequestRecord, payload: Any,
                    headers: Any) -> RequestTrace | None:
        """Start the request's span (None when tracing is off: nothing else is done)."""
        tracing = self.tracing
        if tracing is None:
            return None
        trace = tracing.start(operation, record.started, payload if isinstance(payload, dict) else {},
                              headers)
        record.trace = trace
        return trace

    def on_result(self, record: RequestRecord, result: Result) -> None:
        """The upstream answered: read usage and cost from a body now (so the response can carry
        `x-tiergate-cost-usd`); a stream's are read from its tail when it ends."""
        if not self.enabled:
            return
        if result.stream_state is not None:
            record.stream_state = result.stream_state
            return
        body = result.body
        if body is None:
            return
        self._account(record, body)
        trace = record.trace
        if trace is not None and trace.recording:
            trace.response_model = response_model(body)
            trace.finish_reasons = finish_reasons(body[-4096:])

    def _account(self, record: RequestRecord, data: bytes) -> None:
        usage = find_usage(data)
        record.usage = usage
        ref = record.ref
        if usage is None or ref is None:
            return
        if record.cache in _UNPAID_CACHE_RESULTS:
            record.cost_usd = 0.0
            return
        table = getattr(self._router, "_table", None)
        if table is not self._priced_table or len(self._prices) >= _MEMO_LIMIT:  # per table, bounded
            self._priced_table, self._prices = table, {}
        price = self._prices.get(ref, _UNKNOWN)
        if price is _UNKNOWN:
            price = self._prices[ref] = (price_for(table.pricing, ref.provider, ref.model)
                                         if table is not None else None)
        if price is not None:
            record.cost_usd = cost_usd(usage, price)

    # -- the end of the request -----------------------------------------------------------------

    def finish(self, record: RequestRecord) -> None:
        """Count the request in every sink: metrics, statistics, its span and its log line."""
        latency_s = time.perf_counter() - record.started
        ok = 200 <= record.status < 400
        if not self.enabled:
            self.stats.overall.add(ok, latency_s * 1000, 0, 0, None)
            return
        state = record.stream_state
        if state is not None and record.usage is None and state.tail:
            self._account(record, state.tail)
            if record.trace is not None and record.trace.recording:
                record.trace.response_model = response_model(state.tail)
                record.trace.finish_reasons = finish_reasons(state.tail)
        ref = record.ref
        usage = record.usage
        cache = record.cache
        paid = usage is not None and cache not in _UNPAID_CACHE_RESULTS
        prompt = usage.prompt if paid else 0  # type: ignore[union-attr]
        completion = usage.completion if paid else 0  # type: ignore[union-attr]
        attempts = record.attempts
        if ref is not None:
            first = attempts[0] if attempts else None
            fallback = ok and first is not None and (first.provider != ref.provider or first.model != ref.model)
            model = self._labels.get(ref)
            if model is None:
                if len(self._labels) >= _MEMO_LIMIT:  # clients may name any model: stay bounded
                    self._labels.clear()
                model = self._labels[ref] = self.stats.model_label(f"{ref.provider}/{ref.model}")
            provider = ref.provider
        else:
            fallback, model, provider = False, "", ""
        self.stats.add(model, ok, latency_s * 1000, cache, prompt, completion, record.cost_usd, fallback)

        metrics = self.metrics
        if metrics is not None:
            series = metrics.series(record.route, model, provider, record.status)
            series.requests.inc()
            series.duration.observe(latency_s)
            if record.first_byte_at is not None:
                series.ttft.observe(record.first_byte_at - record.started)
            if paid:
                series.prompt_tokens.inc(prompt)
                series.completion_tokens.inc(completion)
            if record.cost_usd:
                series.cost.inc(record.cost_usd)
            if fallback:
                series.fallbacks.inc()
            for attempt in attempts:
                metrics.attempt(attempt.provider, attempt.outcome)
            metrics.cache_result(cache)
            if self._multiproc:
                now = time.monotonic()
                if now - self._sampled_at >= _SAMPLE_EVERY_S:
                    self._sampled_at = now
                    self.sample()

        if record.trace is not None:
            record.trace.finish(record)
        target = self.request_log
        if target == "stderr":
            self._write_line(self._log_line(record, latency_s, model, attempts) + b"\n")
        elif target == "logging" and request_log.isEnabledFor(logging.INFO):
            request_log.info(self._log_line(record, latency_s, model, attempts).decode())

    def _write_line(self, line: bytes) -> None:
        """Buffered bytes on stderr's descriptor, flushed within `_FLUSH_AFTER_S`: no system call per
        request, even under PYTHONUNBUFFERED (a `logging` record costs ten times more)."""
        out = self._log_stream
        if out is None:  # stderr is not a file (e.g. captured): write through
            sys.stderr.write(line.decode())
            return
        out.write(line)
        if not self._flush_pending:
            self._flush_pending = True
            try:
                asyncio.get_running_loop().call_later(_FLUSH_AFTER_S, self.flush)
            except RuntimeError:  # no loop (a synchronous caller): write through
                self.flush()

    def flush(self) -> None:
        self._flush_pending = False
        if self._log_stream is None:
            return
        try:
            self._log_stream.flush()
        except (OSError, ValueError) as exc:  # stderr closed or gone: nothing left to tell
            log.debug("flushing the request log: %s", exc)

    def _log_line(self, record: RequestRecord, latency_s: float, model: str,
                  attempts: list[Attempt]) -> bytes:
        """One JSON object: what was asked, what answered, how long, what it cost, why it failed.
        Never a key or prompt text (attempts carry provider, model and outcome only)."""
        ref = record.ref
        usage = record.usage
        line: dict[str, Any] = {
            "ts": round(time.time(), 3), "level": "info" if record.status < 500 else "error",
            "msg": "request", "request_id": record.request_id, "endpoint": record.endpoint,
            "route": record.route, "model": model or None, "provider": ref.provider if ref else None,
            "status": record.status, "latency_ms": round(latency_s * 1000, 3), "stream": record.stream,
            "cache": record.cache, "attempts": tried(record.attempts),
            "prompt_tokens": usage.prompt if usage else None,
            "completion_tokens": usage.completion if usage else None,
            "cost_usd": record.cost_usd, "error": record.error,
        }
        if record.first_byte_at is not None:
            line["ttft_ms"] = round((record.first_byte_at - record.started) * 1000, 3)
        if len(attempts) > 1 or record.error:
            line["attempt_outcomes"] = [f"{a.provider}/{a.model}:{a.outcome}" for a in attempts]
        state = record.stream_state
        if state is not None and state.error:
            line["stream_error"] = state.error
        return orjson.dumps(line)

    # -- reading --------------------------------------------------------------------------------

    def sample(self) -> None:
        """Refresh the state gauges: breaker states, routing table age, cache size."""
        metrics = self.metrics
        router = self._router
        if metrics is None or router is None:
            return
        table = getattr(router, "_table", None)
        cache = getattr(router, "cache", None)
        cache_bytes = None
        stats = getattr(cache, "stats", None)
        if callable(stats) and not inspect.iscoroutinefunction(stats):
            try:
                found = stats()
                cache_bytes = next((found[k] for k in ("bytes", "memory_bytes", "size_bytes") if k in found),
                                   None)
            except (AttributeError, TypeError, ValueError) as exc:
                log.debug("cache stats unavailable: %s", exc)
        metrics.sample(dict(router.breakers.items()), table.age() if table is not None else None,
                       cache_bytes if isinstance(cache_bytes, (int, float)) else None)

    def render_metrics(self) -> tuple[bytes, str]:
        """`GET /metrics`: the exposition text and its content type."""
        if self.metrics is None:
            raise RuntimeError("monitoring is off")
        self.sample()
        return self.metrics.render(), CONTENT_TYPE

    def snapshot(self) -> dict[str, Any]:
        """`Router.get_metrics()`."""
        out = self.stats.snapshot()
        out["monitoring"] = self.enabled
        out["tracing"] = self.tracing is not None
        return out

    def close(self) -> None:
        """Flush traces and logs, retire this process's live gauges (blocking: call it off the loop)."""
        self.flush()
        if self.tracing is not None:
            self.tracing.close()
        if self.metrics is not None:
            self.metrics.close()
