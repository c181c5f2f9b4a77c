"""Every span attribute and GenAI metric tiergate emits checked against the OpenTelemetry GenAI
semantic conventions, kept here as data copied from the conventions' documents:

- open-telemetry/semantic-conventions-genai (schema gen-ai/1.42.0), `docs/gen-ai/client-inference.md`
  (span `gen_ai.client.inference`, metrics `gen_ai.client.inference.duration`, `.time_to_first_chunk`,
  `.time_per_output_chunk`) and `docs/gen-ai/gen-ai-token-metrics.md` (`gen_ai.client.inference.usage.*`);
- the previous names (semantic-conventions v1.41.0) from that repository's
  `docs/gen-ai/non-normative/migration.md`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ..conftest import table_doc
from ..telemetry_support import config_with, parse_metrics, running, value
from ..upstream import Fail, Ok

# -- the conventions, as data ----------------------------------------------------------------------

# client-inference.md, "Span: gen_ai.client.inference", Attributes table: key -> value type
INFERENCE_SPAN_ATTRIBUTES: dict[str, str] = {
    "gen_ai.operation.name": "string", "gen_ai.provider.name": "string", "error.type": "string",
    "gen_ai.conversation.id": "string", "gen_ai.output.type": "string", "gen_ai.prompt.name": "string",
    "gen_ai.prompt.version": "string", "gen_ai.request.choice.count": "int", "gen_ai.request.model": "string",
    "gen_ai.request.seed": "int", "gen_ai.request.stream": "boolean", "gen_ai.request.top_k": "int",
    "server.port": "int", "gen_ai.conversation.compacted": "boolean", "gen_ai.request.frequency_penalty": "double",
    "gen_ai.request.max_tokens": "int", "gen_ai.request.presence_penalty": "double",
    "gen_ai.request.previous_response.id": "string", "gen_ai.request.reasoning.level": "string",
    "gen_ai.request.stop_sequences": "string[]", "gen_ai.request.temperature": "double",
    "gen_ai.request.top_p": "double", "gen_ai.response.finish_reasons": "string[]", "gen_ai.response.id": "string",
    "gen_ai.response.model": "string", "gen_ai.response.time_to_first_chunk": "double",
    "gen_ai.usage.audio.cache_read.input_tokens": "int", "gen_ai.usage.audio.input_tokens": "int",
    "gen_ai.usage.audio.output_tokens": "int", "gen_ai.usage.cache_read.input_tokens": "int",
    "gen_ai.usage.cache_write.input_tokens": "int", "gen_ai.usage.image.cache_read.input_tokens": "int",
    "gen_ai.usage.image.input_tokens": "int", "gen_ai.usage.image.output_tokens": "int",
    "gen_ai.usage.input_tokens": "int", "gen_ai.usage.output_tokens": "int",
    "gen_ai.usage.reasoning.output_tokens": "int", "gen_ai.usage.text.cache_read.input_tokens": "int",
    "gen_ai.usage.text.input_tokens": "int", "gen_ai.usage.text.output_tokens": "int",
    "server.address": "string", "gen_ai.input.messages": "any", "gen_ai.output.messages": "any",
    "gen_ai.system_instructions": "any", "gen_ai.tool.definitions": "any",
}
# ... of which "Required", and those the conventions ask for at span creation (sampling decisions)
REQUIRED_SPAN_ATTRIBUTES = {"gen_ai.operation.name", "gen_ai.provider.name"}
AT_CREATION = {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "server.address",
               "server.port"}
OPERATION_NAMES = {"chat", "create_agent", "create_memory", "create_memory_store", "delete_memory",
                   "delete_memory_store", "embeddings", "execute_tool", "fetch_response", "generate_content",
                   "invoke_agent", "invoke_workflow", "plan", "retrieval", "search_memory", "text_completion",
                   "update_memory", "upsert_memory"}
# attributes of other conventions tiergate also sets (HTTP), and its own namespace
GENERAL_ATTRIBUTES = {"http.response.status_code": "int"}
OWN_PREFIX = "tiergate."

_INFERENCE_METRIC_ATTRIBUTES = {"gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                                "server.port", "gen_ai.response.model", "server.address"}
_REQUIRED_METRIC_ATTRIBUTES = {"gen_ai.operation.name", "gen_ai.provider.name"}
# name -> (instrument, unit, attributes, required attributes); client-inference.md and gen-ai-token-metrics.md
GENAI_METRICS: dict[str, tuple[str, str, set[str], set[str]]] = {
    "gen_ai.client.inference.duration": ("histogram", "s", _INFERENCE_METRIC_ATTRIBUTES | {"error.type"},
                                         _REQUIRED_METRIC_ATTRIBUTES),
    "gen_ai.client.inference.time_to_first_chunk": ("histogram", "s", _INFERENCE_METRIC_ATTRIBUTES,
                                                    _REQUIRED_METRIC_ATTRIBUTES),
    "gen_ai.client.inference.time_per_output_chunk": ("histogram", "s", _INFERENCE_METRIC_ATTRIBUTES,
                                                      _REQUIRED_METRIC_ATTRIBUTES),
    **{f"gen_ai.client.inference.usage.{kind}": (
        "counter", "{token}", _INFERENCE_METRIC_ATTRIBUTES | {"gen_ai.token.modality"},
        _REQUIRED_METRIC_ATTRIBUTES | {"gen_ai.token.modality"})
       for kind in ("input_tokens", "output_tokens", "cache_read.input_tokens", "cache_write.input_tokens",
                    "reasoning.output_tokens")},
}
TOKEN_MODALITIES = {"audio", "image", "text", "unknown"}
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]

# migration.md: v1.41.0 -> gen-ai/1.42.0
PREVIOUS_METRICS: dict[str, tuple[str, str, set[str], set[str]]] = {
    "gen_ai.client.operation.duration": GENAI_METRICS["gen_ai.client.inference.duration"],
    "gen_ai.client.operation.time_to_first_chunk": GENAI_METRICS["gen_ai.client.inference.time_to_first_chunk"],
    "gen_ai.client.operation.time_per_output_chunk": GENAI_METRICS["gen_ai.client.inference.time_per_output_chunk"],
    "gen_ai.client.token.usage": ("histogram", "{token}", _INFERENCE_METRIC_ATTRIBUTES | {"gen_ai.token.type"},
                                  _REQUIRED_METRIC_ATTRIBUTES | {"gen_ai.token.type"}),
}
PREVIOUS_SPAN_RENAMES = {"gen_ai.usage.cache_write.input_tokens": "gen_ai.usage.cache_creation.input_tokens"}

# Prometheus: OpenTelemetry's translation of a metric name and unit (dots to underscores, `s` ->
# `_seconds`, annotations like `{token}` dropped, `_total` on counters)


def prometheus(name: str, instrument: str, unit: str) -> str:
    out = name.replace(".", "_") + ("_seconds" if unit == "s" else "")
    return out + "_total" if instrument == "counter" else out


# -- checks ----------------------------------------------------------------------------------------

_TYPES = {"string": str, "int": int, "boolean": bool, "double": float}


def check_span(span: Any, attributes: dict[str, str]) -> None:
    for key, found in list(span.attributes.items()) + [(k, v) for e in span.events for k, v in e.attributes.items()]:
        if key.startswith(OWN_PREFIX):
            continue
        kind = attributes.get(key) or GENERAL_ATTRIBUTES.get(key)
        assert kind is not None, f"{key} is not an attribute of the conventions"
        if kind == "string[]":
            assert isinstance(found, tuple) and all(isinstance(x, str) for x in found), key
        elif kind != "any":
            assert type(found) is _TYPES[kind], f"{key}: {found!r} is not a {kind}"


def check_metrics(text: str, conventions: dict[str, tuple[str, str, set[str], set[str]]]) -> set[str]:
    """Every non-tiergate family is a convention metric under its Prometheus name, with labels the
    conventions allow; returns the families found."""
    from prometheus_client.parser import text_string_to_metric_families

    expected = {prometheus(name, *spec[:2]): spec for name, spec in conventions.items()}
    found: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("tiergate_") or family.name.endswith("_created"):
            continue  # tiergate's own, and prometheus-client's creation timestamps
        full = family.name + ("_total" if family.type == "counter" else "")
        assert full in expected, f"{full} is not a metric of the conventions"
        instrument, _, allowed, required = expected[full]
        assert family.type == instrument, full
        labels = {label.replace(".", "_") for label in allowed}
        for sample in family.samples:
            assert set(sample.labels) - {"le"} <= labels, (full, sample.labels)
            assert {r.replace(".", "_") for r in required} <= set(sample.labels), (full, sample.labels)
            if "gen_ai_operation_name" in sample.labels:
                assert sample.labels["gen_ai_operation_name"] in OPERATION_NAMES
            if "gen_ai_token_modality" in sample.labels:
                assert sample.labels["gen_ai_token_modality"] in TOKEN_MODALITIES
        found.add(full)
    return found


# -- tests -----------------------------------------------------------------------------------------

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
DETAILS = {"prompt_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 2},
           "completion_tokens_details": {"reasoning_tokens": 1}}


async def traffic(http: Any, url: str, upstream: Any, backup: Any) -> None:
    """A request with token details, a stream, a retried request, a failed one."""
    upstream.push(Ok(usage=DETAILS))
    async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    stream = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    gate = asyncio.Event()  # the first chunk on its own, the rest after it
    upstream.push(Ok(gate=gate))
    async with http.post(url + "/v1/chat/completions", json=stream) as resp:
        assert await resp.content.readany()
        gate.set()
        await resp.read()
    upstream.push(Fail(500))
    async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    upstream.default = backup.default = Fail(503)
    async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503  # the providers' own
    upstream.default = backup.default = Ok()
    async with http.post(url + "/v1/completions", json={"model": "fast", "prompt": "x"}) as resp:
        assert resp.status == 200


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


async def test_span_attributes_are_the_conventions(upstream, backup, http, spans):
    provider, exporter = spans
    doc = {**table_doc(upstream, backup), "pricing": {"primary/model-a": {"input": 1.0, "output": 2.0,
                                                                          "cached_input": 0.5}}}
    async with running(doc, config_with(), tracer_provider=provider) as (url, _):
        await traffic(http, url, upstream, backup)
    finished = exporter.get_finished_spans()
    assert len(finished) >= 7
    for span in finished:
        check_span(span, INFERENCE_SPAN_ATTRIBUTES)
        assert REQUIRED_SPAN_ATTRIBUTES <= set(span.attributes) or span.attributes.get("error.type")
        assert span.attributes["gen_ai.operation.name"] in OPERATION_NAMES
        assert span.instrumentation_scope.schema_url == "https://opentelemetry.io/schemas/gen-ai/1.42.0"
    requests = [s for s in finished if "tiergate.route" in s.attributes]
    detailed = requests[0].attributes
    assert detailed["gen_ai.usage.input_tokens"] == 10
    assert detailed["gen_ai.usage.cache_read.input_tokens"] == 6
    assert detailed["gen_ai.usage.cache_write.input_tokens"] == 2
    assert detailed["gen_ai.usage.reasoning.output_tokens"] == 1
    # 4 uncached input tokens at 1.0, 6 cached at 0.5, 3 output at 2.0 (USD per 1M)
    assert detailed["tiergate.cost_usd"] == pytest.approx((4 * 1.0 + 6 * 0.5 + 3 * 2.0) / 1e6)
    assert detailed["server.address"] == "127.0.0.1" and detailed["server.port"] == upstream.port
    assert requests[1].attributes["gen_ai.request.stream"] is True
    assert requests[1].attributes["gen_ai.response.time_to_first_chunk"] > 0
    assert requests[4].attributes["gen_ai.operation.name"] == "text_completion"
    # the attempt child spans (the retried request) carry what the conventions want at creation
    children = [s for s in finished if "tiergate.attempt.outcome" in s.attributes]
    assert children and all(AT_CREATION - {"server.address", "server.port"} <= set(c.attributes) for c in children)


async def test_previous_names_when_asked(upstream, backup, http, spans):
    provider, exporter = spans
    config = config_with({"TIERGATE_GENAI_SEMCONV": "1.41"})
    async with running(table_doc(upstream, backup), config, tracer_provider=provider) as (url, router):
        upstream.push(Ok(usage=DETAILS))
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        text, _ = router.telemetry.render_metrics()
    previous = {**INFERENCE_SPAN_ATTRIBUTES, "gen_ai.usage.cache_creation.input_tokens": "int"}
    del previous["gen_ai.usage.cache_write.input_tokens"]
    [span] = exporter.get_finished_spans()
    check_span(span, previous)
    assert span.attributes["gen_ai.usage.cache_creation.input_tokens"] == 2
    assert span.instrumentation_scope.schema_url == "https://opentelemetry.io/schemas/1.41.0"
    found = check_metrics(text.decode(), PREVIOUS_METRICS)
    assert {"gen_ai_client_operation_duration_seconds", "gen_ai_client_token_usage"} <= found
    samples = parse_metrics(text.decode())
    assert value(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == 10
    assert value(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="output") == 1


async def test_both_name_sets_while_moving_over(upstream, http):
    async with running(table_doc(upstream), config_with({"TIERGATE_GENAI_SEMCONV": "1.41/dup"})) as (url, router):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        text, _ = router.telemetry.render_metrics()
    found = check_metrics(text.decode(), {**GENAI_METRICS, **PREVIOUS_METRICS})
    assert {"gen_ai_client_inference_duration_seconds", "gen_ai_client_operation_duration_seconds"} <= found


def test_unknown_semconv_choice_is_a_clear_error():
    from proxy.engine.router import Router
    from proxy.types import ConfigError

    with pytest.raises(ConfigError, match="genai_semconv"):
        Router(config_with({"TIERGATE_GENAI_SEMCONV": "2.0"}))


async def test_metrics_are_the_conventions_under_their_prometheus_names(upstream, backup, http):
    async with running(table_doc(upstream, backup), config_with()) as (url, router):
        await traffic(http, url, upstream, backup)
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
    found = check_metrics(text, GENAI_METRICS)
    assert found == {prometheus(name, *spec[:2]) for name, spec in GENAI_METRICS.items()}
    samples = parse_metrics(text)
    # the recommended buckets
    bounds = sorted({float(s.labels["le"]) for s in samples["gen_ai_client_inference_duration_seconds_bucket"]})
    assert bounds[:-1] == DURATION_BUCKETS
    # every inference that reached a provider: 4 chat (one failed), 1 text completion
    chat = {"gen_ai_operation_name": "chat"}
    assert value(samples, "gen_ai_client_inference_duration_seconds_count", **chat) == 4
    completion = {"gen_ai_operation_name": "text_completion"}
    assert value(samples, "gen_ai_client_inference_duration_seconds_count", **completion) == 1
    failed = [s for s in samples["gen_ai_client_inference_duration_seconds_count"] if s.labels["error_type"]]
    assert [(s.labels["error_type"], s.value) for s in failed] == [("upstream_failed", 1.0)]
    assert value(samples, "gen_ai_client_inference_duration_seconds_count", server_address="127.0.0.1",
                 server_port=str(upstream.port)) >= 2
    # tokens: 3 answered chats of 10 input tokens; the details of the first, the mock's own of the others
    # (4 cached, 1 reasoning)
    assert value(samples, "gen_ai_client_inference_usage_input_tokens_total", **chat) == 30
    assert value(samples, "gen_ai_client_inference_usage_cache_read_input_tokens_total", **chat) == 6 + 2 * 4
    assert value(samples, "gen_ai_client_inference_usage_cache_write_input_tokens_total", **chat) == 2
    assert value(samples, "gen_ai_client_inference_usage_reasoning_output_tokens_total", **chat) == 1 + 2 * 1
    assert {s.labels["gen_ai_token_modality"] for s in samples["gen_ai_client_inference_usage_input_tokens_total"]
            } == {"unknown"}  # OpenAI-shaped usage does not say
    # the stream: time to first chunk once, time per output chunk once per chunk after the first
    assert value(samples, "gen_ai_client_inference_time_to_first_chunk_seconds_count") == 1
    assert value(samples, "gen_ai_client_inference_time_per_output_chunk_seconds_count") >= 1
    # tiergate's own metrics are still there, and get_metrics() has the token details too
    assert value(samples, "tiergate_requests_total") == 5
    tokens = router.get_metrics()["tokens"]
    assert tokens["cached_prompt"] == 6 + 2 * 4 and tokens["reasoning"] == 1 + 2 * 1 and tokens["prompt"] == 33


def test_dashboard_uses_the_genai_metrics():
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "llm_routing.json").read_text())
    exprs = " ".join(t["expr"] for p in doc["panels"] for t in p.get("targets", []))
    for name in ("gen_ai_client_inference_duration_seconds_bucket", "gen_ai_client_inference_time_to_first_chunk",
                 "gen_ai_client_inference_usage_input_tokens_total",
                 "gen_ai_client_inference_usage_cache_read_input_tokens_total"):
        assert name in exprs
    # replaced, so no longer queried
    assert "tiergate_time_to_first_token_seconds" not in exprs and "tiergate_tokens_total" not in exprs
