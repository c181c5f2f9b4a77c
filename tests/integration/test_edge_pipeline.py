"""The one edge pipeline: every `/v1` path family (routed endpoints, paths that are not canonical,
pass-through calls, uploads, stored responses, the model list) is authenticated, admitted against the
key's limits, answered in OpenAI's shape and finished once, in the request log and the metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from ..conftest import Running, table_doc, until
from ..telemetry_support import parse_metrics
from ..upstream import MockUpstream

KEYS = ("team-a=sk-team-a-SECRET-123", "team-b=sk-team-b-SECRET-456")
TEAM_A = {"Authorization": "Bearer sk-team-a-SECRET-123"}
TEAM_B = {"Authorization": "Bearer sk-team-b-SECRET-456"}
MESSAGES = [{"role": "user", "content": "hi"}]
RPM = 2


@pytest.fixture
async def responses_upstream() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("primary", responses=True).start()
    yield server
    await server.stop()


async def start(start_tiergate: Callable[..., Any], upstream: MockUpstream) -> Running:
    """tiergate with keys, a pass-through provider, and a requests-per-minute limit on team-a's key."""
    doc = table_doc(upstream)
    doc["routes"][0]["embeddings_model"] = "primary/text-embedding-3-small"
    doc["routes"][0]["completions_model"] = "primary/model-instruct"
    doc["passthrough_provider"] = "primary"
    doc["limits"] = [{"name": "team-a-rpm", "key": "team-a", "requests_per_minute": RPM}]
    return await start_tiergate(doc, api_keys=KEYS, enable_caching=False, request_log="logging")


def upload() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b'{"custom_id": "1"}\n', filename="batch.jsonl", content_type="application/jsonl")
    return form


def families(stored_id: str) -> list[tuple[str, str, str, Callable[[], dict[str, Any]]]]:
    """(family, method, path, the request's body as aiohttp arguments) for each kind of /v1 route."""
    return [
        ("chat", "POST", "/v1/chat/completions", lambda: {"json": {"model": "general_purpose", "messages": MESSAGES}}),
        ("completions", "POST", "/v1/completions", lambda: {"json": {"model": "general_purpose", "prompt": "hi"}}),
        ("embeddings", "POST", "/v1/embeddings", lambda: {"json": {"model": "general_purpose", "input": "hi"}}),
        ("responses", "POST", "/v1/responses", lambda: {"json": {"model": "general_purpose", "input": "hi"}}),
        ("double slash", "POST", "/v1//chat/completions",
         lambda: {"json": {"model": "general_purpose", "messages": MESSAGES}}),
        ("trailing slash", "POST", "/v1/chat/completions/",
         lambda: {"json": {"model": "general_purpose", "messages": MESSAGES}}),
        ("dot segments", "POST", "/v1/files/../chat/completions",
         lambda: {"json": {"model": "general_purpose", "messages": MESSAGES}}),
        ("pass-through naming a route", "POST", "/v1/images/generations",
         lambda: {"json": {"model": "general_purpose", "prompt": "a cat"}}),
        ("pass-through upload", "POST", "/v1/files", lambda: {"data": upload()}),
        ("stored response", "GET", f"/v1/responses/{stored_id}", dict),
        ("model list", "GET", "/v1/models", dict),
        ("model entry", "GET", "/v1/models/general_purpose", dict),
    ]


async def call(http: aiohttp.ClientSession, running: Running, method: str, path: str, body: dict[str, Any],
               headers: dict[str, str]) -> tuple[int, Any, dict[str, Any]]:
    # the target goes as written: the client resolves no `..` itself
    async with http.request(method, URL(running.url + path, encoded=True), headers=headers, **body) as resp:
        return resp.status, resp.headers, orjson.loads(await resp.read())


async def stored_response(http: aiohttp.ClientSession, running: Running) -> str:
    """A response stored upstream (created with team-b's key, which no limit holds)."""
    status, _, answer = await call(http, running, "POST", "/v1/responses",
                                   {"json": {"model": "general_purpose", "input": "hi"}}, TEAM_B)
    assert status == 200
    return answer["id"]


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tiergate.requests"]


def requests_total(running: Running) -> float:
    samples = parse_metrics(running.router.telemetry.render_metrics()[0].decode())
    return sum(s.value for s in samples.get("tiergate_requests_total", []))


