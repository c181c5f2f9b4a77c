"""OpenTelemetry traces: one span per request, on the GenAI semantic conventions (`gen-ai/1.42.0`).

Tracing is on only when the standard `OTEL_*` variables name an exporter (an OTLP endpoint or
`OTEL_TRACES_EXPORTER`), or when the caller hands in its own `TracerProvider`; otherwise
`Tracing.start()` returns None and the request path does no tracing work at all.

A request is one span, `{operation} {model}` (the conventions' `gen_ai.client.inference`). A
single upstream attempt is an event on it (`tiergate.attempt`: outcome, provider, model, status,
latency) and the request span is what goes upstream as `traceparent`. When a request makes more
than one attempt (a retry, a fallback, a skipped candidate) each attempt is a child span, and
the upstream's `traceparent` names it; the first attempt, made before anyone knew there would be
another, becomes a child span afterwards with its own times. `TIERGATE_TRACE_ATTEMPTS=always`
makes every attempt a child span. The client's W3C `traceparent` is the request span's parent.
Prompt and completion text go into spans only with `log_prompts`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..outcome import Attempt, tried
from ..table.routing import MAX_MODEL_NAME
from ..types import ConfigError, ModelRef
from .semconv import LATEST, NAMES, GenAINames
from .span_export import (  # noqa: F401 - exporter_from_env is part of this module's interface
    DEFAULT_OTLP_ENDPOINT,
    HandOffSpanProcessor,
    build_exporter,
    exporter_choice,
    exporter_from_env,
    own_resource,
)

log = logging.getLogger("tiergate")

_PROPAGATOR = TraceContextTextMapPropagator()
TRACE_EXPORTS = ("process", "thread")
TRACE_ATTEMPTS = ("auto", "always")


def provider_from_env(env: Mapping[str, str], *, export: str = "process") -> Any:
    """A TracerProvider exporting off the request path, or None when nothing is configured.

    `export="process"`: spans are handed to a child process running the SDK's batch processor and
    exporter (see span_export.py); `"thread"`: the SDK's BatchSpanProcessor in this process."""
    if export not in TRACE_EXPORTS:
        raise ConfigError(f"trace_export = {export!r}: expected one of {', '.join(TRACE_EXPORTS)}",
                          param="trace_export")
    choice = exporter_choice(env)
    if choice is None:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=own_resource(env), sampler=sampler_from_env(env))
    if export == "process":
        provider.add_span_processor(HandOffSpanProcessor(env))
    else:
        provider.add_span_processor(BatchSpanProcessor(build_exporter(choice)))
    return provider


