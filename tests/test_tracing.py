"""OpenTelemetry: GenAI attributes, request span -> attempt spans, traceparent in and upstream,
export over real OTLP/HTTP, and nothing at all when no exporter is configured."""

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

from proxy.dispatch import Attempt
from proxy.tracing import exporter_from_env

from .conftest import BACKUP_KEY, PRIMARY_KEY, table_doc
from .telemetry_support import PRICING, config_with, running
from .upstream import Fail

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


def by_kind(finished: Any, kind: SpanKind) -> list[Any]:
    return [s for s in finished if s.kind == kind]


async def test_request_span_follows_genai_conventions(upstream, backup, http, spans):
    provider, exporter = spans
    doc = {**table_doc(upstream, backup), "pricing": PRICING}
    async with running(doc, config_with(), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT,
                             headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"}) as resp:
            assert resp.status == 200
            await resp.read()
    finished = exporter.get_finished_spans()
    [request] = by_kind(finished, SpanKind.INTERNAL)
    [attempt] = by_kind(finished, SpanKind.CLIENT)
    assert request.name == "chat auto"
    a = request.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "auto"
    assert a["gen_ai.response.model"] == "model-a"
    assert a["gen_ai.provider.name"] == "primary"
    assert a["gen_ai.usage.input_tokens"] == 10 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["tiergate.route"] == "general_purpose:standard"
    assert a["tiergate.cache"] == "bypass" and a["tiergate.attempts"] == 1
    assert a["tiergate.cost_usd"] == pytest.approx(16e-6)
    # the client's traceparent is the request span's parent; the attempt is its child
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == PARENT_ID
    assert attempt.parent.span_id == request.context.span_id
    assert attempt.context.trace_id == request.context.trace_id
    assert attempt.name == "chat model-a"
    assert attempt.attributes["gen_ai.provider.name"] == "primary"
    assert attempt.attributes["tiergate.attempt.outcome"] == "ok"
    # what went upstream is the attempt span's context, and the client's tracestate
    sent = upstream.requests[-1].headers
    assert sent["traceparent"] == f"00-{TRACE_ID}-{attempt.context.span_id:016x}-01"
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
    [request] = by_kind(finished, SpanKind.INTERNAL)
    attempts = sorted(by_kind(finished, SpanKind.CLIENT), key=lambda s: s.start_time)
    assert [s.attributes["tiergate.attempt.outcome"] for s in attempts] == ["http_500", "ok"]
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].attributes["http.response.status_code"] == 500
    assert all(s.parent.span_id == request.context.span_id for s in attempts)
    assert request.attributes["tiergate.attempts"] == 2
    assert request.attributes["gen_ai.provider.name"] == "backup"
    # without an incoming traceparent tiergate starts the trace and still propagates it upstream
    assert request.parent is None
    assert backup.requests[-1].headers["traceparent"].split("-")[2] == f"{attempts[1].context.span_id:016x}"


