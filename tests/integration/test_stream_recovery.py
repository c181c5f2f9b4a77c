"""Recovery mid-answer (on by default): a route's stream that breaks after content was relayed is
continued by its next candidate, and the client reads one answer; a tool call that breaks is never
continued; with `stream_recovery: off` a broken stream ends with the error event, never [DONE]."""

from __future__ import annotations

import logging

import openai
import orjson
import pytest
from openai import AsyncOpenAI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.table.routing import table_from_dict

from ..conftest import table_doc
from ..telemetry_support import config_with, parse_metrics, running, value
from ..upstream import BreakStream, Ok

ANSWER = "one two three four five six seven"
MESSAGES = [{"role": "user", "content": "count"}]


def recovering_doc(upstream, backup, continuation: str = "prefix") -> dict:
    doc = table_doc(upstream, backup, stream_recovery="continue")
    doc["providers"]["backup"]["continuation"] = continuation
    return doc


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tiergate.requests"]


async def test_a_broken_stream_is_continued_by_the_next_model_as_one_answer(upstream, backup, http, caplog):
    caplog.set_level(logging.INFO)
    upstream.push(BreakStream(after=4, content=ANSWER))  # role chunk, "one", " two", " three", then cut
    backup.default = Ok(content=ANSWER)
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with running(recovering_doc(upstream, backup), config_with(request_log="logging"),
                       tracer_provider=tracer_provider) as (url, router):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
        async with http.get(url + "/metrics") as resp:
            metrics = parse_metrics(await resp.text())
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert {c.id for c in chunks} == {"chatcmpl-primary-1"} and {c.model for c in chunks} == {"model-a"}
    assert [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role] == ["assistant"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the continuation was asked with the partial answer as the assistant's prefix
    assert backup.requests[-1].json["messages"][-1] == {"role": "assistant", "content": "one two three",
                                                        "prefix": True}
    assert value(metrics, "tiergate_stream_recoveries_total", outcome="recovered") == 1
    (line,) = request_lines(caplog)
    assert line["status"] == 200 and line["error"] is None
    assert line["stream_recovery"] == "recovered" and line["recovered_by"] == "backup/model-b"
    (span,) = [s for s in exporter.get_finished_spans() if "tiergate.stream.recovery" in (s.attributes or {})]
    assert span.attributes["tiergate.stream.recovered_by"] == "backup/model-b"
    tracer_provider.shutdown()


async def test_a_continuation_by_instruction_and_raw_bytes_end_with_done(upstream, backup, http):
    upstream.push(BreakStream(after=3, content=ANSWER))
    backup.default = Ok(content=ANSWER)
    async with running(recovering_doc(upstream, backup, "instruction"), config_with()) as (url, _):
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    sent = backup.requests[-1].json["messages"]
    assert sent[-2] == {"role": "assistant", "content": "one two"} and sent[-1]["role"] == "user"


async def test_an_error_event_mid_stream_is_withheld_and_the_answer_continued(upstream, backup, http):
    upstream.push(BreakStream(after=3, content=ANSWER, error_event=True))
    backup.default = Ok(content=ANSWER)
    async with running(recovering_doc(upstream, backup), config_with()) as (url, router):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    assert text == ANSWER


async def test_a_tool_call_that_breaks_is_not_recovered(upstream, backup, http):
    upstream.push(BreakStream(after=3, content="Paris", tool_call=True))
    async with running(recovering_doc(upstream, backup), config_with()) as (url, router):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(
            model="auto", messages=MESSAGES, stream=True,
            tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}])
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        assert router.get_metrics()["stream_recoveries"] == {"refused_tool_call": 1}
    assert backup.calls == 0


async def test_on_defaults_a_broken_stream_is_continued_by_instruction_and_joined(upstream, backup):
    """No continuation declared anywhere: the fallback is asked by instruction, restarts the answer, and
    the join drops what the client already has."""
    upstream.push(BreakStream(after=4, content=ANSWER))
    backup.default = Ok(content=ANSWER)
    async with running(table_doc(upstream, backup), config_with()) as (url, router):
        assert await recovered_text(url) == ANSWER
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    sent = backup.requests[-1].json["messages"]
    assert sent[-2] == {"role": "assistant", "content": "one two three"} and sent[-1]["role"] == "user"


