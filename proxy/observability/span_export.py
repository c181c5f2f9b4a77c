"""Exporting tiergate's spans: the exporter the `OTEL_*` variables name, and a child process that runs it.

Encoding spans to OTLP costs the SDK more than building them (~24 µs a span), and in an export
thread it shares the serving process's GIL. So by default (`TIERGATE_TRACE_EXPORT=process`) the
serving process only turns each finished span into a plain tuple (`HandOffSpanProcessor.on_end`),
and a thread of its own writes batches of them (orjson: ~1 µs a span) into a pipe, whose other end is a child process
(`python -m proxy.span_export`) that rebuilds `ReadableSpan`s and runs the SDK's own
`BatchSpanProcessor` and OTLP exporter. The hand-off is bounded: when the queue is full (the child
is slow or gone) a span is dropped and counted, and a request never waits for it.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.sdk.trace import SpanProcessor

log = logging.getLogger("tiergate")

_TRUE = {"1", "true", "yes", "on"}
DEFAULT_OTLP_ENDPOINT = "http://localhost:4318"
PROTOCOLS = ("http/protobuf", "http/json")
_HEADER = struct.Struct("<I")  # the length of each batch on the pipe
_LOW_64 = (1 << 64) - 1  # trace ids travel as two 64-bit halves (JSON numbers stop at 64 bits)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder that holds the `proxy` package


def exporter_choice(env: Mapping[str, str]) -> tuple[str, dict[str, Any]] | None:
    """What exporter the `OTEL_*` variables in `env` ask for, as (kind, arguments), or None (tracing off).

    OTLP over HTTP, protobuf (the default) or JSON (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json`, with the
    optional `opentelemetry-exporter-otlp-json-http` installed); `console` prints spans (debugging)."""
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
        return "console", {"service_name": env.get("OTEL_SERVICE_NAME") or "tiergate"}
    if not {"otlp", "otlp_proto_http", "otlp_json_http"} & set(names):
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (use otlp or console); tracing is off",
                    ",".join(names))
        return None
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or ("http/json" if "otlp_json_http" in names else "http/protobuf")).strip().lower()
    if protocol not in PROTOCOLS:
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported (use %s); exporting over http/protobuf",
                    protocol, " or ".join(PROTOCOLS))
        protocol = "http/protobuf"
    if protocol == "http/json" and not json_exporter_available():
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=http/json needs the opentelemetry-exporter-otlp-json-http "
                    "package (pip install 'tiergate[otlp-json]'); exporting over http/protobuf")
        protocol = "http/protobuf"
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
    return protocol, {"endpoint": traces_endpoint, "headers": parse_env_headers(raw_headers, liberal=True),
                      "timeout": seconds}


def json_exporter_available() -> bool:
    try:
        import opentelemetry.exporter.otlp.json.http.trace_exporter  # noqa: F401
    except ImportError:
        return False
    return True


def build_exporter(choice: tuple[str, dict[str, Any]]) -> Any:
    """The SDK exporter for an `exporter_choice`."""
    kind, arguments = choice
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter(**arguments)
    if kind == "http/json":
        from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter as JSONSpanExporter
        return JSONSpanExporter(**arguments)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(**arguments)


def exporter_from_env(env: Mapping[str, str]) -> Any:
    """The span exporter the `OTEL_*` variables ask for, or None (tracing off)."""
    choice = exporter_choice(env)
    return build_exporter(choice) if choice is not None else None


def own_resource(env: Mapping[str, str]) -> Any:
    """tiergate's Resource (`OTEL_SERVICE_NAME`, default `tiergate`, and `OTEL_RESOURCE_ATTRIBUTES`),
    with its hash computed once: the OTLP encoder groups every batch by resource and hashes each
    span's (a JSON dump of the attributes, ~2.5 µs a span); a Resource never changes."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    created = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or "tiergate"})

    class HashedOnceResource(Resource):
        def __init__(self, attributes: Any, schema_url: str | None = None):
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedOnceResource(created.attributes, created.schema_url)


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


class HandOffSpanProcessor(SpanProcessor):
    """A SpanProcessor that hands finished spans, as tuples, to a child process exporting them.

    `on_end` (on the request's path) builds one tuple and appends it to a bounded deque; a thread
    serialises batches (orjson) into the child's stdin (the write itself runs without the GIL). The bound is
    `OTEL_BSP_MAX_QUEUE_SIZE` (2048), batches are at most `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512)
    spans and leave at least every `OTEL_BSP_SCHEDULE_DELAY` ms (capped at 500: the child batches
    again before it exports)."""

    def __init__(self, env: Mapping[str, str]):
        self._queue: deque[tuple[Any, ...]] = deque()
        self._max_queue = _int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self._max_batch = min(_int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self._max_queue)
        self._delay_s = min(_int_env(env, "OTEL_BSP_SCHEDULE_DELAY", 500), 500) / 1000
        self.dropped = 0  # spans not handed off: the queue was full, or the child had gone
        self.handed_off = 0
        self._scope: Any = None
        self._scope_key: tuple[str, str | None, str | None] = ("", None, None)
        self._wake = threading.Event()
        self._stopping = False
        self._child_gone = False
        child_env = {**os.environ, **{k: v for k, v in env.items() if k.startswith("OTEL_")}}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_PARENT, os.environ.get("PYTHONPATH"))))
        self._child = subprocess.Popen([sys.executable, "-m", "proxy.observability.span_export"], stdin=subprocess.PIPE,
                                       env=child_env, close_fds=True)
        self._thread = threading.Thread(target=self._hand_off, name="tiergate-span-hand-off", daemon=True)
        self._thread.start()

    # -- SpanProcessor ---------------------------------------------------------------------------

    def on_end(self, span: Any) -> None:
        queue = self._queue
        if len(queue) >= self._max_queue or self._child_gone:
            self.dropped += 1
            return
        context, parent, status = span.context, span.parent, span.status
        scope = span.instrumentation_scope
        if scope is not self._scope:  # one tracer: the same object every time
            self._scope = scope
            self._scope_key = (scope.name, scope.version, scope.schema_url) if scope is not None else ("", None, None)
        events = span.events
        trace_id = context.trace_id
        queue.append((
            span.name, trace_id >> 64, trace_id & _LOW_64, context.span_id, int(context.trace_flags),
            context.trace_state.to_header() if context.trace_state else None,
            parent.span_id if parent is not None else None, parent is not None and parent.is_remote,
            span.kind.value, span.start_time, span.end_time, _plain(getattr(span, "_attributes", None), span),
            [(e.name, e.timestamp, _plain(e.attributes)) for e in events] if events else None,
            status.status_code.value, status.description, self._scope_key))
        if len(queue) >= self._max_batch:
            self._wake.set()

    def shutdown(self) -> None:
        """Hand off what is queued, then let the child flush its exporter and exit (blocking)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(30)
        try:
            self._child.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self._child.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("the span exporter process did not finish within 30 s; stopping it")
            self._child.kill()
            self._child.wait()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Hand off what is queued now (the child exports it with its next batch)."""
        self._wake.set()
        return True

    # -- the hand-off thread ---------------------------------------------------------------------

    def _hand_off(self) -> None:
        out = self._child.stdin
        queue, popleft = self._queue, self._queue.popleft
        while True:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            while queue:
                batch = [popleft() for _ in range(min(len(queue), self._max_batch))]
                if self._child_gone:
                    self.dropped += len(batch)
                    continue
                try:
                    data = orjson.dumps(batch, default=str)
                except TypeError as exc:  # e.g. an integer attribute beyond 64 bits
                    self.dropped += len(batch)
                    log.warning("spans could not be handed to the exporter process: %s", exc)
                    continue
                try:
                    out.write(_HEADER.pack(len(data)))  # type: ignore[union-attr]
                    out.write(data)  # type: ignore[union-attr]
                    out.flush()  # type: ignore[union-attr]
                    self.handed_off += len(batch)
                except (OSError, ValueError):
                    self._child_gone = True
                    self.dropped += len(batch)
                    log.warning("the span exporter process has gone (exit code %s): spans are dropped and "
                                "counted in tiergate_trace_spans_dropped_total", self._child.poll())
            if self._stopping:
                return


def _plain(attributes: Any, span: Any = None) -> Any:
    """A span's or event's attributes as a mapping orjson writes. The SDK's BoundedAttributes keeps
    them in a plain dict, immutable once the span has ended: that dict is used as it is (copying
    through the Mapping interface costs ~4 µs a span); anything else is copied."""
    found = getattr(attributes, "_dict", None)
    if isinstance(found, dict):
        return found
    if attributes is None:
        return dict(span.attributes) if span is not None else {}
    return dict(attributes)


# -- the child process ---------------------------------------------------------------------------


def _rebuild(item: tuple[Any, ...], resource: Any, scopes: dict[tuple[Any, ...], Any]) -> Any:
    """A `ReadableSpan` from `HandOffSpanProcessor.on_end`'s tuple (read back from JSON: a list)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

    (name, trace_high, trace_low, span_id, flags, state, parent_id, parent_remote, kind, start, end, attributes,
     events, code, description, scope_key) = item
    trace_id = (trace_high << 64) | trace_low
    scope_key = tuple(scope_key)
    flags = TraceFlags(flags)
    context = SpanContext(trace_id, span_id, False, flags, TraceState.from_header([state]) if state else None)
    parent = SpanContext(trace_id, parent_id, parent_remote, flags) if parent_id is not None else None
    scope = scopes.get(scope_key)
    if scope is None:
        scope = scopes[scope_key] = InstrumentationScope(*scope_key)
    return ReadableSpan(
        name, context, parent, resource, attributes,
        [Event(event_name, event_attributes, timestamp) for event_name, timestamp, event_attributes in events or ()],
        (), SpanKind(kind), status=Status(StatusCode(code), description), start_time=start, end_time=end,
        instrumentation_scope=scope)


