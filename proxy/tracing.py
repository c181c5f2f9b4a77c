"""OpenTelemetry traces: one span per request (GenAI semantic conventions), one child per upstream attempt.

Tracing is on only when the standard `OTEL_*` variables name an exporter (an OTLP endpoint or
`OTEL_TRACES_EXPORTER`), or when the caller hands in its own `TracerProvider`; otherwise
`Tracing.start()` returns None and the request path does no tracing work at all. The client's
W3C `traceparent` is the parent of the request span; each attempt's span is what is sent
upstream as `traceparent`. Prompt and completion text go into spans only with `log_prompts`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .dispatch import Attempt, tried
from .types import ModelRef

log = logging.getLogger("tiergate")

_PROPAGATOR = TraceContextTextMapPropagator()
_TRUE = {"1", "true", "yes", "on"}
DEFAULT_OTLP_ENDPOINT = "http://localhost:4318"


def exporter_from_env(env: Mapping[str, str]) -> Any:
    """The span exporter the `OTEL_*` variables ask for, or None (tracing off).

    OTLP over HTTP/protobuf is the one supported protocol; `console` prints spans (debugging).
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not names:
        if not endpoint:
            return None
        names = ["otlp"]
    if "none" in names:
        return None
    if "console" in names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter(service_name=env.get("OTEL_SERVICE_NAME") or "tiergate")
    if not {"otlp", "otlp_proto_http"} & set(names):
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (use otlp or console); tracing is off",
                    ",".join(names))
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting over http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.util.re import parse_env_headers

    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not traces_endpoint:
        traces_endpoint = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_OTLP_ENDPOINT).rstrip("/") + "/v1/traces"
    raw_headers = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS") or ""
    timeout = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT") or "10"
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = 10.0
    return OTLPSpanExporter(endpoint=traces_endpoint, headers=parse_env_headers(raw_headers, liberal=True),
                            timeout=seconds)


def provider_from_env(env: Mapping[str, str]) -> Any:
    """A TracerProvider exporting in batches (off the event loop), or None when nothing is configured."""
    exporter = exporter_from_env(env)
    if exporter is None:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    created = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or "tiergate"})
    provider = TracerProvider(resource=_hashed_once(created), sampler=sampler_from_env(env))
    provider.add_span_processor(BatchSpanProcessor(exporter))
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


def _hashed_once(resource: Any) -> Any:
    """`resource` with its hash computed once. The OTLP encoder groups every batch by resource and
    hashes each span's (the SDK hashes a JSON dump of the attributes every time, ~2.5 µs a span);
    a Resource never changes."""
    from opentelemetry.sdk.resources import Resource

    class HashedOnceResource(Resource):
        def __init__(self, attributes: Any, schema_url: str | None = None):
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedOnceResource(resource.attributes, resource.schema_url)


class Tracing:
    """Starts request traces on one TracerProvider (tiergate's own, or one the caller hands in)."""

    def __init__(self, provider: Any = None, *, owned: bool = False, log_prompts: bool = False):
        self.provider = provider
        self._owned = owned
        self.log_prompts = log_prompts
        self._tracer = provider.get_tracer("tiergate") if provider is not None else None
        # tiergate's own provider samples with an OTEL_TRACES_SAMPLER (parent-based, or by trace id, or
        # always on/off): a span under a sampled-out request span is sampled out too, so its context
        # is made here (a new span id) rather than by the SDK (~5 µs a span, on 9 requests in 10 at 10%)
        self._unsampled_ids = getattr(provider, "id_generator", None) if owned else None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, log_prompts: bool = False) -> Tracing:
        return cls(provider_from_env(env), owned=True, log_prompts=log_prompts)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start(self, operation: str, started: float, payload: Mapping[str, Any],
              headers: Mapping[str, str] | None) -> RequestTrace | None:
        """The request's span, started at `started` (a perf_counter reading), or None when off."""
        tracer = self._tracer
        if tracer is None:
            return None
        parent = _PROPAGATOR.extract(headers) if headers and "traceparent" in headers else None
        start_ns = time.time_ns() - int((time.perf_counter() - started) * 1e9)
        requested = payload.get("model")
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
        span = tracer.start_span(name, context=parent, kind=SpanKind.INTERNAL,
                                 attributes=attributes, start_time=start_ns)
        return RequestTrace(tracer, span, operation, requested if isinstance(requested, str) else None,
                            self._unsampled_ids)

    def close(self) -> None:
        """Flush and stop the exporter (blocking: call it off the event loop)."""
        if self._owned and self.provider is not None:
            self._owned = False  # once: the SDK refuses a second shutdown
            self.provider.shutdown()


