"""Prometheus metrics of tiergate (`GET /metrics`), on prometheus-client.

Each `PrometheusMetrics` has its own registry (no process-global state for tests to reset).
The labelled children are cached per label tuple, and counts gather there as plain numbers
(telemetry adds whole batches of requests) until a scrape hands them to prometheus-client, so a
request costs no `.labels()` (which validates, converts and locks) and no `inc()` of its own.
With several worker processes, prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`
set before start-up) writes every worker's values to that directory and a scrape of any worker
merges them all.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import Counter as PromCounter
from prometheus_client import multiprocess as prom_multiprocess

from ..engine.breaker import STATE_VALUES
from .semconv import (
    CHUNK_BUCKETS,
    DURATION_BUCKETS,
    LATEST,
    NAMES,
    TOKEN_BUCKETS,
    GenAINames,
    label_name,
    prometheus_name,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_MAX_CACHED_SERIES = 4096

METRIC_NAMES = (
    "tiergate_requests_total", "tiergate_request_duration_seconds",
    "tiergate_time_to_first_token_seconds", "tiergate_upstream_attempts_total",
    "tiergate_fallbacks_total", "tiergate_tokens_total", "tiergate_cost_usd_total",
    "tiergate_cache_requests_total", "tiergate_cache_bytes", "tiergate_circuit_state",
    "tiergate_routing_table_age_seconds", "tiergate_trace_spans_dropped_total",
    "tiergate_stream_recoveries_total",
    # only with inbound keys: by the key's name (never the key)
    "tiergate_key_requests_total", "tiergate_key_tokens_total", "tiergate_key_cost_usd_total",
    # only with a routing table in Postgres (DATABASE_URL)
    "tiergate_database_up", "tiergate_database_last_refresh_age_seconds",
)

# the GenAI metrics' attributes, as labels (gen_ai.response.model is left out: it would need the
# response's `model` read from every body, and the request model names the deployment already)
GENAI_ATTRIBUTES = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                    "server.address", "server.port")
GENAI_LABELS = tuple(map(label_name, GENAI_ATTRIBUTES))
ERROR_LABEL = label_name("error.type")  # on the duration only (the conventions' other metrics have none)
MODALITY_LABEL = label_name("gen_ai.token.modality")
TOKEN_TYPE_LABEL = label_name("gen_ai.token.type")


def _model_of(deployment: str) -> str:
    return deployment.partition("/")[2]


def multiprocess_dir() -> str | None:
    """The directory prometheus-client's multiprocess mode writes to, when it is on.

    prometheus-client itself decides this from the process environment when it is imported,
    so it is read from there (once, at start-up), not from tiergate's settings.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    return path or None


class _Pending:
    """A counter child whose increments gather as a plain number and reach prometheus-client in
    one `inc()` when the metrics are read (or, with several workers, after each batch)."""

    __slots__ = ("child", "value")

    def __init__(self, child: Any):
        self.child = child
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def flush(self) -> None:
        if self.value:
            value, self.value = self.value, 0.0
            self.child.inc(value)