def sampler_from_env(env: Mapping[str, str]) -> Any:
    """The sampler `OTEL_TRACES_SAMPLER` / `_ARG` name in `env` (which includes `.env`), or None
    (the SDK then reads the process environment, defaulting to parentbased_always_on)."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return None
    try:
        ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG") or 1.0)
    except ValueError:
        ratio = 1.0
    ratio = min(max(ratio, 0.0), 1.0)
    samplers = {"always_on": lambda: sampling.ALWAYS_ON, "always_off": lambda: sampling.ALWAYS_OFF,
                "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
                "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
                "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
                "parentbased_traceidratio": lambda: sampling.ParentBasedTraceIdRatio(ratio)}
    make = samplers.get(name)
    if make is None:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported (use one of %s); sampling every request",
                    name, ", ".join(samplers))
        return sampling.ParentBased(sampling.ALWAYS_ON)
    return make()


def _traceparent(context: Any) -> dict[str, str]:
    """What TraceContextTextMapPropagator.inject writes, without building a Context for it."""
    if not context.is_valid:  # a no-op tracer (OTEL_SDK_DISABLED)
        return {}
    out = {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}
    if context.trace_state:
        out["tracestate"] = context.trace_state.to_header()
    return out


class Tracing:
    """Starts request traces on one TracerProvider (tiergate's own, or one the caller hands in)."""

    def __init__(self, provider: Any = None, *, owned: bool = False, log_prompts: bool = False,
                 attempts: str = "auto", names: tuple[GenAINames, ...] = (NAMES[LATEST],)):
        if attempts not in TRACE_ATTEMPTS:
            raise ConfigError(f"trace_attempts = {attempts!r}: expected one of {', '.join(TRACE_ATTEMPTS)}",
                              param="trace_attempts")
        self.provider = provider
        self._owned = owned
        self.log_prompts = log_prompts
        self.attempt_spans = attempts == "always"
        # span attributes whose name differs between the conventions' versions (both when duplicating)
        self.cache_write_attributes = tuple(n.cache_write_attribute for n in names)
        self._tracer = (provider.get_tracer("tiergate", schema_url=names[0].schema_url)
                        if provider is not None else None)
        # tiergate's own provider hands its spans to an exporter process (see provider_from_env)
        processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", ()) if owned else ()
        self._hand_offs = [p for p in processors if isinstance(p, HandOffSpanProcessor)]

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, log_prompts: bool = False, export: str = "process",
                 attempts: str = "auto", names: tuple[GenAINames, ...] = (NAMES[LATEST],)) -> Tracing:
        return cls(provider_from_env(env, export=export), owned=True, log_prompts=log_prompts,
                   attempts=attempts, names=names)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def dropped_spans(self) -> int:
        """Spans tiergate's own exporter hand-off had to drop (its queue was full), so far."""
        return sum(p.dropped for p in self._hand_offs)

    def start(self, operation: str, started: float, payload: Mapping[str, Any],
              headers: Mapping[str, str] | None) -> RequestTrace | None:
        """The request's span, started at `started` (a perf_counter reading), or None when off."""
        tracer = self._tracer
        if tracer is None:
            return None
        parent = _PROPAGATOR.extract(headers) if headers and "traceparent" in headers else None
        start_ns = time.time_ns() - int((time.perf_counter() - started) * 1e9)
        requested = payload.get("model")
        if isinstance(requested, str) and len(requested) > MAX_MODEL_NAME:  # refused at resolution: kept short
            requested = requested[:MAX_MODEL_NAME]
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation}
        if isinstance(requested, str):
            attributes["gen_ai.request.model"] = requested
        if self.log_prompts:
            messages = payload.get("messages", payload.get("prompt", payload.get("input")))
            if messages is not None:
                import orjson
                attributes["gen_ai.input.messages"] = orjson.dumps(messages).decode()
        # named as it will end when the model is known now (the sampler sees the final name)
        name = f"{operation} {requested}" if isinstance(requested, str) and requested else operation
        span = tracer.start_span(name, context=parent, kind=SpanKind.CLIENT,
                                 attributes=attributes, start_time=start_ns)
        return RequestTrace(self, span, operation, requested if isinstance(requested, str) else None)

    def close(self) -> None:
        """Flush and stop the exporter (blocking: call it off the event loop)."""
        if self._owned and self.provider is not None:
            self._owned = False  # once: the SDK refuses a second shutdown
            self.provider.shutdown()