def run_child(stream: Any, env: Mapping[str, str]) -> None:
    """Read batches from `stream` until it ends, export them with the SDK's BatchSpanProcessor, flush,
    return. Never more than its queue holds is fed to it between flushes, so it drops nothing: when
    the exporter is slow this process reads more slowly, the pipe fills, and the serving process
    drops (and counts) instead."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    choice = exporter_choice(env)
    if choice is None:
        return
    room = _int_env(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    processor = BatchSpanProcessor(build_exporter(choice), max_queue_size=room,
                                   max_export_batch_size=min(_int_env(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
                                                             room))
    resource = own_resource(env)
    scopes: dict[tuple[Any, ...], Any] = {}
    read = stream.read
    queued = 0
    try:
        while True:
            header = read(_HEADER.size)
            if len(header) < _HEADER.size:
                break
            batch = orjson.loads(read(_HEADER.unpack(header)[0]))
            if queued + len(batch) > room:
                processor.force_flush()  # exports what is queued (blocking), making room
                queued = 0
            for item in batch:
                processor.on_end(_rebuild(item, resource, scopes))
            queued += len(batch)
    finally:
        processor.shutdown()


def main() -> None:
    # the parent stops this process by closing the pipe, after its last spans: a Ctrl-C or a SIGTERM
    # sent to the whole process group must not cut the export short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    run_child(sys.stdin.buffer, os.environ)


if __name__ == "__main__":
    main()
