"""The span exporter process: spans handed off as tuples, rebuilt and exported by the SDK in a child
process; the hand-off is bounded (drops counted, never waiting) and survives the child's death."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from proxy.observability.metrics import PrometheusMetrics
from proxy.observability.span_export import HandOffSpanProcessor
from proxy.observability.tracing import Tracing, provider_from_env

from ..telemetry_support import parse_metrics, value


class Sink:
    """An OTLP/HTTP protobuf receiver in a thread, counting spans."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                message = trace_service_pb2.ExportTraceServiceRequest()
                message.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                sink.spans.extend(span for rs in message.resource_spans for ss in rs.scope_spans for span in ss.spans)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"


@pytest.fixture
def sink() -> Iterator[Sink]:
    made = Sink()
    yield made
    made.server.shutdown()


def hand_off_of(provider: Any) -> HandOffSpanProcessor:
    [processor] = provider._active_span_processor._span_processors
    assert isinstance(processor, HandOffSpanProcessor)
    return processor


def test_spans_round_trip_through_the_exporter_process(sink):
    provider = provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_SERVICE_NAME": "svc"})
    tracer = provider.get_tracer("tiergate", schema_url="https://opentelemetry.io/schemas/gen-ai/1.42.0")
    with tracer.start_as_current_span("parent", attributes={"a.string": "x", "a.list": ("stop", "length")}) as parent:
        span = tracer.start_span("child", attributes={"an.int": 7, "a.float": 0.5, "a.bool": True})
        span.add_event("happened", {"n": 1})
        span.end()
    provider.shutdown()  # the child exports what it has, then exits
    assert {s.name for s in sink.spans} == {"parent", "child"}
    child = next(s for s in sink.spans if s.name == "child")
    outer = next(s for s in sink.spans if s.name == "parent")
    assert child.parent_span_id == outer.span_id and child.trace_id == outer.trace_id
    assert outer.trace_id == parent.get_span_context().trace_id.to_bytes(16, "big")
    attrs = {kv.key: kv.value for kv in child.attributes}
    assert attrs["an.int"].int_value == 7 and attrs["a.float"].double_value == 0.5 and attrs["a.bool"].bool_value
    assert [v.string_value for v in {kv.key: kv.value for kv in outer.attributes}["a.list"].array_value.values] == [
        "stop", "length"]
    assert [e.name for e in child.events] == ["happened"]
    assert child.start_time_unix_nano <= child.events[0].time_unix_nano <= child.end_time_unix_nano


def test_hand_off_is_bounded_counts_drops_and_never_waits(sink):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_BSP_MAX_QUEUE_SIZE": "64",
           "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16"}
    provider = provider_from_env(env)
    processor = hand_off_of(provider)
    tracing = Tracing(provider, owned=True)
    tracer = provider.get_tracer("tiergate")
    os.kill(processor._child.pid, signal.SIGSTOP)  # the exporter process stops reading: the pipe fills
    try:
        started = time.monotonic()
        for i in range(20_000):
            tracer.start_span(f"span {i}", attributes={"filler": "x" * 200}).end()
        assert time.monotonic() - started < 10  # no span waited for the stopped reader
        assert processor.dropped > 0 and tracing.dropped_spans() == processor.dropped
    finally:
        os.kill(processor._child.pid, signal.SIGCONT)
    tracing.close()
    # every span was either exported or counted as dropped
    assert len(sink.spans) + processor.dropped == 20_000
    # and the count reaches /metrics
    metrics = PrometheusMetrics()
    metrics.spans_dropped_total(tracing.dropped_spans())
    metrics.spans_dropped_total(tracing.dropped_spans())  # a running total: counted once
    samples = parse_metrics(metrics.render().decode())
    assert value(samples, "tiergate_trace_spans_dropped_total") == processor.dropped


def test_exporter_process_gone_drops_and_counts(sink):
    provider = provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "10"})
    processor = hand_off_of(provider)
    tracer = provider.get_tracer("tiergate")
    processor._child.kill()
    processor._child.wait()
    deadline = time.monotonic() + 10
    while processor.dropped == 0 and time.monotonic() < deadline:
        tracer.start_span("after").end()
        processor.force_flush()
        time.sleep(0.01)
    assert processor.dropped > 0
    provider.shutdown()  # returns though the child has gone


async def test_served_spans_leave_through_the_exporter_process(upstream, http, sink):
    """`tiergate serve`'s default: the serving process exports nothing itself."""
    from ..conftest import table_doc
    from ..telemetry_support import config_with, running

    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
    async with running(table_doc(upstream), config_with(environ)) as (url, router):
        processor = hand_off_of(router.telemetry.tracing.provider)
        assert processor._child.poll() is None
        async with http.post(url + "/v1/chat/completions", json={"model": "auto", "messages": [
                {"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200
        async with http.get(url + "/metrics") as resp:
            assert value(parse_metrics(await resp.text()), "tiergate_trace_spans_dropped_total") == 0
    assert processor._child.returncode == 0
    assert [s.name for s in sink.spans] == ["chat auto"]
