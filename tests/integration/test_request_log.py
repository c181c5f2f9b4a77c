"""One structured JSON log line per request, with the fields operators need; never a key or prompt."""

from __future__ import annotations

import logging

import orjson
import pytest

from ..conftest import BACKUP_KEY, PRIMARY_KEY, table_doc
from ..telemetry_support import PRICING, config_with, running
from ..upstream import BreakStream, Fail, InvalidJson, Ok, Reset

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "my private prompt"}]}
FIELDS = {"request_id", "route", "model", "provider", "status", "latency_ms", "prompt_tokens",
          "completion_tokens", "cost_usd", "cache", "attempts", "error"}


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tiergate.requests"]


async def test_one_line_per_request_with_fields(upstream, backup, http, caplog):
    caplog.set_level(logging.INFO)
    doc = {**table_doc(upstream, backup), "pricing": PRICING}
    async with running(doc, config_with(request_log="logging")) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "r-1"}) as resp:
            assert resp.status == 200
        upstream.push(Fail(500))
        async with http.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "r-2"}) as resp:
            assert resp.status == 200
        async with http.post(url + "/v1/chat/completions", json={"messages": "x"},
                             headers={"x-request-id": "r-3"}) as resp:
            assert resp.status == 400
    lines = request_lines(caplog)
    assert [line["request_id"] for line in lines] == ["r-1", "r-2", "r-3"]
    for line in lines:
        assert FIELDS <= set(line)
    first, second, third = lines
    assert first["route"] == "general_purpose:standard" and first["model"] == "primary/model-a"
    assert first["provider"] == "primary" and first["status"] == 200 and first["attempts"] == 1
    assert first["prompt_tokens"] == 10 and first["completion_tokens"] == 3
    assert first["cost_usd"] == pytest.approx(16e-6) and first["cache"] == "bypass"
    assert first["error"] is None and first["latency_ms"] > 0
    assert second["provider"] == "backup" and second["attempts"] == 2
    assert second["attempt_outcomes"] == ["primary/model-a:http_500", "backup/model-b:ok"]
    assert third["status"] == 400 and third["error"] == "invalid_request_error"


async def test_no_key_or_prompt_in_any_log_under_error_paths(upstream, backup, http, caplog):
    caplog.set_level(logging.DEBUG)
    leaky = b'{"error": {"message": "invalid key ' + PRIMARY_KEY.encode() + b'"}}'
    async with running(table_doc(upstream, backup),
                       config_with(breaker_failure_threshold=50, request_log="logging")) as (url, _):
        scenarios = [
            (Fail(500), Fail(503)),                       # every candidate fails -> 502
            (Reset(), Fail(500, body=leaky)),             # connection reset, then a 5xx echoing a key
            (InvalidJson(), InvalidJson()),               # 200 with a body that is not JSON
            (Fail(401, body=leaky), Ok()),                # upstream 4xx passed through
            (Fail(429, retry_after=0), Fail(429)),        # rate limited everywhere
        ]
        for primary_action, backup_action in scenarios:
            upstream.default, backup.default = primary_action, backup_action
            async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status >= 400
                await resp.read()
        upstream.default = BreakStream(after=1)
        async with http.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            await resp.read()
    lines = request_lines(caplog)
    assert len(lines) == len(scenarios) + 1
    assert all(line["status"] >= 400 or line.get("stream_error") for line in lines)
    assert lines[-1]["stream_error"] == "connection"
    everything = caplog.text + " ".join(r.getMessage() for r in caplog.records)
    for secret in (PRIMARY_KEY, BACKUP_KEY, "SECRET", "my private prompt"):
        assert secret not in everything


async def test_in_process_the_request_log_is_quiet_unless_logging_is_configured(upstream, http, capsys, caplog):
    """The library default goes through the `tiergate.requests` logger (nothing on stderr);
    `tiergate serve` keeps the stderr line (tests/test_cli.py)."""
    assert config_with().request_log == "logging"
    async with running(table_doc(upstream), config_with()) as (url, router):
        async with http.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "r-8"}) as resp:
            assert resp.status == 200
        router.telemetry.drain()
        assert '"request_id"' not in capsys.readouterr().err and request_lines(caplog) == []
        caplog.set_level(logging.INFO, logger="tiergate.requests")  # the application turns it on
        async with http.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "r-9"}) as resp:
            assert resp.status == 200
    assert [line["request_id"] for line in request_lines(caplog)] == ["r-9"]
    assert FIELDS <= set(request_lines(caplog)[0])
    assert '"request_id"' not in capsys.readouterr().err


async def test_request_log_on_stderr(upstream, http, capsys):
    async with running(table_doc(upstream), config_with(request_log="stderr")) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": "r-9"}) as resp:
            assert resp.status == 200
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [line["request_id"] for line in lines] == ["r-9"]
    assert FIELDS <= set(lines[0])


@pytest.mark.parametrize("settings", [{"enable_monitoring": False, "request_log": "logging"},
                                      {"request_log": "off"}])
async def test_request_log_off(upstream, http, caplog, capsys, settings):
    caplog.set_level(logging.INFO)
    async with running(table_doc(upstream), config_with(**settings)) as (url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
    assert request_lines(caplog) == []
    assert '"request_id"' not in capsys.readouterr().err


def test_unknown_request_log_target_is_a_config_error():
    from proxy.observability.telemetry import Telemetry
    from proxy.types import ConfigError

    with pytest.raises(ConfigError, match="request_log"):
        Telemetry(config_with(request_log="syslog"))


async def test_finished_requests_are_counted_in_batches_and_on_every_read(capsys):
    """The request path only queues a finished request; a full batch, the timer (within 200 ms) or
    any read counts and logs it, in the order requests finished."""
    import asyncio

    from proxy.observability.telemetry import _BATCH_SIZE, Telemetry
    from proxy.outcome import RequestRecord
    from proxy.types import ModelRef

    telemetry = Telemetry(config_with(request_log="stderr"))
    ref = ModelRef("p", "m")

    def finish(request_id: str) -> None:
        record = RequestRecord(request_id, "chat.completions")
        record.route, record.status, record.ref = "general_purpose:standard", 200, ref
        telemetry.finish(record)

    for i in range(_BATCH_SIZE - 1):
        finish(f"r{i}")
    assert telemetry.stats.overall.requests == 0  # queued
    finish(f"r{_BATCH_SIZE - 1}")
    assert telemetry.stats.overall.requests == _BATCH_SIZE  # a full batch is counted at once
    finish("late")
    deadline = asyncio.get_running_loop().time() + 5
    while telemetry.stats.overall.requests == _BATCH_SIZE and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert telemetry.stats.overall.requests == _BATCH_SIZE + 1  # the timer counted it, no read needed
    finish("read")
    assert telemetry.snapshot()["requests"] == _BATCH_SIZE + 2  # a read counts what finished before it
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [line["request_id"] for line in lines] == [f"r{i}" for i in range(_BATCH_SIZE)] + ["late", "read"]
    assert all(line["model"] == "p/m" and line["status"] == 200 for line in lines)
    telemetry.close()
