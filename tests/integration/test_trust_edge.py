"""Each request stays inside its route, its provider's API and its key: path traversal in pass-through,
bring-your-own-key, secrets in relayed errors and headers, 4xx for bad targets and bodies, the key on
`/health/details`, hop-by-hop and forwarding headers. Real tiergate, real sockets, and an upstream that
records what it gets and normalises paths as nginx does."""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from proxy.engine.router import Router
from proxy.settings import RouterConfig
from proxy.table.routing import table_from_dict

from ..conftest import Running, production_runner

PROVIDER_KEY = "sk-prov-SECRET-a1b2c3d4e5f6g7h8"
HEADER_SECRET = "hdr-SECRET-9f8e7d6c5b4a"
BYOK_KEY = "sk-client-OWN-KEY-0011223344"
TIERGATE_KEY = "sk-team-a-INBOUND-777888999"
TEAM_A = {"Authorization": f"Bearer {TIERGATE_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class EdgeUpstream:
    """An OpenAI-like provider behind an nginx: the raw path is decoded and its dot segments resolved
    (posixpath.normpath), `/internal/*` echoes the Authorization it got. `fail` makes every call a
    500 whose body and headers echo what was sent (the key, the table's secret header, OpenAI's
    masked fragment), the body written a few bytes at a time."""

    fail: int = 0
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> EdgeUpstream:
        self._runner = web.ServerRunner(web.Server(self.handle))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        path = posixpath.normpath(unquote(request.raw_path.partition("?")[0]))  # as nginx resolves it
        auth = request.headers.get("Authorization", "")
        if path.startswith("/internal/"):
            return web.json_response({"echo": auth})
        if self.fail:
            return await self._echo_failure(request, auth)
        if path == "/v1/chat/completions":
            payload = orjson.loads(body)
            return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                                      "model": payload.get("model"),
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                   "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        return web.json_response({"object": "list", "path": path, "data": []})

    async def _echo_failure(self, request: web.BaseRequest, auth: str) -> web.StreamResponse:
        key = auth.removeprefix("Bearer ")
        echoed = orjson.dumps({"error": {
            "message": f"Incorrect API key provided: {key[:8]}****{key[-4:]}. You sent {dict(request.headers)}",
            "type": "server_error", "param": None, "code": None}})
        response = web.StreamResponse(status=self.fail, headers={
            "Content-Type": "application/json", "x-echo-auth": auth,
            "x-echo-custom": request.headers.get("x-custom-auth", ""), "Content-Length": str(len(echoed))})
        await response.prepare(request)
        for i in range(0, len(echoed), 7):  # every secret split across writes
            await response.write(echoed[i:i + 7])
            await asyncio.sleep(0)
        await response.write_eof()
        return response


@pytest.fixture
async def edge_upstream() -> AsyncIterator[EdgeUpstream]:
    server = await EdgeUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def run_tiergate() -> AsyncIterator[Any]:
    started: list[Running] = []

    async def start(doc: dict[str, Any], **settings: Any) -> Running:
        base = {"timeout": 5.0, "retry_backoff": 0.001, "retry_after_cap": 0.05, "enable_caching": False,
                "health_check_interval": 0,
                **settings}
        config = RouterConfig.load(environ={"HDR_SECRET": HEADER_SECRET}, dotenv_path=None, overrides=base)
        router = Router(config, table=table_from_dict(doc, source="test", allow_model_override=True))
        runner = production_runner(router)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        running = Running(f"http://127.0.0.1:{port}", router, runner)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.runner.cleanup()


def table(upstream: EdgeUpstream, **provider: Any) -> dict[str, Any]:
    return {"providers": {"primary": {"base_url": upstream.url, "api_key": PROVIDER_KEY,
                                      "headers": {"x-custom-auth": "${HDR_SECRET}"}, **provider}},
            "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "primary/model-a"}],
            "passthrough_provider": "primary"}


async def send(http: aiohttp.ClientSession, running: Running, method: str, path: str,
               headers: dict[str, str] | None = None, **body: Any) -> tuple[int, Any, bytes]:
    """A request whose target goes exactly as written (no client-side dot or slash resolution)."""
    async with http.request(method, URL(running.url + path, encoded=True), headers=headers, **body) as resp:
        return resp.status, resp.headers, await resp.read()


async def raw_request(running: Running, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request written on a socket as is; the status and body of the answer."""
    host, port = running.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode("latin-1") + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                 + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def openai_error(body: bytes) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- path traversal in pass-through -------------------------------------------------------------------

TRAVERSALS = [
    "/v1/vector_stores/../../internal/keys",
    "/v1/vector_stores/%2e%2e/%2e%2e/internal/keys",
    "/v1/vector_stores/%2E%2E/%2E%2E/internal/keys",
    "/v1/vector_stores/..%2f..%2finternal/keys",
    "/v1/vector_stores/..%2F..%2Finternal/keys",
    "/v1/vector_stores/..\\..\\internal/keys",
    "/v1/vector_stores/%5c..%5c..%5cinternal/keys",
    "/v1/vector_stores%00/../../internal/keys",
    "/v1/..//internal/keys",
    "/v1/./../internal/keys",
    "/v1/files/%zz",
    "/../internal/keys",
]


async def test_a_path_that_climbs_or_is_ambiguous_is_a_400_and_never_reaches_the_provider(
        edge_upstream, run_tiergate, http):
    running = await run_tiergate(table(edge_upstream))
    for path in TRAVERSALS:
        for method in ("GET", "POST", "DELETE"):
            status, _, body = await send(http, running, method, path)
            assert status == 400, (path, body)
            assert openai_error(body)["code"] == "invalid_path"
            assert PROVIDER_KEY.encode() not in body
    assert edge_upstream.seen == []  # the nginx behind never saw one of them


async def test_dot_segments_and_slashes_are_resolved_before_the_route_is_chosen(edge_upstream, run_tiergate,
                                                                                  http):
    other = await EdgeUpstream().start()
    try:
        doc = table(edge_upstream)
        doc["providers"]["other"] = {"base_url": other.url, "api_key": "sk-other-0000000000"}
        doc["passthrough_paths"] = {"/v1/vector_stores": "other"}
        running = await run_tiergate(doc)
        status, _, body = await send(http, running, "GET", "/v1/vector_stores/../files?limit=2")
        assert status == 200, body
        assert [s.raw_path for s in edge_upstream.seen] == ["/v1/files?limit=2"]  # files' provider, not other's
        assert other.seen == []
        status, _, _ = await send(http, running, "GET", "/v1//vector_stores/./vs_1//")
        assert status == 200 and [s.raw_path for s in other.seen] == ["/v1/vector_stores/vs_1"]
        status, _, body = await send(http, running, "GET", "/v1/models/org%2Fmodel-x")  # the SDK's encoding
        assert status == 200 and edge_upstream.seen[-1].raw_path == "/v1/models/org%2Fmodel-x"
    finally:
        await other.stop()


# -- 4xx, not a 500 or no answer -------------------------------------------------------------------------


async def test_an_absolute_form_target_is_served_as_its_path(edge_upstream, run_tiergate):
    running = await run_tiergate(table(edge_upstream))
    body = orjson.dumps({"model": "general_purpose", "messages": MESSAGES})
    status, answer = await raw_request(running, "POST http://example.com/v1/chat/completions HTTP/1.1\r\n"
                                                "Host: example.com\r\nContent-Type: application/json\r\n", body)
    assert status == 200 and orjson.loads(answer)["object"] == "chat.completion"
    status, answer = await raw_request(running, "GET http://example.com/v1/../internal/keys HTTP/1.1\r\n"
                                                "Host: example.com\r\n")
    assert status == 400 and openai_error(answer)["code"] == "invalid_path"
    assert [s.raw_path for s in edge_upstream.seen] == ["/v1/chat/completions"]


async def test_a_model_with_cr_or_lf_is_a_400_before_any_upstream_call(edge_upstream, run_tiergate, http):
    running = await run_tiergate(table(edge_upstream))
    for path, extra in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/images/generations", {})):
        for model in ("primary/model-a\r\nx-injected: 1", "gpt\n", "a\rb"):
            status, _, body = await send(http, running, "POST", path, json={"model": model, **extra})
            assert status == 400, (path, model, body)
            assert openai_error(body)["param"] == "model"
    assert edge_upstream.seen == []


async def test_pass_through_json_nested_too_deep_is_a_400(edge_upstream, run_tiergate, http):
    running = await run_tiergate(table(edge_upstream))
    for depth in (255, 300, 1100):
        nested = b'{"model": "general_purpose", "x": ' + b"[" * depth + b"]" * depth + b"}"
        status, _, body = await send(http, running, "POST", "/v1/images/generations", data=nested,
                                     headers={"Content-Type": "application/json"})
        assert status in (200, 400), (depth, body)
        if status == 400:
            assert openai_error(body)["type"] == "invalid_request_error"
        nested = b'{"model": "primary/dall-e", "x": ' + b"[" * depth + b"]" * depth + b"}"
        status, _, body = await send(http, running, "POST", "/v1/images/generations", data=nested,
                                     headers={"Content-Type": "application/json"})
        assert status in (200, 400), (depth, body)


# -- /health/details needs the key -----------------------------------------------------------------------


async def test_health_details_is_behind_the_key_when_keys_are_set(edge_upstream, run_tiergate, http):
    running = await run_tiergate(table(edge_upstream), api_keys=(f"team-a={TIERGATE_KEY}",))
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        status, _, body = await send(http, running, "GET", "/health/details", headers)
        assert status == 401 and openai_error(body)["code"] == "invalid_api_key"
        assert b"team-a" not in body
    status, _, body = await send(http, running, "GET", "/health/details", TEAM_A)
    assert status == 200 and b"providers" in body
    for probe in ("/health", "/ready"):
        assert (await send(http, running, "GET", probe))[0] == 200
    status, _, _ = await send(http, running, "GET", "/health/./details")  # no side door
    assert status == 401


# -- hop-by-hop and forwarding headers -------------------------------------------------------------------


async def test_headers_named_in_connection_and_forwarding_headers_are_not_forwarded(edge_upstream, run_tiergate,
                                                                                   http):
    running = await run_tiergate(table(edge_upstream))
    sent = {"Connection": "keep-alive, X-Hop-Secret, x-other-hop", "X-Hop-Secret": "s3cret",
            "x-other-hop": "1", "X-Forwarded-For": "10.9.8.7", "Via": "1.1 evil", "Forwarded": "for=1.2.3.4",
            "X-Real-IP": "10.0.0.1", "X-Kept": "yes"}
    status, _, _ = await send(http, running, "POST", "/v1/chat/completions", sent,
                              json={"model": "general_purpose", "messages": MESSAGES})
    assert status == 200
    status, _, _ = await send(http, running, "GET", "/v1/files", sent)
    assert status == 200
    assert len(edge_upstream.seen) == 2
    for seen in edge_upstream.seen:
        names = {n.lower() for n in seen.headers}
        assert names.isdisjoint({"x-hop-secret", "x-other-hop", "x-forwarded-for", "via", "forwarded", "x-real-ip"})
        assert {n.lower(): v for n, v in seen.headers.items()}["x-kept"] == "yes"


# -- bring-your-own-key ----------------------------------------------------------------------------------


async def test_bring_your_own_key_never_forwards_tiergates_key(edge_upstream, run_tiergate, http):
    doc = table(edge_upstream, pass_client_key=True)
    del doc["providers"]["primary"]["api_key"]
    running = await run_tiergate(doc, api_keys=(f"team-a={TIERGATE_KEY}",))
    chat = {"model": "general_purpose", "messages": MESSAGES}
    own = {**TEAM_A, "X-Tiergate-Provider-Key": BYOK_KEY}
    assert (await send(http, running, "POST", "/v1/chat/completions", own, json=chat))[0] == 200
    assert (await send(http, running, "GET", "/v1/files", own))[0] == 200
    assert [s.headers.get("Authorization") for s in edge_upstream.seen] == [f"Bearer {BYOK_KEY}"] * 2
    # without a provider key of its own, the client's tiergate key is never what the provider gets
    assert (await send(http, running, "POST", "/v1/chat/completions", TEAM_A, json=chat))[0] == 200
    assert (await send(http, running, "GET", "/v1/files", TEAM_A))[0] == 200
    for seen in edge_upstream.seen:
        assert TIERGATE_KEY not in repr(seen.headers)
    # tiergate's own key put in the provider-key header is refused, not forwarded
    calls = len(edge_upstream.seen)
    for key in (TIERGATE_KEY, f"Bearer {TIERGATE_KEY}"):
        own = {**TEAM_A, "X-Tiergate-Provider-Key": key}
        status, _, body = await send(http, running, "POST", "/v1/chat/completions", own, json=chat)
        assert status == 400 and openai_error(body)["code"] == "invalid_provider_key"
        status, _, body = await send(http, running, "GET", "/v1/files", own)
        assert status == 400
    assert len(edge_upstream.seen) == calls


async def test_bring_your_own_key_in_a_sidecar_takes_the_clients_authorization(edge_upstream, run_tiergate, http):
    doc = table(edge_upstream, pass_client_key=True)
    running = await run_tiergate(doc)  # no inbound keys: Authorization is the client's provider key
    chat = {"model": "general_purpose", "messages": MESSAGES}
    assert (await send(http, running, "POST", "/v1/chat/completions", {"Authorization": f"Bearer {BYOK_KEY}"},
                       json=chat))[0] == 200
    assert edge_upstream.seen[-1].headers["Authorization"] == f"Bearer {BYOK_KEY}"


# -- secrets in relayed errors ---------------------------------------------------------------------------

SECRETS = (PROVIDER_KEY, HEADER_SECRET, BYOK_KEY, PROVIDER_KEY[:8] + "****", PROVIDER_KEY[-12:],
           HEADER_SECRET[-12:], BYOK_KEY[-12:])


def assert_no_secret(status: int, headers: Any, body: bytes) -> None:
    text = body.decode() + "\n" + "\n".join(f"{k}: {v}" for k, v in headers.items())
    for secret in SECRETS:
        assert secret not in text, (secret, text)


async def test_secrets_are_redacted_from_relayed_errors_and_headers_on_every_path(edge_upstream, run_tiergate,
                                                                                  http):
    running = await run_tiergate(table(edge_upstream), max_retries=1)
    edge_upstream.fail = 400
    chat = {"model": "general_purpose", "messages": MESSAGES}
    for fail in (400, 500):
        edge_upstream.fail = fail
        for method, path, body in (("POST", "/v1/chat/completions", {"json": chat}),
                                   ("POST", "/v1/images/generations", {"json": {"prompt": "x"}}),
                                   ("GET", "/v1/files/file-1/content", {})):
            status, headers, answer = await send(http, running, method, path, **body)
            assert status == fail, (path, answer)
            assert_no_secret(status, headers, answer)
            if "x-echo-auth" in headers:
                assert headers["x-echo-auth"] == "Bearer [redacted]" or set(headers["x-echo-auth"]) <= set("Bearer *")
    assert any(s.headers.get("x-custom-auth") == HEADER_SECRET for s in edge_upstream.seen)  # it was sent


async def test_a_clients_own_provider_key_is_redacted_too(edge_upstream, run_tiergate, http):
    doc = table(edge_upstream, pass_client_key=True)
    running = await run_tiergate(doc, api_keys=(f"team-a={TIERGATE_KEY}",), max_retries=1)
    edge_upstream.fail = 401
    own = {**TEAM_A, "X-Tiergate-Provider-Key": BYOK_KEY}
    for method, path, body in (("POST", "/v1/chat/completions", {"json": {"model": "general_purpose",
                                                                           "messages": MESSAGES}}),
                               ("GET", "/v1/files", {})):
        status, headers, answer = await send(http, running, method, path, own, **body)
        assert status == 401, answer
        assert_no_secret(status, headers, answer)


async def test_bring_your_own_key_goes_in_the_providers_own_key_header(edge_upstream, run_tiergate, http):
    """A provider whose key goes in another header than Authorization (`api_key_header: x-api-key`) gets the
    client's own key there, bare, on routed and pass-through paths; never as Authorization."""
    doc = table(edge_upstream, pass_client_key=True, api_key_header="x-api-key")
    running = await run_tiergate(doc, api_keys=(f"team-a={TIERGATE_KEY}",))
    own = {**TEAM_A, "X-Tiergate-Provider-Key": BYOK_KEY}
    chat = {"model": "general_purpose", "messages": MESSAGES}
    assert (await send(http, running, "POST", "/v1/chat/completions", own, json=chat))[0] == 200
    assert (await send(http, running, "GET", "/v1/files", own))[0] == 200
    for seen in edge_upstream.seen:
        headers = {n.lower(): v for n, v in seen.headers.items()}
        assert headers["x-api-key"] == BYOK_KEY and "authorization" not in headers
        assert TIERGATE_KEY not in repr(seen.headers)