async def test_stream_span_reads_usage_from_the_tail(upstream, http, spans):
    provider, exporter = spans
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with running(table_doc(upstream), config_with(), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            await resp.read()
    [request] = by_kind(exporter.get_finished_spans(), SpanKind.INTERNAL)
    assert request.attributes["gen_ai.usage.output_tokens"] == 3
    assert request.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert request.attributes["tiergate.stream"] is True
    assert request.attributes["tiergate.time_to_first_chunk_s"] > 0


async def test_failed_request_span_has_error_and_no_key(upstream, backup, http, spans):
    provider, exporter = spans
    upstream.default = Fail(503)
    backup.default = Fail(503)
    async with running(table_doc(upstream, backup), config_with(), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 503  # the providers' own
    finished = exporter.get_finished_spans()
    [request] = by_kind(finished, SpanKind.INTERNAL)
    assert request.status.status_code == StatusCode.ERROR
    assert request.attributes["error.type"] == "upstream_failed"
    dumped = " ".join(str(dict(s.attributes)) + str(s.events) for s in finished)
    assert PRIMARY_KEY not in dumped and BACKUP_KEY not in dumped


async def test_prompts_in_spans_only_when_switched_on(upstream, http, spans):
    provider, exporter = spans
    async with running(table_doc(upstream), config_with(log_prompts=True), tracer_provider=provider) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
    [request] = by_kind(exporter.get_finished_spans(), SpanKind.INTERNAL)
    assert "a secret prompt" in request.attributes["gen_ai.input.messages"]


async def test_library_call_joins_the_callers_trace(upstream, spans):
    provider, exporter = spans
    async with running(table_doc(upstream), config_with(), tracer_provider=provider) as (_, router):
        tracer = provider.get_tracer("app")
        with tracer.start_as_current_span("app work") as outer:
            await router.complete("hello")
    finished = exporter.get_finished_spans()
    [request] = [s for s in by_kind(finished, SpanKind.INTERNAL) if s.name != "app work"]
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


async def test_spans_exported_over_otlp_http(upstream, http):
    """A small OTLP/HTTP receiver: tiergate's exporter POSTs protobuf to /v1/traces."""
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []
    arrived = asyncio.Event()

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        arrived.set()
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_SERVICE_NAME": "tiergate-test",
                   "OTEL_EXPORTER_OTLP_TIMEOUT": "5"}
        async with running(table_doc(upstream), config_with(environ)) as (url, router):
            assert router.telemetry.tracing is not None
            async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
        # leaving `running` closed the router, which flushed the batch exporter
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await runner.cleanup()
    spans = [(rs.resource, span) for msg in received for rs in msg.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    names = {span.name for _, span in spans}
    assert names == {"chat auto", "chat model-a"}
    resource_attrs = {kv.key: kv.value.string_value for kv in spans[0][0].attributes}
    assert resource_attrs["service.name"] == "tiergate-test"
    request = next(span for _, span in spans if span.name == "chat auto")
    attrs = {kv.key: kv.value for kv in request.attributes}
    assert attrs["gen_ai.operation.name"].string_value == "chat"
    assert attrs["gen_ai.usage.input_tokens"].int_value == 10
    child = next(span for _, span in spans if span.name == "chat model-a")
    assert child.parent_span_id == request.span_id


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

    from proxy.tracing import Tracing
    from proxy.types import ModelRef

    provider, exporter = spans
    client = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    request = Tracing(provider).start("chat", 0.0, {"model": "auto"}, client)
    sent = request.attempt_started(ModelRef("p", "m"), {"x-extra": "1"})
    request.attempt_ended(Attempt("p", "m", "ok", 200, 1.0))
    [attempt] = exporter.get_finished_spans()
    expected: dict[str, str] = {"x-extra": "1"}
    TraceContextTextMapPropagator().inject(expected, trace.set_span_in_context(trace.NonRecordingSpan(
        attempt.context)))
    assert sent == expected and sent["tracestate"] == "vendor=1"
    assert sent["traceparent"].split("-")[1] == TRACE_ID


def test_own_provider_hashes_its_resource_once():
    from opentelemetry.sdk.resources import Resource

    from proxy.tracing import provider_from_env

    made = provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "svc"})
    resource = made.resource
    assert resource.attributes["service.name"] == "svc"
    plain = Resource(resource.attributes, resource.schema_url)
    assert resource == plain and hash(resource) == hash(plain)
    assert {resource: 1}[plain] == 1  # the OTLP encoder groups spans by resource
    made.shutdown()


def test_sampled_out_requests_own_provider_propagates_without_sdk_spans(monkeypatch):
    """tiergate's own provider (OTEL_* variables): under a sampled-out request span the attempt's
    context is made directly (a new span id, the request's trace and flags), as the SDK would."""
    from proxy.tracing import Tracing, provider_from_env
    from proxy.types import ModelRef

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    provider = provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    tracing = Tracing(provider, owned=True)
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
        assert len({span_id for _, _, span_id, _ in ids} | {f"{parent.span_id:016x}"}) == 3
        if client:
            assert ids[0][1] == TRACE_ID and all(h["tracestate"] == "vendor=1" for h in sent)
    tracing.close()


def test_sampler_named_in_the_settings_env_including_dotenv():
    from opentelemetry.sdk.trace import sampling

    from proxy.tracing import sampler_from_env

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
