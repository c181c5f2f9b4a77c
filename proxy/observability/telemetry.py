"""What tiergate reports about each request: one record per request, handed to metrics, traces and logs.

`RequestRecord` is filled in along the request's path and given to `Telemetry.finish` once,
when the response (or the stream) has ended. `Telemetry` composes the Prometheus metrics
(metrics.py), the in-process statistics behind `Router.get_metrics()` (stats.py), traces
(tracing.py) and the one structured JSON log line per request (here). Usage and cost come on the
record (the router charges them, engine/costing.py); what else it reports is pushed to it: the
routing table and the state its gauges read (`table_changed`), never read from the router.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from ..outcome import RequestRecord, Result, ShadowRecord
from ..protocol.usage import finish_reasons, response_model
from ..settings import RouterConfig
from ..types import ConfigError, ModelRef
from .labels import ModelLabels, error_label
from .metrics import CONTENT_TYPE, PrometheusMetrics, multiprocess_dir
from .semconv import INFERENCE_OPERATIONS, OPERATION_OF_ENDPOINT, names_for
from .shadow_report import ShadowMetrics, log_line
from .stats import RequestStats
from .tracing import RequestTrace, Tracing

if TYPE_CHECKING:
    from ..table.routing import RoutingTable

log = logging.getLogger("tiergate")
request_log = logging.getLogger("tiergate.requests")

_DRAIN_AFTER_S = 0.2  # a finished request is counted and logged at most this late...
_BATCH_SIZE = 64  # ...or as soon as this many have finished
_SAMPLE_EVERY_S = 1.0  # multiprocess mode: how often a worker refreshes its state gauges
_UNPAID_CACHE_RESULTS = frozenset({"hit", "coalesced"})  # answered without an upstream call of their own
REQUEST_LOG_TARGETS = ("stderr", "logging", "off")
_MEMO_LIMIT = 4096  # entries in the per-model memos (labels, provider addresses)
_USAGE, _COST, _ATTEMPTS = attrgetter("usage"), attrgetter("cost_usd"), attrgetter("attempts")
_PROMPT, _COMPLETION = itemgetter(0), itemgetter(1)
_CACHE_READ, _CACHE_WRITE, _REASONING = itemgetter(2), itemgetter(3), itemgetter(4)
_ATTEMPT_KEY = attrgetter("provider", "outcome")


def _answered_by_fallback(record: RequestRecord) -> bool:
    """Answered, by a model other than the first one tried."""
    first, ref = record.attempts[0], record.ref
    return ref is not None and 200 <= record.status < 400 and (first.provider, first.model) != (ref.provider, ref.model)


class GaugeSources(NamedTuple):
    """What the state gauges read when /metrics is scraped, handed over by the router with each table."""

    breakers: Callable[[], Iterable[tuple[str, Any]]]  # (deployment, breaker with a `.state`) pairs
    cache_stats: Callable[[], Mapping[str, Any] | None] | None = None  # the response cache's `stats()`
    # the routing table's database: (connected, seconds since a good read), None without one
    database: Callable[[], tuple[bool, float | None] | None] | None = None


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

    def __init__(self, config: RouterConfig | None = None, *, tracer_provider: Any = None):
        config = config or RouterConfig()
        self.enabled = config.enable_monitoring
        self._table: RoutingTable | None = None  # the current routing table, pushed by `table_changed`
        self._gauges: GaugeSources | None = None
        self.stats = RequestStats()
        self.metrics: PrometheusMetrics | None = None
        self.tracing: Tracing | None = None
        self._multiproc = multiprocess_dir()
        self._sampled_at = 0.0
        self._finished: list[RequestRecord] = []  # ended, not yet counted (see `drain`)
        self._shadows: list[ShadowRecord] = []  # shadow calls ended (or dropped), not yet counted
        self._shadow_metrics: ShadowMetrics | None = None  # their families, registered with the first one
        self._drain_timer: asyncio.TimerHandle | None = None
        self._batch = 1 if self._multiproc else _BATCH_SIZE  # several workers: counted at once
        self._labels = ModelLabels()  # provider/model labels from the table only (`other` else), per model
        self._scrape_lock = asyncio.Lock()  # one rendering of /metrics at a time, off the loop
        self._servers: dict[str, tuple[str, int] | None] = {}  # provider -> (host, port) of its base URL
        self.request_log = config.request_log.strip().lower()
        if self.request_log not in REQUEST_LOG_TARGETS:
            raise ConfigError(f"request_log = {config.request_log!r}: expected one of "
                              f"{', '.join(REQUEST_LOG_TARGETS)}", param="request_log")
        self._log_stream = _buffered_stderr() if self.enabled and self.request_log == "stderr" else None
        genai = names_for(config.genai_semconv)
        if not self.enabled:
            return
        self.metrics = PrometheusMetrics(multiproc_dir=self._multiproc, genai=genai)
        if tracer_provider is not None:
            self.tracing = Tracing(tracer_provider, log_prompts=config.log_prompts,
                                   attempts=config.trace_attempts, names=genai)
        else:
            tracing = Tracing.from_env(config.env, log_prompts=config.log_prompts, export=config.trace_export,
                                       attempts=config.trace_attempts, names=genai)
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
        """The upstream answered (usage and cost are on the record already): a body's model and finish
        reasons for the span; a stream's are read from its tail when it ends."""
        trace = record.trace
        body = result.body
        if trace is not None and trace.recording and body is not None and result.stream_state is None:
            trace.response_model = response_model(body)
            trace.finish_reasons = finish_reasons(body[-4096:])

    def table_changed(self, table: RoutingTable, gauges: GaugeSources | None = None) -> None:
        """A new routing table (its providers may differ: forget their memoised addresses), and what the
        state gauges read at scrape time (breakers, cache, the table's database)."""
        self._table = table
        self._servers = {}
        self._labels.table_changed(table)
        if gauges is not None:
            self._gauges = gauges

    def _server(self, provider: str) -> tuple[str, int] | None:
        """The (host, port) of `provider`'s base URL (the GenAI conventions' `server.address`/`.port`)."""
        try:
            return self._servers[provider]
        except KeyError:
            pass
        server = None
        table = self._table
        spec = table.providers.get(provider) if table is not None else None
        if spec is not None and spec.base_url:
            from urllib.parse import urlsplit
            try:
                parts = urlsplit(spec.base_url)
                if parts.hostname:
                    server = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
            except ValueError:
                server = None
        if len(self._servers) >= _MEMO_LIMIT:
            self._servers.clear()
        self._servers[provider] = server
        return server

    # -- the end of the request -----------------------------------------------------------------

    def finish(self, record: RequestRecord) -> None:
        """The request has ended: its span ends now; it is counted in metrics and statistics and its
        log line written with the next batch (within `_DRAIN_AFTER_S`, or on any read)."""
        record.ended = time.perf_counter()
        if not self.enabled:
            self.stats.overall.add(200 <= record.status < 400, (record.ended - record.started) * 1000, 0, 0, None)
            return
        state = record.stream_state
        if state is not None and state.tail and record.trace is not None and record.trace.recording:
            record.trace.response_model = response_model(state.tail)
            record.trace.finish_reasons = finish_reasons(state.tail)
        if state is not None and record.trace is not None and record.trace.recording \
                and (state.recovery or record.usage_estimated):
            span = record.trace.span  # how the stream ended: recovered by which model, tokens estimated
            if state.recovery:
                span.set_attribute("tiergate.stream.recovery", state.recovery)
                if state.recovered_by:
                    span.set_attribute("tiergate.stream.recovered_by", state.recovered_by)
            if record.usage_estimated:
                span.set_attribute("tiergate.usage.estimated", True)
        trace = record.trace
        if trace is not None:
            ref = record.ref
            trace.finish(record, self._server(ref.provider) if ref is not None and trace.recording else None)
        finished = self._finished
        finished.append(record)
        if len(finished) >= self._batch:
            self.drain()
        elif self._drain_timer is None:
            try:
                self._drain_timer = asyncio.get_running_loop().call_later(_DRAIN_AFTER_S, self.drain)
            except RuntimeError:  # no loop (a synchronous caller): count it now
                self.drain()

    def shadow(self, record: ShadowRecord) -> None:
        """A shadow call has ended (or was dropped): counted and logged with the next batch."""
        if not self.enabled:
            return
        self._shadows.append(record)
        if self._drain_timer is None:
            try:
                self._drain_timer = asyncio.get_running_loop().call_later(_DRAIN_AFTER_S, self.drain)
            except RuntimeError:
                self.drain()

    def _report_shadows(self) -> None:
        """The shadow calls' metrics (families of their own) and log lines (`"msg": "shadow"`)."""
        shadows, self._shadows = self._shadows, []
        labels = self._labels.of
        if self.metrics is not None:
            if self._shadow_metrics is None:
                self._shadow_metrics = ShadowMetrics(self.metrics.registry)
            self._shadow_metrics.count(shadows, lambda ref: labels(ref)[0])
        if self._logging():
            ts = int(time.time() * 1000) / 1000
            self._write_lines(b"".join(orjson.dumps({"ts": ts, **log_line(r, labels(r.ref)[2])},
                                                    option=orjson.OPT_APPEND_NEWLINE) for r in shadows))

    def drain(self) -> None:
        """Count the finished requests in metrics and statistics, and write their log lines.

        Requests that share route, model, status, cache result and streaming are counted together;
        the per-request work is a grouping step and the log line."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self._shadows:
            self._report_shadows()
        records = self._finished
        if not records:
            return
        self._finished = []
        groups: dict[tuple[str, ModelRef | None, int, str, bool, str, str | None], list[RequestRecord]] = {}
        retried: list[RequestRecord] = []  # more than one attempt: maybe answered by a fallback
        for record in records:
            key = (record.route, record.ref, record.status, record.cache, record.stream, record.endpoint,
                   record.error)
            group = groups.get(key)
            if group is None:
                groups[key] = [record]
            else:
                group.append(record)
            if len(record.attempts) > 1:
                retried.append(record)
        fallbacks = {id(r) for r in retried if _answered_by_fallback(r)}
        if self.metrics is not None:
            for record in records:
                state = record.stream_state
                if state is not None and state.recovery:
                    self.metrics.stream_recovery(state.recovery)
        stats, metrics = self.stats, self.metrics
        for (route, ref, status, cache, stream, endpoint, error), group in groups.items():
            ok = 200 <= status < 400
            model = self.stats.model_label(self._labels.of(ref)[0]) if ref is not None else ""
            latencies_ms = [(r.ended - r.started) * 1000 for r in group]
            if cache in _UNPAID_CACHE_RESULTS:
                prompt = completion = cache_read = reasoning = 0
                usages = []
            else:
                usages = list(filter(None, map(_USAGE, group)))
                prompt, completion = sum(map(_PROMPT, usages)), sum(map(_COMPLETION, usages))
                cache_read, reasoning = sum(map(_CACHE_READ, usages)), sum(map(_REASONING, usages))
            cost = sum(filter(None, map(_COST, group)))
            fell_back = sum(1 for r in group if id(r) in fallbacks) if fallbacks else 0
            stats.add_group(model, ok, latencies_ms, cache, prompt, completion, cost, fell_back, cache_read, reasoning)
            if metrics is None:
                continue
            series = metrics.series(route, model, ref.provider if ref is not None else "", status)
            series.requests.inc(len(group))
            series.duration.observe_ms(latencies_ms)
            if stream:
                series.ttft.observe_ms([(r.first_byte_at - r.started) * 1000 for r in group
                                        if r.first_byte_at is not None])
            if prompt or completion:
                series.prompt_tokens.inc(prompt)
                series.completion_tokens.inc(completion)
            if cost:
                series.cost.inc(cost)
            if fell_back:
                series.fallbacks.inc(fell_back)
            metrics.cache_result(cache, len(group))
            if cache not in _UNPAID_CACHE_RESULTS:
                self._count_genai(metrics, group, endpoint, ref, status, error, stream, latencies_ms,
                                  (prompt, completion, cache_read, sum(map(_CACHE_WRITE, usages)), reasoning))
        if metrics is not None:
            keyed = [r for r in records if r.key_name is not None]
            if keyed:
                self._count_keys(metrics, keyed)
            for (provider, outcome), n in Counter(map(_ATTEMPT_KEY, chain.from_iterable(map(_ATTEMPTS, records)))
                                                  ).items():
                metrics.attempt(provider, outcome, n)
            if self._multiproc:  # the other workers read this one's counts from the shared files
                metrics.flush()
                now = time.monotonic()
                if now - self._sampled_at >= _SAMPLE_EVERY_S:
                    self._sampled_at = now
                    self.sample()
        self._write_log(records)

    @staticmethod
    def _count_keys(metrics: PrometheusMetrics, records: list[RequestRecord]) -> None:
        """Requests, tokens and cost by inbound key name (an answer from the cache used no tokens)."""
        sums: dict[tuple[str, int], list[float]] = {}
        for record in records:
            found = sums.setdefault((record.key_name or "", record.status), [0, 0, 0, 0.0])
            found[0] += 1
            usage = record.usage if record.cache not in _UNPAID_CACHE_RESULTS else None
            if usage:
                found[1] += usage[0]
                found[2] += usage[1]
            found[3] += record.cost_usd or 0.0
        for (key, status), (count, prompt, completion, cost) in sums.items():
            metrics.key_usage(key, status, int(count), int(prompt), int(completion), cost)

    def _count_genai(self, metrics: PrometheusMetrics, group: list[RequestRecord], endpoint: str,
                     ref: ModelRef | None, status: int, error: str | None, stream: bool,
                     latencies_ms: list[float], tokens: tuple[int, int, int, int, int]) -> None:
        """The GenAI client inference metrics of a group of requests that called a provider."""
        operation = OPERATION_OF_ENDPOINT.get(endpoint, endpoint)
        if operation not in INFERENCE_OPERATIONS:
            return
        if ref is None:  # failed: the conventions count it under the last provider tried
            attempts = group[0].attempts
            if not attempts:
                return
            last = attempts[-1]
            provider, model = last.provider, last.model
        else:
            provider, model = ref.provider, ref.model
        model = self._labels.of(ref or ModelRef(provider, model))[1]  # the table's names only
        error_type = (error_label(error) if error else str(status)) if error or status >= 400 else ""
        prompt, completion, cache_read, cache_write, reasoning = tokens
        usages = [r.usage for r in group if r.usage is not None] if metrics.genai_token_histograms else ()
        for series in metrics.genai_series(operation, provider, model, self._server(provider), error_type):
            series.duration.observe_ms(latencies_ms)
            if stream:
                firsts = [r for r in group if r.first_byte_at is not None]
                series.time_to_first_chunk.observe_ms([(r.first_byte_at - r.started) * 1000 for r in firsts])
                for r in firsts:
                    state = r.stream_state
                    if state is not None and state.chunks > 1:
                        series.time_per_output_chunk.observe_same_ms(
                            (r.ended - r.first_byte_at) * 1000 / (state.chunks - 1), state.chunks - 1)
            usage_counters = series.usage
            if usage_counters:  # every inference counted, 0 when no usage came back
                usage_counters["input"].inc(prompt)
                usage_counters["output"].inc(completion)
                usage_counters["cache_read"].inc(cache_read)
                usage_counters["cache_write"].inc(cache_write)
                usage_counters["reasoning"].inc(reasoning)
            if series.token_usage and usages:
                # the helper takes thousandths of the histogram's unit (its own is seconds, given in ms)
                series.token_usage["input"].observe_ms([u.prompt * 1000 for u in usages])
                series.token_usage["output"].observe_ms([u.completion * 1000 for u in usages])

    def _write_log(self, records: list[RequestRecord]) -> None:
        """The batch's log lines: one write on stderr's descriptor (even under PYTHONUNBUFFERED),
        or `logging` records (ten times dearer), or nothing."""
        if self._logging():
            self._write_lines(self._log_lines(records))

    def _logging(self) -> bool:
        target = self.request_log
        return not (target == "off" or (target == "logging" and not request_log.isEnabledFor(logging.INFO)))

    def _write_lines(self, data: bytes | bytearray) -> None:
        if self.request_log == "logging":
            for line in data.splitlines():
                request_log.info(line.decode())
            return
        out = self._log_stream
        if out is None:  # stderr is not a file (e.g. captured): through sys.stderr
            sys.stderr.write(data.decode())
            return
        try:
            out.write(data)
            out.flush()
        except (OSError, ValueError) as exc:  # stderr closed or gone: nothing left to tell
            log.debug("writing the request log: %s", exc)

    def _log_lines(self, records: list[RequestRecord]) -> bytearray:
        """One JSON object per request: what was asked, what answered, how long, what it cost, why it
        failed. Never a key or prompt text (attempts carry provider, model and outcome only)."""
        wall = time.time() - time.perf_counter()  # perf_counter readings -> wall-clock time
        # times to the millisecond, latencies to the microsecond, by truncation (round() costs 0.3 µs)
        name = self._labels.of
        lines = bytearray()  # each line appended as it is made: its bytes freed at once (4x cheaper)
        for record in records:
            ref, usage, status = record.ref, record.usage, record.status
            line: dict[str, Any] = {
                "ts": int((record.ended + wall) * 1000) / 1000, "level": "error" if status >= 500 else "info",
                "msg": "request", "request_id": record.request_id, "endpoint": record.endpoint,
                "route": record.route, "model": ref and name(ref)[2], "provider": ref and ref.provider,
                "status": status, "latency_ms": int((record.ended - record.started) * 1e6) / 1000,
                "stream": record.stream, "cache": record.cache, "attempts": record.tries,
                "prompt_tokens": usage and usage.prompt, "completion_tokens": usage and usage.completion,
                "cost_usd": record.cost_usd, "error": record.error,
            }
            if record.key_name is not None:  # the inbound key's name, never the key
                line["key"] = record.key_name
            if record.stream or record.error or len(record.attempts) > 1 or record.trace:  # the rarer fields
                if record.first_byte_at is not None:
                    line["ttft_ms"] = int((record.first_byte_at - record.started) * 1e6) / 1000
                if len(record.attempts) > 1 or record.error:
                    line["attempt_outcomes"] = [f"{a.provider}/{a.model}:{a.outcome}" for a in record.attempts]
                state = record.stream_state
                if state is not None and state.error:
                    line["stream_error"] = state.error
                if record.usage_estimated:
                    line["usage_estimated"] = True
                if record.usage_details:
                    line.update(record.usage_details)
                if state is not None and state.recovery:
                    line["stream_recovery"] = state.recovery
                    line["recovered_by"] = state.recovered_by
                if record.trace is not None:  # tracing on: the line names its trace
                    context = record.trace.span.get_span_context()
                    if context.is_valid:
                        line["trace_id"] = f"{context.trace_id:032x}"
            if record.strategy:  # a route that chose per request: how, and among which candidates
                line["strategy"] = record.strategy
                line["candidates"] = record.candidates
            lines += orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
        return lines

    # -- reading --------------------------------------------------------------------------------

    def sample(self) -> None:
        """Refresh the state gauges: breaker states, routing table age, cache size."""
        metrics, gauges, table = self.metrics, self._gauges, self._table
        if metrics is None or gauges is None:
            return
        cache_bytes = None
        stats = gauges.cache_stats
        if callable(stats) and not inspect.iscoroutinefunction(stats):
            try:
                found = stats()
                cache_bytes = next((found[k] for k in ("bytes", "memory_bytes", "size_bytes") if k in found),
                                   None)
            except (AttributeError, TypeError, ValueError) as exc:
                log.debug("cache stats unavailable: %s", exc)
        metrics.sample(dict(gauges.breakers()), table.age() if table is not None else None,
                       cache_bytes if isinstance(cache_bytes, (int, float)) else None, self._labels.deployment)
        database = gauges.database() if gauges.database is not None else None
        if database is not None:  # a routing table in Postgres
            metrics.sample_database(*database)
        if self.tracing is not None:
            metrics.spans_dropped_total(self.tracing.dropped_spans())

    def render_metrics(self) -> tuple[bytes, str]:
        """`GET /metrics`: the exposition text and its content type."""
        if self.metrics is None:
            raise RuntimeError("monitoring is off")
        self.drain()
        self.sample()
        return self.metrics.render(), CONTENT_TYPE

    async def scrape(self) -> tuple[bytes, str]:
        """`GET /metrics` without blocking the loop: the counts are handed over here, the exposition
        text is written in a worker thread (a large registry takes long to render), one at a time."""
        metrics = self.metrics
        if metrics is None:
            raise RuntimeError("monitoring is off")
        async with self._scrape_lock:
            self.drain()
            self.sample()
            metrics.flush()  # the gathered counts belong to the loop: handed over before the thread runs
            return await asyncio.to_thread(metrics.render, flush=False), CONTENT_TYPE

    def snapshot(self) -> dict[str, Any]:
        """`Router.get_metrics()`."""
        self.drain()
        out = self.stats.snapshot()
        out["monitoring"] = self.enabled
        out["tracing"] = self.tracing is not None
        return out

    def close(self) -> None:
        """Count and log what is left, flush traces, retire this process's live gauges (blocking:
        call it off the loop)."""
        self.drain()
        if self.tracing is not None:
            self.tracing.close()
        if self.metrics is not None:
            self.metrics.close()