class RequestTrace:
    """One request's span, its attempts (an event, or child spans); the dispatcher's attempt observer."""

    __slots__ = ("_tracing", "span", "operation", "requested_model", "_context", "_attempt", "_first",
                 "_entries", "response_model", "finish_reasons", "recording", "_upstream_headers")

    def __init__(self, tracing: Tracing, span: Any, operation: str, requested_model: str | None):
        self._tracing = tracing
        self.span = span
        self.operation = operation
        self.requested_model = requested_model
        self._context: Any = None  # the span as a parent Context, made when a child span is
        self._attempt: Any = None  # the open attempt: a child span, or (ref, start ns) while it may stay an event
        self._first: Any = None  # a single ended attempt, (ref, start ns, end ns, Attempt), not yet reported
        self._entries = 0  # attempts started or skipped so far
        self._upstream_headers: dict[str, str] | None = None
        self.recording = span.is_recording()  # False when sampled out: propagate, set nothing
        self.response_model: str | None = None
        self.finish_reasons: tuple[str, ...] = ()

    # -- the dispatcher's hooks ----------------------------------------------------------------

    def attempt_started(self, ref: ModelRef, headers: Mapping[str, str] | None) -> dict[str, str]:
        """Note the attempt's start; returns the headers to send upstream (with a traceparent)."""
        self._end_attempt(None)
        self._entries += 1
        carrier = dict(headers) if headers else {}
        if not self.recording or (self._entries == 1 and not self._tracing.attempt_spans):
            # the request span itself goes upstream (a sampled-out one too: nothing is exported)
            if self.recording:
                self._attempt = (ref, time.time_ns())
            upstream = self._upstream_headers
            if upstream is None:
                upstream = self._upstream_headers = _traceparent(self.span.get_span_context())
            carrier.update(upstream)
            return carrier
        self._report_first_as_span()
        span = self._child(ref, time.time_ns())
        self._attempt = span
        carrier.update(_traceparent(span.get_span_context()))
        return carrier

    def attempt_ended(self, attempt: Attempt) -> None:
        """The attempt's outcome; a candidate skipped without a call (breaker open, ...) is an event."""
        if self._attempt is None:
            if not self.recording:
                return
            self._entries += 1
            self._report_first_as_span()
            self.span.add_event("tiergate.attempt.skipped", {
                "gen_ai.provider.name": attempt.provider, "gen_ai.request.model": attempt.model,
                "tiergate.attempt.outcome": attempt.outcome})
            return
        self._end_attempt(attempt)

    def _child(self, ref: ModelRef, start_ns: int) -> Any:
        if self._context is None:
            self._context = trace.set_span_in_context(self.span)
        return self._tracing._tracer.start_span(
            f"{self.operation} {ref.model}", context=self._context, kind=SpanKind.CLIENT, start_time=start_ns,
            attributes={"gen_ai.operation.name": self.operation, "gen_ai.request.model": ref.model,
                        "gen_ai.provider.name": ref.provider})

    def _end_attempt(self, attempt: Attempt | None) -> None:
        open_attempt = self._attempt
        if open_attempt is None:
            return
        self._attempt = None
        if type(open_attempt) is tuple:  # the first attempt, reported at the end (or as a span, if another follows)
            self._first = (*open_attempt, time.time_ns(), attempt)
            return
        _end_attempt_span(open_attempt, attempt)

    def _report_first_as_span(self) -> None:
        """Another attempt follows the first: the first becomes a child span, with its own times."""
        first = self._first
        if first is None:
            return
        self._first = None
        ref, start_ns, end_ns, attempt = first
        _end_attempt_span(self._child(ref, start_ns), attempt, end_ns)

    # -- the end of the request ----------------------------------------------------------------

    def finish(self, record: Any, server: tuple[str, int] | None = None) -> None:
        """Set the GenAI and tiergate attributes (the single attempt as an event), end the span.

        `server` is the answering provider's (host, port)."""
        self._end_attempt(None)
        span = self.span
        if not self.recording:
            span.end()
            return
        first = self._first
        if first is not None:  # one attempt: an event on the request span
            ref, start_ns, end_ns, attempt = first
            event: dict[str, Any] = {"tiergate.attempt.outcome": attempt.outcome if attempt else "abandoned",
                                     "gen_ai.provider.name": ref.provider, "gen_ai.request.model": ref.model,
                                     "tiergate.attempt.duration_s": (end_ns - start_ns) / 1e9}
            if attempt is not None and attempt.status is not None:
                event["http.response.status_code"] = attempt.status
            span.add_event("tiergate.attempt", event, end_ns)
        ref = record.ref
        if not self.requested_model:  # otherwise named so at the start
            span.update_name(f"{self.operation} {record.route or (ref.model if ref else '')}".rstrip())
        # set in one call: each call costs the SDK a lock and a validation pass
        attrs: dict[str, Any] = {
            "gen_ai.request.stream": record.stream,
            "tiergate.route": record.route, "tiergate.cache": record.cache,
            "tiergate.attempts": tried(record.attempts), "tiergate.request_id": record.request_id,
        }
        if self.requested_model is None and record.route:
            attrs["gen_ai.request.model"] = record.route
        if record.key_name is not None:  # the inbound key's name, never the key
            attrs["tiergate.key"] = record.key_name
        if ref is not None:
            attrs["gen_ai.provider.name"] = ref.provider
            attrs["gen_ai.response.model"] = self.response_model or ref.model
            if server is not None:
                attrs["server.address"], attrs["server.port"] = server
        usage = record.usage
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt
            attrs["gen_ai.usage.output_tokens"] = usage.completion
            if usage.cache_read:
                attrs["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read
            if usage.cache_write:
                for name in self._tracing.cache_write_attributes:
                    attrs[name] = usage.cache_write
            if usage.reasoning:
                attrs["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning
        if record.cost_usd is not None:
            attrs["tiergate.cost_usd"] = record.cost_usd
        if self.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = self.finish_reasons
        if record.first_byte_at is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = round(record.first_byte_at - record.started, 6)
        if record.error or record.status >= 400:
            cause = record.error or str(record.status)
            attrs["error.type"] = cause
            attrs["http.response.status_code"] = record.status
            span.set_status(Status(StatusCode.ERROR, cause))
        span.set_attributes(attrs)
        span.end()


def _end_attempt_span(span: Any, attempt: Attempt | None, end_ns: int | None = None) -> None:
    if not span.is_recording():
        span.end(end_ns)
        return
    if attempt is None:
        span.set_attribute("tiergate.attempt.outcome", "abandoned")
    elif attempt.outcome == "ok":
        span.set_attribute("tiergate.attempt.outcome", "ok")
    else:
        attrs: dict[str, Any] = {"tiergate.attempt.outcome": attempt.outcome, "error.type": attempt.outcome}
        if attempt.status is not None:
            attrs["http.response.status_code"] = attempt.status
        span.set_attributes(attrs)
        span.set_status(Status(StatusCode.ERROR, attempt.outcome))
    span.end(end_ns)