async def test_a_long_answer_is_continued_from_what_recovery_kept_of_it(upstream, backup):
    """Past KEEP_EVENTS bytes recovery keeps the answer's text instead of its events; the continuation is
    asked with all of it."""
    words = [f"w{i}" for i in range(3000)]  # ~250 kB of events before the cut
    upstream.push(BreakStream(after=2501, content=" ".join(words)))
    backup.default = Ok(content=" ".join(words))
    async with running(recovering_doc(upstream, backup), config_with()) as (url, router):
        assert await recovered_text(url) == " ".join(words)
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    assert backup.requests[-1].json["messages"][-1]["content"] == " ".join(words[:2500])


async def test_an_answer_longer_than_recovery_keeps_ends_with_its_error_event(upstream, backup, http):
    word = "x" * 1000
    upstream.push(BreakStream(after=301, content=" ".join([word] * 400)))  # 300 kB of text, then cut
    async with running(recovering_doc(upstream, backup), config_with()) as (url, router):
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
        assert router.get_metrics()["stream_recoveries"] == {"refused_long": 1}
    assert b"[DONE]" not in body and body.rstrip().endswith(b'"code":"upstream_connection"}}')
    assert backup.calls == 0


async def test_a_model_that_refuses_a_prefill_it_was_declared_to_take_is_asked_by_instruction(upstream, backup):
    """The provider says it prefills; this model answers the prefill with a 400 (as OpenAI's do): the
    continuation is asked again by instruction, and its join checked."""
    backup.refuses_prefill = {"model-b"}
    upstream.push(BreakStream(after=4, content=ANSWER))
    backup.default = Ok(content=ANSWER)
    async with running(recovering_doc(upstream, backup, "prefix"), config_with()) as (url, router):
        assert await recovered_text(url) == ANSWER
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    first, second = backup.requests
    assert first.json["messages"][-1]["prefix"] is True
    assert second.json["messages"][-2] == {"role": "assistant", "content": "one two three"}


async def test_with_recovery_off_a_broken_stream_ends_with_the_error_event(upstream, backup, http):
    upstream.push(BreakStream(after=4, content=ANSWER))
    async with running(table_doc(upstream, backup, stream_recovery="off"), config_with()) as (url, _):
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
    assert b"[DONE]" not in body and body.rstrip().endswith(b'"code":"upstream_connection"}}')
    assert backup.calls == 0


def test_stream_recovery_and_continuation_are_checked_in_the_table(upstream, backup):
    with pytest.raises(Exception, match="stream_recovery"):
        table_from_dict(table_doc(upstream, backup, stream_recovery="retry"), source="t")
    doc = table_doc(upstream, backup)
    doc["providers"]["backup"]["continuation"] = "magic"
    with pytest.raises(Exception, match="continuation"):
        table_from_dict(doc, source="t")


async def test_a_translated_responses_stream_is_continued_before_it_is_translated(upstream, backup):
    """A Responses call to providers that speak only Chat Completions: the chat stream that breaks is
    continued by the next chat-only candidate, and the client reads one Responses stream that completes."""
    doc = recovering_doc(upstream, backup)
    for provider in doc["providers"].values():
        provider["apis"] = ["chat", "completions", "embeddings"]
    upstream.push(BreakStream(after=4, content=ANSWER))
    backup.default = Ok(content=ANSWER)
    async with running(doc, config_with()) as (url, router):
        client = AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        async with client.responses.stream(model="auto", input="count") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == ANSWER
    assert [r.path for r in backup.requests] == ["/v1/chat/completions"]
    assert backup.requests[-1].json["messages"][-1] == {"role": "assistant", "content": "one two three",
                                                        "prefix": True}


async def recovered_text(url: str) -> str:
    async with AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as client:
        stream = await client.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


@pytest.mark.parametrize("continuation", [ANSWER, "three four five six seven", " four five six seven"],
                         ids=["restarted", "last-word-repeated", "continued"])
async def test_an_instructed_continuation_is_joined_without_repeating_the_answer(upstream, backup, continuation):
    """A model told to continue may start the answer again or repeat its last words: the client reads
    the answer once, never doubled."""
    upstream.push(BreakStream(after=4, content=ANSWER))  # "one two three", then cut
    backup.default = Ok(content=continuation)
    async with running(recovering_doc(upstream, backup, "instruction"), config_with()) as (url, router):
        text = await recovered_text(url)
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    assert text == ANSWER


async def test_a_continuation_that_starts_a_different_answer_is_refused_with_the_original_error(upstream, backup,
                                                                                                http):
    upstream.push(BreakStream(after=5, content=ANSWER))  # "one two three four", then cut
    backup.default = Ok(content="one two three and then four five six seven")
    async with running(recovering_doc(upstream, backup, "instruction"), config_with()) as (url, router):
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
        assert router.get_metrics()["stream_recoveries"] == {"refused_join": 1}
    assert b"[DONE]" not in body and b" and then" not in body
    assert body.rstrip().endswith(b'"code":"upstream_connection"}}')  # the break's own error event
    assert backup.calls == 1