class RequestTrace:
    """One request's span and its attempts' child spans; the dispatcher's attempt observer."""

    __slots__ = ("_tracer", "span", "operation", "requested_model", "_context", "_attempt",
                 "response_model", "finish_reasons", "recording", "_unsampled_ids")

    def __init__(self, tracer: Any, span: Any, operation: str, requested_model: str | None,
                 unsampled_ids: Any = None):
        self._tracer = tracer
        self._unsampled_ids = unsampled_ids
        self.span = span
        self.operation = operation
        self.requested_model = requested_model
        self._context = trace.set_span_in_context(span)
        self._attempt: Any = None
        self.recording = span.is_recording()  # False when sampled out: propagate, set nothing
        self.response_model: str | None = None
        self.finish_reasons: tuple[str, ...] = ()

    # -- the dispatcher's hooks ----------------------------------------------------------------

    def attempt_started(self, ref: ModelRef, headers: Mapping[str, str] | None) -> dict[str, str]:
        """Start the attempt's span; returns the headers to send upstream (with its traceparent)."""
        self._end_attempt(None)
        if not self.recording and self._unsampled_ids is not None:
            parent = self.span.get_span_context()
            span: Any = trace.NonRecordingSpan(trace.SpanContext(
                parent.trace_id, self._unsampled_ids.generate_span_id(), is_remote=False,
                trace_flags=parent.trace_flags, trace_state=parent.trace_state))
        else:
            span = self._tracer.start_span(
                f"{self.operation} {ref.model}", context=self._context, kind=SpanKind.CLIENT,
                attributes={"gen_ai.operation.name": self.operation, "gen_ai.request.model": ref.model,
                            "gen_ai.provider.name": ref.provider})
        self._attempt = span
        carrier = dict(headers) if headers else {}
        # what TraceContextTextMapPropagator.inject writes, without building a Context for it
        context = span.get_span_context()
        if context.is_valid:  # not with a no-op tracer (OTEL_SDK_DISABLED)
            carrier["traceparent"] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
            if context.trace_state:
                carrier["tracestate"] = context.trace_state.to_header()
        return carrier

    def attempt_ended(self, attempt: Attempt) -> None:
        """End the open attempt span with the attempt's outcome; skipped candidates become events."""
        if self._attempt is None:
            if not self.recording:
                return
            self.span.add_event("tiergate.attempt.skipped", {
                "gen_ai.provider.name": attempt.provider, "gen_ai.request.model": attempt.model,
                "tiergate.attempt.outcome": attempt.outcome})
            return
        self._end_attempt(attempt)

    def _end_attempt(self, attempt: Attempt | None) -> None:
        span = self._attempt
        if span is None:
            return
        self._attempt = None
        if not self.recording:
            span.end()
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
        span.end()

    # -- the end of the request ----------------------------------------------------------------

    def finish(self, record: Any) -> None:
        """Name the span `{operation} {model}`, set the GenAI and tiergate attributes, end it."""
        self._end_attempt(None)
        span = self.span
        if not self.recording:
            span.end()
            return
        ref = record.ref
        if not self.requested_model:  # otherwise named so at the start
            span.update_name(f"{self.operation} {record.route or (ref.model if ref else '')}".rstrip())
        # few attributes on purpose: each one costs the SDK a validation pass on the hot path
        attrs: dict[str, Any] = {
            "tiergate.route": record.route, "tiergate.cache": record.cache,
            "tiergate.attempts": tried(record.attempts), "tiergate.request_id": record.request_id,
        }
        if self.requested_model is None and record.route:
            attrs["gen_ai.request.model"] = record.route
        if ref is not None:
            attrs["gen_ai.provider.name"] = ref.provider
            attrs["gen_ai.response.model"] = self.response_model or ref.model
        usage = record.usage
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt
            attrs["gen_ai.usage.output_tokens"] = usage.completion
        if record.cost_usd is not None:
            attrs["tiergate.cost_usd"] = record.cost_usd
        if self.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = self.finish_reasons
        if record.first_byte_at is not None:
            attrs["tiergate.stream"] = True
            attrs["tiergate.time_to_first_chunk_s"] = round(record.first_byte_at - record.started, 6)
        if record.error or record.status >= 400:
            cause = record.error or str(record.status)
            attrs["error.type"] = cause
            attrs["http.response.status_code"] = record.status
            span.set_status(Status(StatusCode.ERROR, cause))
        span.set_attributes(attrs)
        span.end()