class _PendingHistogram:
    """A histogram child whose observations, in milliseconds, gather as plain bucket counts and
    reach prometheus-client (in seconds) when the metrics are read."""

    __slots__ = ("child", "bounds", "counts", "total")

    def __init__(self, child: Any):
        self.child = child
        self.bounds = [b * 1000 for b in child._upper_bounds]  # prometheus-client's own bounds, +Inf last
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe_same_ms(self, value: float, count: int) -> None:
        """`count` observations of one value."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.total += value * count

    def observe_ms(self, values: list[float]) -> None:
        # a plain loop: cheaper than counting with a `Counter` (its construction alone costs what
        # bisecting a dozen values does) at every batch size
        counts, bounds = self.counts, self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        self.total += sum(values)

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        buckets = self.child._buckets  # one value per bucket, as Histogram.observe increments them
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
                counts[i] = 0
        self.child._sum.inc(self.total / 1000)
        self.total = 0.0


@dataclass(slots=True)
class _RequestSeries:
    """The children one (route, model, provider, status) touches."""

    requests: Any
    duration: Any
    ttft: Any
    prompt_tokens: Any
    completion_tokens: Any
    cost: Any
    fallbacks: Any


@dataclass(slots=True)
class _GenAISeries:
    """The children one set of GenAI metric attributes touches, in one version of the conventions."""

    duration: Any
    time_to_first_chunk: Any
    time_per_output_chunk: Any
    usage: dict[str, Any]  # latest: a counter per token kind (input, output, cache_read, ...)
    token_usage: dict[str, Any]  # previous: the token histogram per token type (input, output)


class _GenAIFamilies:
    """The GenAI client inference metrics under one version's names, as Prometheus names them."""

    def __init__(self, names: GenAINames, registry: CollectorRegistry):
        labels = list(GENAI_LABELS)
        self.names = names
        self.duration = Histogram(prometheus_name(names.duration, "s"), "GenAI client inference operation "
                                  "duration (OpenTelemetry GenAI conventions)", [*labels, ERROR_LABEL],
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.time_to_first_chunk = Histogram(
            prometheus_name(names.time_to_first_chunk, "s"), "Streams: time to receive the first chunk",
            labels, buckets=DURATION_BUCKETS, registry=registry)
        self.time_per_output_chunk = Histogram(
            prometheus_name(names.time_per_output_chunk, "s"), "Streams: time per output chunk after the "
            "first (each stream's mean, once per chunk)", labels, buckets=CHUNK_BUCKETS, registry=registry)
        self.usage = {kind: PromCounter(prometheus_name(name, "{token}"), f"GenAI {kind.replace('_', ' ')} "
                                        "tokens used", [*labels, MODALITY_LABEL], registry=registry)
                      for kind, name in names.usage_counters}
        self.token_usage = (Histogram(prometheus_name(names.token_usage, "{token}"), "Number of input and "
                                      "output tokens used", [*labels, TOKEN_TYPE_LABEL], buckets=TOKEN_BUCKETS,
                                      registry=registry) if names.token_usage else None)

    def series(self, values: tuple[str, ...], error: str, gathered: Any) -> _GenAISeries:
        token_usage = self.token_usage
        return _GenAISeries(
            gathered(self.duration.labels(*values, error), _PendingHistogram),
            gathered(self.time_to_first_chunk.labels(*values), _PendingHistogram),
            gathered(self.time_per_output_chunk.labels(*values), _PendingHistogram),
            {kind: gathered(counter.labels(*values, "unknown")) for kind, counter in self.usage.items()},
            {kind: gathered(token_usage.labels(*values, kind), _PendingHistogram) for kind in ("input", "output")}
            if token_usage is not None else {})


class PrometheusMetrics:
    """The metric families and a cache of their labelled children."""

    def __init__(self, *, multiproc_dir: str | None = None, genai: tuple[GenAINames, ...] = (NAMES[LATEST],)):
        self.multiproc_dir = multiproc_dir
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.requests = PromCounter("tiergate_requests_total", "Requests answered, by route, model, provider "
                                "and HTTP status", ["route", "model", "provider", "status"], registry=reg)
        self.duration = Histogram("tiergate_request_duration_seconds", "Time from request to the end of "
                                  "the response (streams: to the last chunk)", ["route", "model"],
                                  buckets=LATENCY_BUCKETS, registry=reg)
        self.ttft = Histogram("tiergate_time_to_first_token_seconds", "Streams: time from request to the "
                              "first upstream chunk", ["model"], buckets=TTFT_BUCKETS, registry=reg)
        self.attempts = PromCounter("tiergate_upstream_attempts_total", "Upstream attempts by provider and "
                                "outcome (ok, http_<status>, timeout, connection, breaker_open, ...)",
                                ["provider", "outcome"], registry=reg)
        self.fallbacks = PromCounter("tiergate_fallbacks_total", "Requests answered by a model other than "
                                 "the first one tried", ["route"], registry=reg)
        self.tokens = PromCounter("tiergate_tokens_total", "Tokens used upstream, by model and type "
                              "(prompt, completion)", ["model", "type"], registry=reg)
        self.cost = PromCounter("tiergate_cost_usd_total", "Upstream cost in USD (models with a price)",
                            ["model"], registry=reg)
        self.cache = PromCounter("tiergate_cache_requests_total", "Requests by cache result (hit, miss, "
                             "coalesced, bypass)", ["result"], registry=reg)
        self.recoveries = PromCounter("tiergate_stream_recoveries_total", "Streams that broke mid-answer "
                                      "on a route with stream_recovery, by outcome (recovered, failed, "
                                      "refused_<why>, no_candidate)", ["outcome"], registry=reg)
        # per inbound key, by its name (the table's or the database's: a bounded set), never the key
        self.key_requests = PromCounter("tiergate_key_requests_total", "Requests answered, by inbound key "
                                        "name and HTTP status", ["key", "status"], registry=reg)
        self.key_tokens = PromCounter("tiergate_key_tokens_total", "Tokens used upstream, by inbound key "
                                      "name and type (prompt, completion)", ["key", "type"], registry=reg)
        self.key_cost = PromCounter("tiergate_key_cost_usd_total", "Upstream cost in USD, by inbound key "
                                    "name (models with a price)", ["key"], registry=reg)
        self.cache_bytes = Gauge("tiergate_cache_bytes", "Bytes held by the response cache",
                                 registry=reg, multiprocess_mode="livesum")
        self.circuit = Gauge("tiergate_circuit_state", "Circuit breaker state per deployment (0 closed, "
                             "1 half-open, 2 open)", ["provider", "model"], registry=reg,
                             multiprocess_mode="livemax")
        self.table_age = Gauge("tiergate_routing_table_age_seconds", "Seconds since the routing table "
                               "in use was loaded", registry=reg, multiprocess_mode="livemax")
        self.database_up = Gauge("tiergate_database_up", "1 while the routing table's database answers, "
                                 "0 while it does not (only with DATABASE_URL)", registry=reg,
                                 multiprocess_mode="livemin")
        self.database_refresh_age = Gauge("tiergate_database_last_refresh_age_seconds", "Seconds since the "
                                          "routing table was last read from the database", registry=reg,
                                          multiprocess_mode="livemax")
        self.spans_dropped = PromCounter("tiergate_trace_spans_dropped", "Finished spans the hand-off to the "
                                         "span exporter process dropped (its queue was full)", registry=reg)
        self._spans_dropped_seen = 0
        self.genai = [_GenAIFamilies(names, reg) for names in genai]
        self.genai_token_histograms = any(family.token_usage is not None for family in self.genai)
        self._genai_series: dict[tuple[str, ...], list[_GenAISeries]] = {}
        self._series: dict[tuple[str, str, str, int], _RequestSeries] = {}
        self._attempt_children: dict[tuple[str, str], _Pending] = {}
        self._cache_children: dict[str, _Pending] = {}
        # counts gather as plain numbers and reach prometheus-client on `flush()`: when scraped, and
        # with several workers (who read each other's files) after each batch of requests
        self._pending: list[_Pending | _PendingHistogram] = []
        self._collectors: list[Any] = []  # families computed when scraped (e.g. the limits')

    def _gathered(self, child: Any, kind: type[_Pending] | type[_PendingHistogram] = _Pending) -> Any:
        pending = kind(child)
        self._pending.append(pending)
        return pending

    def flush(self) -> None:
        """Hand the gathered counts to prometheus-client."""
        for pending in self._pending:
            pending.flush()

    def series(self, route: str, model: str, provider: str, status: int) -> _RequestSeries:
        """The children of one label tuple, created once and then reused."""
        key = (route, model, provider, status)
        found = self._series.get(key)
        if found is None:
            if len(self._series) >= _MAX_CACHED_SERIES:
                self._drop_cached()
            counter = self._gathered
            found = _RequestSeries(
                counter(self.requests.labels(route, model, provider, str(status))),
                counter(self.duration.labels(route, model), _PendingHistogram),
                counter(self.ttft.labels(model), _PendingHistogram),
                counter(self.tokens.labels(model, "prompt")), counter(self.tokens.labels(model, "completion")),
                counter(self.cost.labels(model)), counter(self.fallbacks.labels(route)))
            self._series[key] = found
        return found

    def genai_series(self, operation: str, provider: str, model: str, server: tuple[str, int] | None,
                     error: str) -> list[_GenAISeries]:
        """The GenAI metrics' children of one attribute set, in each version of the conventions reported."""
        key = (operation, provider, model, server[0] if server else "", str(server[1]) if server else "", error)
        found = self._genai_series.get(key)
        if found is None:
            if len(self._genai_series) >= _MAX_CACHED_SERIES:
                self._drop_cached()
            found = self._genai_series[key] = [family.series(key[:-1], error, self._gathered)
                                               for family in self.genai]
        return found

    def spans_dropped_total(self, total: int) -> None:
        """The hand-off's running count of dropped spans."""
        if total > self._spans_dropped_seen:
            self.spans_dropped.inc(total - self._spans_dropped_seen)
            self._spans_dropped_seen = total

    def attempt(self, provider: str, outcome: str, count: int = 1) -> None:
        key = (provider, outcome)
        child = self._attempt_children.get(key)
        if child is None:
            if len(self._attempt_children) >= _MAX_CACHED_SERIES:
                self._drop_cached()
            child = self._attempt_children[key] = self._gathered(self.attempts.labels(provider, outcome))
        child.inc(count)

    def cache_result(self, result: str, count: int = 1) -> None:
        child = self._cache_children.get(result)
        if child is None:
            child = self._cache_children[result] = self._gathered(self.cache.labels(result))
        child.inc(count)

    def key_usage(self, key: str, status: int, requests: int, prompt: int, completion: int, cost: float) -> None:
        """What one inbound key's requests of one status used (a batch of them)."""
        self.key_requests.labels(key, str(status)).inc(requests)
        if prompt or completion:
            self.key_tokens.labels(key, "prompt").inc(prompt)
            self.key_tokens.labels(key, "completion").inc(completion)
        if cost:
            self.key_cost.labels(key).inc(cost)

    def stream_recovery(self, outcome: str) -> None:
        child = self._cache_children.get("recovery:" + outcome)
        if child is None:
            child = self._cache_children["recovery:" + outcome] = self._gathered(self.recoveries.labels(outcome))
        child.inc()

    def sample(self, breakers: Mapping[str, Any], table_age: float | None, cache_bytes: int | None,
               model_label: Callable[[str], str] = _model_of) -> None:
        """Set the gauges that describe state rather than traffic (at scrape time). `model_label` maps a
        deployment (`provider/model`) to its model label: breakers of models the table does not name
        share one series (`other`), which shows the worst of their states."""
        states: dict[tuple[str, str], int] = {}
        for name, breaker in breakers.items():
            key = (name.partition("/")[0], model_label(name))
            states[key] = max(states.get(key, 0), STATE_VALUES.get(breaker.state, 0))
        for (provider, model), state in states.items():
            self.circuit.labels(provider, model).set(state)
        if table_age is not None:
            self.table_age.set(table_age)
        if cache_bytes is not None:
            self.cache_bytes.set(cache_bytes)

    def sample_database(self, up: bool, last_refresh_age: float | None) -> None:
        """The routing table's database (at scrape time): reachable, and how long since a good read."""
        self.database_up.set(1 if up else 0)
        if last_refresh_age is not None:
            self.database_refresh_age.set(last_refresh_age)

    def _drop_cached(self) -> None:
        """Forget the cached children (prometheus-client keeps the series themselves)."""
        self.flush()
        self._series.clear()
        self._genai_series.clear()
        self._attempt_children.clear()
        self._cache_children.clear()
        self._pending.clear()

    def add_collector(self, collector: Any) -> None:
        """A collector whose families are computed when scraped (in multiprocess mode: this worker's view)."""
        self.registry.register(collector)
        self._collectors.append(collector)

    def render(self, flush: bool = True) -> bytes:
        """The exposition text: this process's registry, or every worker's files in multiprocess mode.
        `flush=False` when the counts were handed over already (rendering in another thread)."""
        if flush:
            self.flush()
        if self.multiproc_dir:
            registry = CollectorRegistry(auto_describe=False)
            prom_multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)
            for collector in self._collectors:
                registry.register(collector)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def close(self) -> None:
        """In multiprocess mode, drop this worker's live gauges (its counters stay in the sums)."""
        if self.multiproc_dir:
            prom_multiprocess.mark_process_dead(os.getpid(), self.multiproc_dir)

    def names(self) -> Iterable[str]:
        """Every family's name, tiergate's own and the GenAI ones (as exposed, counters with `_total`)."""
        yield from METRIC_NAMES
        for family in self.genai:
            yield family.duration._name
            yield family.time_to_first_chunk._name
            yield family.time_per_output_chunk._name
            for counter in family.usage.values():
                yield counter._name + "_total"
            if family.token_usage is not None:
                yield family.token_usage._name


CONTENT_TYPE = CONTENT_TYPE_LATEST