async def test_a_model_that_refuses_a_prefill_is_asked_by_instruction_as_its_model_rule_says(upstream, backup):
    doc = recovering_doc(upstream, backup, "prefix")  # the provider prefills ...
    doc["model_rules"] = {"model-b": {"continuation": "instruction"}}  # ... this model of it does not
    backup.refuses_prefill = {"model-b"}
    upstream.push(BreakStream(after=4, content=ANSWER))
    backup.default = Ok(content=ANSWER)
    async with running(doc, config_with()) as (url, router):
        text = await recovered_text(url)
        assert router.get_metrics()["stream_recoveries"] == {"recovered": 1}
    assert text == ANSWER
    sent = backup.requests[-1].json["messages"]
    assert sent[-2] == {"role": "assistant", "content": "one two three"} and sent[-1]["role"] == "user"


async def test_a_model_that_may_not_continue_leaves_the_stream_with_its_original_error(upstream, backup, http):
    doc = recovering_doc(upstream, backup, "prefix")
    doc["model_rules"] = {"model-b": {"continuation": "none"}}
    upstream.push(BreakStream(after=4, content=ANSWER))
    async with running(doc, config_with()) as (url, router):
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
        assert router.get_metrics()["stream_recoveries"] == {"no_candidate": 1}
    assert b"[DONE]" not in body and body.rstrip().endswith(b'"code":"upstream_connection"}}')
    assert backup.calls == 0


async def test_a_candidate_that_prefills_is_preferred_to_one_that_takes_an_instruction(upstream, backup):
    doc = recovering_doc(upstream, backup, "instruction")
    doc["routes"][0]["fallbacks"] = ["backup/model-b", "backup/model-a"]
    doc["model_rules"] = {"backup/model-a": {"continuation": "prefix"}}
    upstream.push(BreakStream(after=4, content=ANSWER))
    backup.default = Ok(content=ANSWER)
    async with running(doc, config_with()) as (url, router):
        assert await recovered_text(url) == ANSWER
    (sent,) = backup.requests
    assert sent.json["model"] == "model-a"
    assert sent.json["messages"][-1] == {"role": "assistant", "content": "one two three", "prefix": True}


def test_a_model_rules_continuation_is_checked_in_the_table(upstream, backup):
    doc = table_doc(upstream, backup)
    doc["model_rules"] = {"model-b": {"continuation": "magic"}}
    with pytest.raises(Exception, match="continuation"):
        table_from_dict(doc, source="t")


@pytest.mark.parametrize("entry", ["prefix", "none"])
async def test_a_fallback_entrys_continuation_wins_over_model_rules_and_provider(upstream, backup, http, entry):
    doc = recovering_doc(upstream, backup, "instruction")
    doc["model_rules"] = {"model-b": {"continuation": "none" if entry == "prefix" else "prefix"}}
    doc["routes"][0]["fallbacks"] = [{"model": "backup/model-b", "continuation": entry}]
    upstream.push(BreakStream(after=4, content=ANSWER))
    backup.default = Ok(content=ANSWER)
    async with running(doc, config_with()) as (url, router):
        async with http.post(url + "/v1/chat/completions",
                             json={"model": "auto", "messages": MESSAGES, "stream": True}) as resp:
            body = await resp.read()
        outcome = "recovered" if entry == "prefix" else "no_candidate"
        assert router.get_metrics()["stream_recoveries"] == {outcome: 1}
    if entry == "prefix":
        assert body.rstrip().endswith(b"data: [DONE]")
        assert backup.requests[-1].json["messages"][-1] == {"role": "assistant", "content": "one two three",
                                                            "prefix": True}
    else:
        assert body.rstrip().endswith(b'"code":"upstream_connection"}}') and backup.calls == 0


def test_stream_recovery_off_as_yaml_reads_it(upstream, backup, tmp_path):
    """A bare `off` is YAML's false: it turns recovery off, as the quoted word does."""
    from proxy.table.routing import load_table

    for word in ("off", '"off"', "false"):
        path = tmp_path / "routes.yaml"
        path.write_text(f"providers:\n  primary: {{base_url: '{upstream.url}', api_key: k}}\n"
                        f"routes:\n  - {{use_case: general_purpose, tier: standard, model: primary/m, "
                        f"stream_recovery: {word}}}\n")
        (route,) = load_table(path).routes.values()
        assert route.stream_recovery == "off"
