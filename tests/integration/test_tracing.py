"""OpenTelemetry: one span per request (GenAI attributes; a single attempt as an event, several as
child spans), traceparent in and upstream, export over real OTLP/HTTP from the exporter process,
and nothing at all when no exporter is configured."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.observability.tracing import exporter_from_env
from proxy.outcome import Attempt

from ..conftest import BACKUP_KEY, PRIMARY_KEY, table_doc
from ..telemetry_support import PRICING, config_with, running
from ..upstream import Fail

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "a secret prompt"}]}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def requests_of(finished: Any) -> list[Any]:
    """The request spans (attempt child spans carry `tiergate.attempt.outcome` instead)."""
    return [s for s in finished if "tiergate.route" in s.attributes]


def attempts_of(finished: Any) -> list[Any]:
    return sorted((s for s in finished if "tiergate.attempt.outcome" in s.attributes), key=lambda s: s.start_time)


async def test_request_span_follows_genai_conventions(upstream, backup, http, spans):
    provider, exporter = spans
    doc = {**table_doc(upstream, backup), "pricing": PRICING}
    async with running(doc, config_with(), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT,
                             headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"}) as resp:
            assert resp.status == 200
            await resp.read()
    finished = exporter.get_finished_spans()
    [request] = finished  # one attempt: one span
    assert request.name == "chat auto" and request.kind == SpanKind.CLIENT
    a = request.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "auto"
    assert a["gen_ai.response.model"] == "model-a"
    assert a["gen_ai.provider.name"] == "primary"
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == upstream.port
    assert a["gen_ai.request.stream"] is False
    assert a["gen_ai.usage.input_tokens"] == 10 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["tiergate.route"] == "general_purpose:standard"
    assert a["tiergate.cache"] == "bypass" and a["tiergate.attempts"] == 1
    assert a["tiergate.cost_usd"] == pytest.approx(16e-6)
    # the client's traceparent is the request span's parent; the attempt is an event on it
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == PARENT_ID
    [event] = request.events
    assert event.name == "tiergate.attempt"
    assert dict(event.attributes) == {"tiergate.attempt.outcome": "ok", "gen_ai.provider.name": "primary",
                                      "gen_ai.request.model": "model-a", "http.response.status_code": 200,
                                      "tiergate.attempt.duration_s": event.attributes["tiergate.attempt.duration_s"]}
    assert 0 < event.attributes["tiergate.attempt.duration_s"] < 5
    assert request.start_time < event.timestamp <= request.end_time
    # what went upstream is the request span's context, and the client's tracestate
    sent = upstream.requests[-1].headers
    assert sent["traceparent"] == f"00-{TRACE_ID}-{request.context.span_id:016x}-01"
    assert sent["tracestate"] == "vendor=1"
    # no prompt text in spans unless log_prompts is on
    for span in finished:
        assert "a secret prompt" not in str(dict(span.attributes)) + str(span.events)


async def test_fallback_gives_one_child_span_per_attempt(upstream, backup, http, spans):
    provider, exporter = spans
    upstream.push(Fail(500))
    async with running(table_doc(upstream, backup), config_with(), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
    finished = exporter.get_finished_spans()
    [request] = requests_of(finished)
    attempts = attempts_of(finished)
    assert len(finished) == 3 and request.events == ()
    assert [s.attributes["tiergate.attempt.outcome"] for s in attempts] == ["http_500", "ok"]
    assert [s.name for s in attempts] == ["chat model-a", "chat model-b"]
    assert all(s.kind == SpanKind.CLIENT for s in attempts)
    # the first attempt became a span afterwards, with its own times, inside the request's
    assert request.start_time <= attempts[0].start_time < attempts[0].end_time <= attempts[1].start_time
    assert attempts[1].end_time <= request.end_time
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].attributes["http.response.status_code"] == 500
    assert all(s.parent.span_id == request.context.span_id for s in attempts)
    assert request.attributes["tiergate.attempts"] == 2
    assert request.attributes["gen_ai.provider.name"] == "backup"
    # without an incoming traceparent tiergate starts the trace and still propagates it upstream
    assert request.parent is None
    assert backup.requests[-1].headers["traceparent"].split("-")[2] == f"{attempts[1].context.span_id:016x}"
    # the first call went out before anyone knew another would follow: under the request span
    assert upstream.requests[-1].headers["traceparent"].split("-")[2] == f"{request.context.span_id:016x}"


async def test_every_attempt_a_child_span_when_asked(upstream, backup, http, spans):
    provider, exporter = spans
    config = config_with({"TIERGATE_TRACE_ATTEMPTS": "always"})
    async with running(table_doc(upstream, backup), config, tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
    finished = exporter.get_finished_spans()
    [request] = requests_of(finished)
    [attempt] = attempts_of(finished)
    assert request.events == () and attempt.parent.span_id == request.context.span_id
    assert attempt.attributes["tiergate.attempt.outcome"] == "ok"
    assert upstream.requests[-1].headers["traceparent"].split("-")[2] == f"{attempt.context.span_id:016x}"


async def test_skipped_primary_makes_the_fallback_a_child_span(upstream, backup, http, spans):
    """A candidate skipped without a call (its breaker open) is an event; the call that follows is a
    fallback, so it is a child span."""
    provider, exporter = spans
    upstream.default = Fail(503)
    config = config_with(breaker_failure_threshold=1, breaker_recovery_timeout=60.0)
    async with running(table_doc(upstream, backup), config, tracer_provider=provider) as (url, _):
        for _ in range(2):  # the first trips primary's breaker; the second skips primary
            async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
    second = requests_of(exporter.get_finished_spans())[-1]
    assert [e.name for e in second.events] == ["tiergate.attempt.skipped"]
    assert second.events[0].attributes["tiergate.attempt.outcome"] == "breaker_open"
    children = [s for s in attempts_of(exporter.get_finished_spans()) if s.parent.span_id == second.context.span_id]
    assert [s.attributes["tiergate.attempt.outcome"] for s in children] == ["ok"]
    assert children[0].attributes["gen_ai.provider.name"] == "backup"


async def test_stream_span_reads_usage_from_the_tail(upstream, http, spans):
    provider, exporter = spans
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with running(table_doc(upstream), config_with(), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            await resp.read()
    [request] = exporter.get_finished_spans()
    assert request.attributes["gen_ai.usage.output_tokens"] == 3
    assert request.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert request.attributes["gen_ai.request.stream"] is True
    assert 0 < request.attributes["gen_ai.response.time_to_first_chunk"] < 5


async def test_failed_request_span_has_error_and_no_key(upstream, backup, http, spans):
    provider, exporter = spans
    upstream.default = Fail(503)
    backup.default = Fail(503)
    async with running(table_doc(upstream, backup), config_with(), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 503  # the providers' own
    finished = exporter.get_finished_spans()
    [request] = requests_of(finished)
    assert request.status.status_code == StatusCode.ERROR
    assert request.attributes["error.type"] == "upstream_failed"
    dumped = " ".join(str(dict(s.attributes)) + str(s.events) for s in finished)
    assert PRIMARY_KEY not in dumped and BACKUP_KEY not in dumped


async def test_prompts_in_spans_only_when_switched_on(upstream, http, spans):
    provider, exporter = spans
    async with running(table_doc(upstream), config_with(log_prompts=True), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
    [request] = exporter.get_finished_spans()
    assert "a secret prompt" in request.attributes["gen_ai.input.messages"]


async def test_library_call_joins_the_callers_trace(upstream, spans):
    provider, exporter = spans
    async with running(table_doc(upstream), config_with(), tracer_provider=provider) as (_, router):
        tracer = provider.get_tracer("app")
        with tracer.start_as_current_span("app work") as outer:
            await router.complete("hello")
    finished = exporter.get_finished_spans()
    [request] = requests_of(finished)
    assert request.name == "chat general_purpose:standard"
    assert request.parent.span_id == outer.get_span_context().span_id


def test_tracing_is_off_without_otel_variables():
    assert exporter_from_env({}) is None
    assert exporter_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}) is None
    assert exporter_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"}) is None
    exporter = exporter_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318/"})
    assert exporter is not None and exporter._endpoint == "http://x:4318/v1/traces"
    exporter.shutdown()


async def test_no_otel_variables_means_no_tracer(upstream, http):
    async with running(table_doc(upstream), config_with()) as (url, router):
        async with http.post(url + "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}) as resp:
            assert resp.status == 200
    assert router.telemetry.tracing is None
    # the client's traceparent is still forwarded untouched
    assert upstream.requests[-1].headers["traceparent"] == TRACEPARENT


async def otlp_receiver(received: list[Any], arrived: asyncio.Event) -> tuple[web.AppRunner, int]:
    """A small OTLP/HTTP receiver on /v1/traces: protobuf or JSON, parsed into ExportTraceServiceRequest."""
    from google.protobuf import json_format

    async def traces(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        body = await request.read()
        if request.content_type == "application/json":
            json_format.Parse(body, message)
        else:
            assert request.content_type == "application/x-protobuf"
            message.ParseFromString(body)
        received.append((request.content_type, message))
        arrived.set()
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(("export", "protocol", "content_type"), [
    ("process", "http/protobuf", "application/x-protobuf"),
    ("process", "http/json", "application/json"),
    ("thread", "http/protobuf", "application/x-protobuf"),
])
async def test_spans_exported_over_otlp_http(upstream, backup, http, export, protocol, content_type):
    """tiergate's own provider: by default a child process runs the SDK's exporter (protobuf, or JSON
    with OTEL_EXPORTER_OTLP_PROTOCOL=http/json); `TIERGATE_TRACE_EXPORT=thread` keeps it in-process."""
    if protocol == "http/json":
        pytest.importorskip("opentelemetry.exporter.otlp.json.http.trace_exporter")
    received: list[Any] = []
    arrived = asyncio.Event()
    runner, port = await otlp_receiver(received, arrived)
    upstream.push(Fail(500))  # the first request: a retry on the fallback (child spans)
    try:
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_SERVICE_NAME": "tiergate-test",
                   "OTEL_EXPORTER_OTLP_TIMEOUT": "5", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                   "TIERGATE_TRACE_EXPORT": export}
        async with running(table_doc(upstream, backup), config_with(environ)) as (url, router):
            assert router.telemetry.tracing is not None
            for _ in range(2):
                async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 200
        # leaving `running` closed the router, which flushed the exporter (and stopped its process)
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await runner.cleanup()
    assert {t for t, _ in received} == {content_type}
    spans = [(rs.resource, ss.scope, span) for _, msg in received for rs in msg.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    assert sorted(span.name for _, _, span in spans) == ["chat auto", "chat auto", "chat model-a", "chat model-b"]
    resource, scope, _ = spans[0]
    assert {kv.key: kv.value.string_value for kv in resource.attributes}["service.name"] == "tiergate-test"
    assert scope.name == "tiergate"
    requests = [span for _, _, span in spans if span.name == "chat auto"]
    single = next(span for span in requests if span.events)
    retried = next(span for span in requests if not span.events)
    attrs = {kv.key: kv.value for kv in single.attributes}
    assert attrs["gen_ai.operation.name"].string_value == "chat"
    assert attrs["gen_ai.usage.input_tokens"].int_value == 10
    assert single.kind == single.SPAN_KIND_CLIENT
    [event] = single.events
    assert event.name == "tiergate.attempt"
    assert {kv.key: kv.value for kv in event.attributes}["tiergate.attempt.outcome"].string_value == "ok"
    children = [span for _, _, span in spans if span.name.startswith("chat model")]
    assert all(child.parent_span_id == retried.span_id and child.trace_id == retried.trace_id for child in children)
    failed = next(child for child in children if child.name == "chat model-a")
    assert failed.status.code == failed.status.STATUS_CODE_ERROR


async def test_sampled_out_request_propagates_and_records_nothing(upstream, http, spans):
    provider, exporter = spans  # the default sampler follows the client's decision: not sampled
    async with running(table_doc(upstream), config_with(), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT,
                             headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}) as resp:
            assert resp.status == 200
    assert exporter.get_finished_spans() == ()
    version, trace_id, span_id, flags = upstream.requests[-1].headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "00") and span_id != PARENT_ID


def test_upstream_traceparent_is_what_the_w3c_propagator_writes(spans):
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from proxy.observability.tracing import Tracing
    from proxy.types import ModelRef

    provider, exporter = spans
    client = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    for attempts in ("auto", "always"):
        request = Tracing(provider, attempts=attempts).start("chat", 0.0, {"model": "auto"}, client)
        sent = request.attempt_started(ModelRef("p", "m"), {"x-extra": "1"})
        request.attempt_ended(Attempt("p", "m", "ok", 200, 1.0))
        # a single attempt: the request span goes upstream; always: the attempt's child span
        span = request.span if attempts == "auto" else exporter.get_finished_spans()[-1]
        expected: dict[str, str] = {"x-extra": "1"}
        TraceContextTextMapPropagator().inject(expected, trace.set_span_in_context(trace.NonRecordingSpan(
            span.get_span_context())))
        assert sent == expected and sent["tracestate"] == "vendor=1"
        assert sent["traceparent"].split("-")[1] == TRACE_ID


def test_own_provider_hashes_its_resource_once():
    from opentelemetry.sdk.resources import Resource

    from proxy.observability.tracing import provider_from_env

    made = provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "svc"}, export="thread")
    resource = made.resource
    assert resource.attributes["service.name"] == "svc"
    plain = Resource(resource.attributes, resource.schema_url)
    assert resource == plain and hash(resource) == hash(plain)
    assert {resource: 1}[plain] == 1  # the OTLP encoder groups spans by resource
    made.shutdown()


def test_sampled_out_requests_own_provider_propagates_without_sdk_spans(monkeypatch):
    """tiergate's own provider (OTEL_* variables): a sampled-out request makes no attempt spans; its
    own context (a new span id, the client's trace and flags) goes upstream with every attempt."""
    from proxy.observability.tracing import Tracing, provider_from_env
    from proxy.types import ModelRef

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    provider = provider_from_env({"OTEL_TRACES_EXPORTER": "console"}, export="thread")
    tracing = Tracing(provider, owned=True, attempts="always")
    for client in ({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00", "tracestate": "vendor=1"}, None):
        request = tracing.start("chat", 0.0, {"model": "auto"}, client)
        assert request is not None and not request.recording
        sent = [request.attempt_started(ModelRef("p", "m"), None) for _ in range(2)]
        request.attempt_ended(Attempt("p", "m", "ok", 200, 1.0))
        ids = [h["traceparent"].split("-") for h in sent]
        parent = request.span.get_span_context()
        flags = f"{parent.trace_flags:02x}"  # not sampled (the SDK may add W3C's random-trace-id flag)
        assert flags in ("00", "02") and all(version == "00" and f == flags for version, _, _, f in ids)
        assert {trace_id for _, trace_id, _, _ in ids} == {f"{parent.trace_id:032x}"}
        assert {span_id for _, _, span_id, _ in ids} == {f"{parent.span_id:016x}"}
        assert parent.span_id != int(PARENT_ID, 16)
        if client:
            assert ids[0][1] == TRACE_ID and all(h["tracestate"] == "vendor=1" for h in sent)
    tracing.close()


def test_sampler_named_in_the_settings_env_including_dotenv():
    from opentelemetry.sdk.trace import sampling

    from proxy.observability.tracing import sampler_from_env

    assert sampler_from_env({}) is None  # the SDK reads the process environment
    ratio = sampler_from_env({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert isinstance(ratio, sampling.ParentBasedTraceIdRatio) and "0.25" in ratio.get_description()
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "always_off"}) is sampling.ALWAYS_OFF
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}
                            ).get_description() == sampling.TraceIdRatioBased(1.0).get_description()
    unknown = sampler_from_env({"OTEL_TRACES_SAMPLER": "jaeger_remote"})
    assert isinstance(unknown, sampling.ParentBased)


async def test_request_log_line_names_its_trace(upstream, http, spans, caplog):
    import logging

    import orjson

    provider, _ = spans
    caplog.set_level(logging.INFO)
    async with running(table_doc(upstream), config_with(request_log="logging"), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}) as resp:
            assert resp.status == 200
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tiergate.requests"]
    assert lines[0]["trace_id"] == TRACE_ID
    assert len(lines[1]["trace_id"]) == 32 and lines[1]["trace_id"] != TRACE_ID  # a trace tiergate started