async def test_a_spent_key_is_refused_on_every_path_family(responses_upstream, start_tiergate, http, caplog):
    caplog.set_level(logging.INFO, logger="tiergate.requests")
    running = await start(start_tiergate, responses_upstream)
    stored_id = await stored_response(http, running)
    for _ in range(RPM):  # team-a's minute is spent
        body = {"json": {"model": "general_purpose", "messages": MESSAGES}}
        assert (await call(http, running, "POST", "/v1/chat/completions", body, TEAM_A))[0] == 200
    calls = responses_upstream.calls
    for family, method, path, body in families(stored_id):
        status, headers, answer = await call(http, running, method, path, body(), {**TEAM_A, "x-request-id": family})
        assert status == 429, (family, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}, family
        assert answer["error"]["code"] == "rate_limit_exceeded" and "team-a-rpm" in answer["error"]["message"]
        assert 1 <= int(headers["Retry-After"]) <= 60, family
        assert headers["x-request-id"] == family
    assert responses_upstream.calls == calls  # nothing refused went upstream
    # each refusal is one request, finished once: one log line each, with its status
    await until(lambda: len(request_lines(caplog)) >= 1 + RPM + len(families(stored_id)))
    refused = [line for line in request_lines(caplog) if line["status"] == 429]
    assert sorted(line["request_id"] for line in refused) == sorted(f for f, *_ in families(stored_id))


async def test_every_path_family_is_served_recorded_once_and_counted(responses_upstream, start_tiergate, http,
                                                                     caplog):
    caplog.set_level(logging.INFO, logger="tiergate.requests")
    running = await start(start_tiergate, responses_upstream)
    stored_id = await stored_response(http, running)
    sent = 1
    for family, method, path, body in families(stored_id):
        status, headers, answer = await call(http, running, method, path, body(), {**TEAM_B, "x-request-id": family})
        sent += 1
        assert status == 200, (family, answer)
        if path.startswith("/v1/chat/completions/") or "//" in path or ".." in path:  # served as the chat endpoint
            assert headers["x-tiergate-route"] == "general_purpose:standard" and answer["object"] == "chat.completion"
    assert [r.path for r in responses_upstream.requests if r.path in ("/v1/images/generations", "/v1/files")] == [
        "/v1/images/generations", "/v1/files"]
    await until(lambda: len(request_lines(caplog)) >= sent and requests_total(running) >= sent)
    lines = request_lines(caplog)
    ids = [line["request_id"] for line in lines]
    assert len(ids) == sent and sorted(ids[1:]) == sorted(f for f, *_ in families(stored_id))
    assert requests_total(running) == sent  # counted once each
    endpoints = {line["request_id"]: line["endpoint"] for line in lines}
    assert endpoints["double slash"] == endpoints["trailing slash"] == endpoints["dot segments"] == "chat.completions"
    assert endpoints["pass-through naming a route"] == endpoints["pass-through upload"] == "passthrough"
    assert endpoints["stored response"] == "responses" and endpoints["model list"] == "models"
    routes = {line["request_id"]: line["route"] for line in lines}
    assert routes["pass-through naming a route"] == "general_purpose:standard"
    assert routes["stored response"] == "stored_response"


async def test_a_missing_or_wrong_key_is_refused_alike_on_every_path_family(responses_upstream, start_tiergate,
                                                                           http):
    running = await start(start_tiergate, responses_upstream)
    stored_id = await stored_response(http, running)
    calls = responses_upstream.calls
    for headers in ({}, {"Authorization": "Bearer sk-not-a-key"}):
        errors = set()
        for family, method, path, body in families(stored_id):
            status, answer_headers, answer = await call(http, running, method, path, body(),
                                                        {**headers, "x-request-id": family})
            assert status == 401, (family, answer)
            assert answer_headers["x-request-id"] == family
            errors.add(orjson.dumps(answer))
        assert len(errors) == 1  # the same error on every path
        (error,) = errors
        assert orjson.loads(error)["error"]["code"] == "invalid_api_key"
    assert responses_upstream.calls == calls


async def test_paths_that_are_not_canonical_are_the_canonical_route(responses_upstream, start_tiergate, http):
    running = await start(start_tiergate, responses_upstream)
    for path in ("//v1/models", "/v1/models/", "/v1//models/general_purpose", "/v1/models//"):
        status, _, answer = await call(http, running, "GET", path, {}, TEAM_B)
        assert status == 200, (path, answer)
    body = {"json": {"model": "general_purpose", "messages": MESSAGES}}
    status, _, answer = await call(http, running, "GET", "/v1/embeddings/", {}, TEAM_B)
    assert status == 405 and answer["error"]["code"] == "method_not_allowed"
    status, headers, _ = await call(http, running, "POST", "/v1///chat//completions//?x=1", body, TEAM_B)
    assert status == 200 and headers["x-tiergate-route"] == "general_purpose:standard"
    assert all(r.path != "/v1/chat/completions/" for r in responses_upstream.requests)  # never passed through
