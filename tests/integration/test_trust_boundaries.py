"""What a request can make tiergate do with its credentials beyond the path: a provider's redirect is
never followed (the key would go where it points); a provider key that is also an inbound key is refused
at start and on reload; the headers of a routed success carry no secret tiergate sent. Real tiergate,
real sockets, upstreams that record what they get."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from aiohttp import web
from yarl import URL

from proxy.engine.router import Router
from proxy.settings import RouterConfig
from proxy.table.routing import table_from_dict
from proxy.table.store import init_db, load_migrations, migrate, read_snapshot
from proxy.types import ConfigError

from ..conftest import Running, production_runner, until
from ..pg import fresh_schema

PROVIDER_KEY = "sk-prov-SECRET-a1b2c3d4e5f6g7h8"
HEADER_SECRET = "hdr-SECRET-9f8e7d6c5b4a"
PORTKEY_KEY = "pk-portkey-SECRET-5566778899"
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Recorder:
    """An aiohttp server: `handler(request)` answers; every request's path and headers are kept."""

    handler: Callable[[web.BaseRequest], Any]
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    runner: web.ServerRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Recorder:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            await request.read()
            self.seen.append((request.raw_path, dict(request.headers)))
            return await self.handler(request)

        self.runner = web.ServerRunner(web.Server(handle))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    started: list[Recorder] = []

    async def start(handler: Callable[[web.BaseRequest], Any]) -> Recorder:
        server = await Recorder(handler).start()
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.runner is not None
        await server.runner.cleanup()


def chat_answer(model: str = "model-a", content: str = "ok") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


async def answer_ok(request: web.BaseRequest) -> web.StreamResponse:
    if request.path.endswith("/models"):
        return web.json_response({"object": "list", "data": [{"id": "model-a", "object": "model"}]})
    return web.json_response(chat_answer())


def redirecting(target: Callable[[], str], status: int = 307) -> Callable[[web.BaseRequest], Any]:
    """Answers every call under /v1 with a redirect to `target()`; anything else with a 200 echo."""
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            return web.Response(status=status, headers={"Location": target()})
        return web.json_response({"echo": dict(request.headers)})

    return handle


def provider(url: str, **extra: Any) -> dict[str, Any]:
    return {"base_url": url, "api_key": PROVIDER_KEY, "headers": {"x-custom-auth": "${HDR_SECRET}"}, **extra}


def one_route(providers: dict[str, Any], model: str = "primary/model-a",
              fallbacks: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"providers": providers,
            "routes": [{"use_case": "general_purpose", "tier": "standard", "model": model,
                        "fallbacks": list(fallbacks)}]}


def settings(**overrides: Any) -> RouterConfig:
    base = {"timeout": 5.0, "retry_backoff": 0.001, "retry_after_cap": 0.05, "enable_caching": False,
            "health_check_interval": 0, **overrides}
    return RouterConfig.load(environ={"HDR_SECRET": HEADER_SECRET}, dotenv_path=None, overrides=base)


@pytest.fixture
async def run() -> AsyncIterator[Callable[..., Any]]:
    started: list[Running] = []

    async def start(doc: dict[str, Any], **overrides: Any) -> Running:
        router = Router(settings(**overrides), table=table_from_dict(doc, source="test"))
        runner = production_runner(router)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        started.append(Running(f"http://127.0.0.1:{port}", router, runner))
        return started[-1]

    yield start
    for running in started:
        await running.runner.cleanup()


def client(running: Running, key: str = "sk-anything") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key=key, max_retries=0)


def holds_secret(seen: list[tuple[str, dict[str, str]]]) -> bool:
    blob = orjson.dumps(seen)
    return any(s.encode() in blob for s in (PROVIDER_KEY, HEADER_SECRET, PORTKEY_KEY))


# -- a provider's redirect is not followed -----------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_provider_redirect_to_another_host_is_not_followed(servers, run, status):
    elsewhere = await servers(answer_ok)
    primary = await servers(redirecting(lambda: elsewhere.origin + "/steal", status))
    running = await run(one_route({"primary": provider(primary.origin + "/v1")}))
    async with client(running) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(model="general_purpose", messages=MESSAGES)
        assert caught.value.status_code == 502
        assert "redirect" in caught.value.message and "base_url" in caught.value.message
        assert "Location" not in caught.value.response.headers
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(model="general_purpose", messages=MESSAGES, stream=True)
        assert caught.value.status_code == 502
    assert primary.seen  # asked (as many times as the route's attempts allow), never followed
    assert elsewhere.seen == []  # neither the key nor the table's secret header went there


async def test_a_provider_redirect_on_its_own_host_is_not_followed_either(servers, run):
    primary = await servers(redirecting(lambda: primary.origin + "/internal/keys"))
    running = await run(one_route({"primary": provider(primary.origin + "/v1")}))
    async with client(running) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(model="general_purpose", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert PROVIDER_KEY not in caught.value.message
    assert {path for path, _ in primary.seen} == {"/v1/chat/completions"}


async def test_a_redirecting_primary_falls_back_and_the_key_header_stays_home(servers, run):
    elsewhere = await servers(answer_ok)
    primary = await servers(redirecting(lambda: elsewhere.origin + "/v1/chat/completions"))
    backup = await servers(answer_ok)
    providers = {"primary": provider(primary.origin + "/v1", api_key_header="x-portkey-api-key",
                                     api_key=PORTKEY_KEY),
                 "backup": provider(backup.origin + "/v1")}
    running = await run(one_route(providers, fallbacks=("backup/model-b",)))
    async with client(running) as sdk:
        answer = await sdk.chat.completions.with_raw_response.create(model="general_purpose", messages=MESSAGES)
    assert answer.headers["x-tiergate-provider"] == "backup"
    assert elsewhere.seen == [] and not holds_secret(elsewhere.seen)


async def test_health_checks_and_discovery_do_not_follow_redirects(servers, run):
    elsewhere = await servers(answer_ok)
    primary = await servers(redirecting(lambda: elsewhere.origin + "/v1/models"))
    running = await run(one_route({"primary": provider(primary.origin + "/v1")}))
    with pytest.raises(Exception, match="302|307"):
        await running.router.providers["primary"].get_json("/models", 5.0)
    assert primary.seen and elsewhere.seen == []


async def test_pass_through_relays_a_redirect_as_the_provider_sent_it(servers, run):
    elsewhere = await servers(answer_ok)
    primary = await servers(redirecting(lambda: elsewhere.origin + "/v1/files"))
    running = await run({**one_route({"primary": provider(primary.origin + "/v1")}),
                         "passthrough_provider": "primary"})
    async with aiohttp.ClientSession() as http, \
            http.get(running.v1 + "/files", allow_redirects=False) as resp:
        assert resp.status == 307
        assert resp.headers["Location"] == elsewhere.origin + "/v1/files"
    assert primary.seen and elsewhere.seen == []


# -- a provider key that is also an inbound key ------------------------------------------------------

def table_file(path: Path, upstream_url: str, key: str) -> Path:
    path.write_text(yaml.safe_dump({"providers": {"primary": {"base_url": upstream_url, "api_key": key}},
                                    "routes": [{"use_case": "general_purpose", "tier": "standard",
                                                "model": "primary/model-a"}]}))
    return path


@pytest.mark.parametrize("inbound", [f"team-a={PROVIDER_KEY}", PROVIDER_KEY, f"team-a={PROVIDER_KEY[:-3]}",
                                     f"team-a=x{PROVIDER_KEY}x", f"team-a={HEADER_SECRET}"])
async def test_a_provider_credential_that_is_an_inbound_key_stops_the_start(servers, inbound):
    primary = await servers(answer_ok)
    router = Router(settings(api_keys=(inbound, "team-b=sk-team-b-OTHER-000111")),
                    table=table_from_dict(one_route({"primary": provider(primary.origin + "/v1")}), source="test"))
    with pytest.raises(ConfigError) as caught:
        await router.initialize()
    await router.close()
    message = str(caught.value)
    assert "primary" in message and "inbound key" in message
    assert PROVIDER_KEY[:8] not in message and HEADER_SECRET[:8] not in message


async def test_a_keys_file_or_table_reloaded_onto_a_provider_key_is_refused_and_the_old_stays(servers, tmp_path):
    primary = await servers(answer_ok)
    keys = tmp_path / "keys"
    keys.write_text("team-a=sk-team-a-INBOUND-1234567\n")
    table = table_file(tmp_path / "routes.yaml", primary.origin + "/v1", PROVIDER_KEY)
    config = RouterConfig.load(environ={"TIERGATE_API_KEYS_FILE": str(keys)}, dotenv_path=None, overrides={
        "config_path": str(table), "table_watch_interval": 0.05, "health_check_interval": 0})
    async with Router(config) as router:
        runner = production_runner(router)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        team_a = {"Authorization": "Bearer sk-team-a-INBOUND-1234567"}
        try:
            async with aiohttp.ClientSession() as http:
                async def details() -> dict[str, Any]:
                    async with http.get(url + "/health/details", headers=team_a) as resp:
                        return orjson.loads(await resp.read())

                keys.write_text(f"team-a=sk-team-a-INBOUND-1234567\nteam-x={PROVIDER_KEY}\n")
                await until(lambda: _failures(details, "keys_file_watch"))
                assert router.inbound_keys == ("team-a=sk-team-a-INBOUND-1234567",)
                async with http.get(url + "/v1/models", headers={"Authorization": f"Bearer {PROVIDER_KEY}"}) as resp:
                    assert resp.status == 401  # the refused keys file never took effect
                table_file(table, primary.origin + "/v1", "sk-team-a-INBOUND-1234567")
                await until(lambda: _failures(details, "routing_table", "file_watch"))
                assert router.providers["primary"].has_key
                report = orjson.dumps(await details())
                assert b"INBOUND" not in report and PROVIDER_KEY[:8].encode() not in report
                assert b"inbound key" in report
                assert router.table.providers["primary"].api_key == PROVIDER_KEY  # the old table runs
        finally:
            await runner.cleanup()


async def _failures(details: Callable[[], Any], *path: str) -> bool:
    found = await details()
    for part in path:
        found = found.get(part) or {}
    return found.get("failures", 0) >= 1


# -- the headers of a routed success ------------------------------------------------------------------

async def echo_headers(request: web.BaseRequest) -> web.StreamResponse:
    """A success whose headers quote what it was sent: the key whole, OpenAI's masked fragment, the
    table's secret header."""
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    echoed = {"x-echo-auth": request.headers.get("Authorization", ""), "x-echo-custom": request.headers.get(
        "x-custom-auth", ""), "x-debug-key": f"{key[:3]}****{key[-4:]}", "x-ratelimit-remaining-requests": "99"}
    if orjson.loads(await request.read()).get("stream"):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **echoed})
        await response.prepare(request)
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "model-a",
                 "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response
    return web.json_response(chat_answer(), headers=echoed)


async def test_the_headers_of_a_routed_success_carry_no_secret(servers, run):
    primary = await servers(echo_headers)
    running = await run(one_route({"primary": provider(primary.origin + "/v1")}))
    async with client(running) as sdk:
        plain = await sdk.chat.completions.with_raw_response.create(model="general_purpose", messages=MESSAGES)
        async with sdk.chat.completions.with_streaming_response.create(
                model="general_purpose", messages=MESSAGES, stream=True) as streamed:
            chunks = [chunk async for chunk in await streamed.parse()]
    assert chunks and chunks[0].choices[0].delta.content == "ok"
    for answer in (plain, streamed):
        headers = dict(answer.headers)
        blob = orjson.dumps(headers)
        assert PROVIDER_KEY[:8].encode() not in blob and PROVIDER_KEY[-4:].encode() not in blob
        assert HEADER_SECRET.encode() not in blob
        assert headers["x-echo-custom"] == "[redacted]" and headers["x-ratelimit-remaining-requests"] == "99"


# -- stored objects named inside routed bodies, and lists paged per key --------------------------------

KEY_A, KEY_B = "sk-team-a-INBOUND-1234567", "sk-team-b-INBOUND-7654321"
KEYS = (f"team-a={KEY_A}", f"team-b={KEY_B}")
PREFIXES = {"files": "file-", "vector_stores": "vs_", "conversations": "conv_", "batches": "batch_"}


@dataclass
class ObjectsProvider:
    """Stored objects as OpenAI keeps them, listed newest first in cursor pages (`limit`, `after`,
    `first_id`/`last_id`/`has_more`); chat answered; every call recorded."""

    objects: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {c: [] for c in PREFIXES})
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        self.calls.append((request.method, request.path_qs))
        collection = request.path.removeprefix("/v1/")
        if request.path == "/v1/chat/completions":
            return web.json_response(chat_answer())
        if collection not in self.objects:
            return web.json_response({"error": {"message": "no", "type": "invalid_request_error", "param": None,
                                                "code": None}}, status=404)
        kept = self.objects[collection]
        if request.method == "POST":
            made = {"id": f"{PREFIXES[collection]}{len(kept) + 1:03d}", "object": collection.rstrip("s")}
            kept.append(made)
            return web.json_response(made)
        newest_first = kept[::-1]
        after = request.query.get("after")
        start = next(i + 1 for i, o in enumerate(newest_first) if o["id"] == after) if after else 0
        limit = int(request.query.get("limit", "20"))
        page = newest_first[start:start + limit]
        return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None,
                                  "has_more": start + limit < len(newest_first)})


async def keyed_gateway(servers: Callable[..., Any], run: Callable[..., Any]) -> tuple[ObjectsProvider, Running]:
    objects = ObjectsProvider()
    upstream = await servers(objects)
    running = await run({**one_route({"primary": provider(upstream.origin + "/v1")}),
                         "passthrough_provider": "primary"}, api_keys=KEYS)
    return objects, running


async def test_stored_objects_named_in_a_routed_body_must_be_the_keys_own(servers, run):
    objects, running = await keyed_gateway(servers, run)
    a = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_A, max_retries=0)
    b = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_B, max_retries=0)
    async with a, b:
        a_file = (await a.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")).id
        a_store = (await a.vector_stores.create(name="a")).id
        a_conversation = (await a.conversations.create()).id
        file_part = [{"role": "user", "content": [{"type": "text", "text": "read"},
                                                  {"type": "file", "file": {"file_id": a_file}}]}]
        answered = await a.chat.completions.create(model="general_purpose", messages=file_part)
        assert answered.choices[0].message.content == "ok"  # the owner may
        sent = len(objects.calls)
        refused = [
            lambda: b.chat.completions.create(model="general_purpose", messages=file_part),
            lambda: b.responses.create(model="general_purpose", input=[{"role": "user", "content": [
                {"type": "input_file", "file_id": a_file}]}]),
            lambda: b.responses.create(model="general_purpose", input="hi", conversation=a_conversation),
            lambda: b.responses.create(model="general_purpose", input="hi", prompt={  # a template's variable
                "id": "pmpt_1", "variables": {"doc": {"type": "input_file", "file_id": a_file}}}),
            lambda: b.responses.create(model="general_purpose", input="hi", conversation={"id": a_conversation}),
            lambda: b.responses.create(model="general_purpose", input="hi",
                                       tools=[{"type": "file_search", "vector_store_ids": [a_store]}]),
            lambda: b.batches.create(input_file_id=a_file, endpoint="/v1/chat/completions",
                                     completion_window="24h"),
        ]
        for call in refused:
            with pytest.raises(openai.NotFoundError) as caught:
                await call()
            assert caught.value.body["code"] == "not_found" and caught.value.body["param"] in (
                "file_id", "conversation", "vector_store_ids", "id")
    assert len(objects.calls) == sent  # none of them reached the provider
    async with aiohttp.ClientSession() as http, http.post(running.v1 + "/messages", headers={"x-api-key": KEY_B}, json={
            "model": "general_purpose", "max_tokens": 10, "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "file", "file_id": a_file}}]}]}) as resp:
        answer = orjson.loads(await resp.read())
    assert resp.status == 404 and answer["type"] == "error" and answer["error"]["type"] == "not_found_error"
    assert len(objects.calls) == sent


async def test_a_filtered_list_pages_through_the_keys_own_objects_only(servers, run):
    objects, running = await keyed_gateway(servers, run)
    a = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_A, max_retries=0)
    b = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_B, max_retries=0)
    async with a, b:
        mine = []
        for i in range(25):  # interleaved: B's objects outnumber A's, in runs longer than a page
            owner = a if i % 5 == 0 else b
            made = await owner.vector_stores.create(name=str(i))
            if owner is a:
                mine.append(made.id)
        pages = []
        page = await a.vector_stores.list(limit=2)
        while True:
            pages.append(page.data)
            assert page.first_id == page.data[0].id and page.last_id == page.data[-1].id
            if not page.has_next_page():
                break
            page = await page.get_next_page()
        seen = [store.id for data in pages for store in data]
        assert seen == mine[::-1] and all(len(data) == 2 for data in pages[:-1])
        everything = [store.id async for store in a.vector_stores.list(limit=3)]
        assert everything == mine[::-1]
        assert not [s async for s in b.vector_stores.list(limit=4) if s.id in mine]


# -- cache_scope from Postgres ------------------------------------------------------------------------

async def test_cache_scope_loads_from_postgres_and_its_migration_runs_on_an_existing_database(tmp_path):
    doc = one_route({"primary": {"base_url": "http://127.0.0.1:9/v1", "api_key": PROVIDER_KEY}})
    doc["routes"].append({"use_case": "code_generation", "tier": "premium", "model": "primary/model-p",
                          "cache_scope": "shared"})
    table = tmp_path / "routes.yaml"
    table.write_text(yaml.safe_dump(doc))
    async with fresh_schema() as schema:
        # a database made before the column: every migration but its own, and a route seeded then
        async with schema.conn.transaction():
            await migrate(schema.conn, 5.0, [m for m in load_migrations() if m.version != 5])
        await schema.conn.execute("INSERT INTO llm_providers (name, base_url, api_key) VALUES "
                                  "('primary', 'http://127.0.0.1:9/v1', 'sk-x-12345678')")
        await schema.conn.execute("INSERT INTO llm_routes (use_case, tier, model) VALUES "
                                  "('general_purpose', 'standard', 'primary/model-a')")
        config = RouterConfig.load(environ={}, dotenv_path=None, overrides={"database_url": schema.url})
        report = await init_db(config, table)
        assert report.applied == [5] and not report.seeded  # added to the rows that were there
        loaded = (await read_snapshot(schema.conn, config)).table
        assert loaded.resolve("general_purpose", "standard", None, "chat").route.cache_scope == "key"
        await schema.conn.execute("UPDATE llm_routes SET cache_scope = 'shared'")
        loaded = (await read_snapshot(schema.conn, config)).table
        assert loaded.resolve("general_purpose", "standard", None, "chat").route.cache_scope == "shared"
        await schema.conn.execute("UPDATE llm_routes SET cache_scope = 'everyone'")  # a bad row is named
        with pytest.raises(ConfigError, match=r"cache_scope: 'everyone' is not one of key, shared"):
            await read_snapshot(schema.conn, config)
    async with fresh_schema() as schema:  # a new database seeded from the file keeps the route's scope
        config = RouterConfig.load(environ={}, dotenv_path=None, overrides={"database_url": schema.url})
        await init_db(config, table)
        loaded = (await read_snapshot(schema.conn, config)).table
        assert loaded.resolve("code_generation", "premium", None, "chat").route.cache_scope == "shared"
        assert loaded.resolve("general_purpose", "standard", None, "chat").route.cache_scope == "key"


# -- siblings: other calls tiergate makes with a credential ------------------------------------------

async def test_the_span_exporter_does_not_follow_a_collectors_redirect(servers):
    """The OTLP exporter's transport sends with allow_redirects=False itself (a regression guard: the
    headers of OTEL_EXPORTER_OTLP_HEADERS often hold a vendor's key)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from proxy.observability.span_export import exporter_from_env

    elsewhere = await servers(answer_ok)
    collector = await servers(redirecting(lambda: elsewhere.origin + "/v1/traces"))
    exporter = exporter_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.origin,
                                  "OTEL_EXPORTER_OTLP_HEADERS": "x-vendor-key=vendor-SECRET-123456"})
    memory = InMemorySpanExporter()
    traces = TracerProvider()
    traces.add_span_processor(SimpleSpanProcessor(memory))
    traces.get_tracer("test").start_span("call").end()
    await asyncio.to_thread(exporter.export, memory.get_finished_spans())
    exporter.shutdown()
    assert [path for path, _ in collector.seen] == ["/v1/traces"]
    assert collector.seen[0][1]["x-vendor-key"] == "vendor-SECRET-123456"
    assert elsewhere.seen == []  # the vendor's key stayed with the collector


async def site_headers(request: web.BaseRequest) -> web.StreamResponse:
    """An answer carrying what belongs to the provider's own site."""
    return web.json_response({"object": "list", "data": [], "has_more": False}, headers={
        "Set-Cookie": "__cf_bm=provider-session; path=/; HttpOnly", "Alt-Svc": 'h3=":443"; ma=86400',
        "Strict-Transport-Security": "max-age=31536000", "x-request-id": "up-1"})


async def test_pass_through_keeps_the_providers_site_headers_as_the_routed_paths_do(servers, run):
    primary = await servers(site_headers)
    running = await run({**one_route({"primary": provider(primary.origin + "/v1")}),
                         "passthrough_provider": "primary"})
    async with aiohttp.ClientSession() as http, http.get(running.v1 + "/files") as resp:
        assert resp.status == 200 and resp.headers["x-request-id"] == "up-1"
        for name in ("Set-Cookie", "Alt-Svc", "Strict-Transport-Security"):
            assert name not in resp.headers
        assert not http.cookie_jar.filter_cookies(URL(running.url))


async def test_a_clients_request_id_is_kept_only_when_it_is_of_a_sane_length(servers, run):
    primary = await servers(answer_ok)
    running = await run(one_route({"primary": provider(primary.origin + "/v1")}))
    async with aiohttp.ClientSession() as http:
        for given, kept in (("req-client-0123456789abcdef", True), ("r" * 4000, False)):
            async with http.post(running.v1 + "/chat/completions", headers={"x-request-id": given},
                                 json={"model": "general_purpose", "messages": MESSAGES}) as resp:
                assert resp.status == 200
                assert (resp.headers["x-tiergate-request-id"] == given) is kept
                assert len(resp.headers["x-tiergate-request-id"]) <= 128
            async with http.get(running.v1 + "/no/such/path/../../..", headers={"x-request-id": given}) as resp:
                assert len(resp.headers["x-request-id"]) <= 128


async def test_a_provider_key_equal_to_a_key_stored_in_postgres_stops_the_start(tmp_path):
    from proxy.table.keystore import create_key

    async with fresh_schema() as schema:
        config = RouterConfig.load(environ={}, dotenv_path=None, overrides={
            "database_url": schema.url, "database_keys": True, "health_check_interval": 0})
        await init_db(config, None)
        secret = await create_key(schema.conn, "team-a", {}, 5.0)
        doc = one_route({"primary": {"base_url": "http://127.0.0.1:9/v1", "api_key": secret}})
        table = tmp_path / "routes.yaml"
        table.write_text(yaml.safe_dump(doc))
        router = Router(config.replace(config_path=str(table)), table=table_from_dict(doc, source="test"),
                        dynamic=True)
        with pytest.raises(ConfigError, match="stored inbound key 'team-a'") as caught:
            await router.initialize()
        await router.close()
        assert secret[:8] not in str(caught.value)


@dataclass
class StoredChats:
    """Chat Completions that keeps answers asked with `store: true`, lists and reads them back, stream or not."""

    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    prefix: str = "chatcmpl-"

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        self.calls.append((request.method, request.path_qs))
        if request.method == "POST" and request.path == "/v1/chat/completions":
            payload = orjson.loads(await request.read())
            answer = {**chat_answer(payload["model"]), "id": f"{self.prefix}{len(self.kept) + 1:03d}"}
            if payload.get("store"):
                self.kept[answer["id"]] = answer
            if not payload.get("stream"):
                return web.json_response(answer)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {"id": answer["id"], "object": "chat.completion.chunk", "created": 1, "model": "model-a",
                     "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
            return response
        if request.path == "/v1/chat/completions":  # oldest first (OpenAI's default order), in cursor pages
            model = request.query.get("model")
            kept = [c for c in self.kept.values() if model is None or c["model"] == model]
            return web.json_response(cursor_page(kept, request.query))
        stored_id, _, sub = request.path.removeprefix("/v1/chat/completions/").partition("/")
        found = self.kept.get(stored_id)
        if found is None:
            return web.json_response({"error": {"message": "no", "type": "invalid_request_error", "param": None,
                                                "code": None}}, status=404)
        if sub == "messages":  # the messages it was asked with: entries of its own, not stored objects
            asked = [{"id": f"{stored_id}-0", "role": "user", "content": "hi"}]
            return web.json_response(cursor_page(asked, request.query))
        if request.method == "DELETE":
            del self.kept[found["id"]]
            return web.json_response({"id": found["id"], "object": "chat.completion.deleted", "deleted": True})
        if request.method == "POST":  # metadata changed
            found["metadata"] = orjson.loads(await request.read()).get("metadata")
        return web.json_response(found)


def cursor_page(items: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    """One page of `items` as OpenAI lists them: `limit` after the `after` cursor, first/last id, has_more."""
    after = query.get("after")
    start = next(i + 1 for i, o in enumerate(items) if o["id"] == after) if after else 0
    limit = int(query.get("limit", "20"))
    page = items[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}


async def test_stored_chat_completions_belong_to_the_key_that_asked_for_them(servers, run):
    chats = StoredChats()
    upstream = await servers(chats)
    running = await run({**one_route({"primary": provider(upstream.origin + "/v1")}),
                         "passthrough_provider": "primary"}, api_keys=KEYS)
    a = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_A, max_retries=0)
    b = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_B, max_retries=0)
    async with a, b:
        plain = await a.chat.completions.create(model="general_purpose", messages=MESSAGES, store=True)
        streamed = [c async for c in await a.chat.completions.create(
            model="general_purpose", messages=MESSAGES, store=True, stream=True)][0].id
        assert (await a.chat.completions.retrieve(plain.id)).id == plain.id
        assert (await a.chat.completions.retrieve(streamed)).id == streamed
        sent = len(chats.calls)
        for stored in (plain.id, streamed):
            with pytest.raises(openai.NotFoundError):
                await b.chat.completions.retrieve(stored)
            with pytest.raises(openai.NotFoundError):
                await b.chat.completions.delete(stored)
        assert len(chats.calls) == sent  # refused before the provider
        assert (await a.chat.completions.delete(plain.id)).deleted  # the owner may


async def test_the_stored_chat_list_pages_through_the_keys_own_answers_and_each_answers_messages(servers, run):
    chats = StoredChats()
    upstream = await servers(chats)
    running = await run({**one_route({"primary": provider(upstream.origin + "/v1")}),
                         "passthrough_provider": "primary"}, api_keys=KEYS)
    a = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_A, max_retries=0)
    b = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_B, max_retries=0)
    async with a, b:
        mine = []
        for i in range(10):  # interleaved: B's answers outnumber A's, in runs longer than a page
            owner = a if i % 4 == 0 else b
            made = await owner.chat.completions.create(model="general_purpose", messages=MESSAGES, store=True)
            if owner is a:
                mine.append(made.id)
        await a.chat.completions.create(model="general_purpose", messages=MESSAGES)  # not kept: not listed
        pages = []
        page = await a.chat.completions.list(limit=2)
        while True:
            pages.append([c.id for c in page.data])
            assert page.model_extra["first_id"] == page.data[0].id and page.model_extra["last_id"] == page.data[-1].id
            if not page.has_next_page():
                break
            page = await page.get_next_page()
        assert [i for ids in pages for i in ids] == mine and [len(ids) for ids in pages] == [2, 1]
        assert [c.id async for c in a.chat.completions.list()] == mine
        theirs = [c.id async for c in b.chat.completions.list(limit=3)]
        assert len(theirs) == 7 and not set(theirs) & set(mine)
        # an answer's messages are the answer's, whole, to its owner and to no one else
        assert [m.content for m in (await a.chat.completions.messages.list(mine[0])).data] == ["hi"]
        assert (await a.chat.completions.update(mine[0], metadata={"team": "a"})).metadata == {"team": "a"}
        sent = len(chats.calls)
        with pytest.raises(openai.NotFoundError):
            await b.chat.completions.messages.list(mine[0])
        with pytest.raises(openai.NotFoundError):
            await b.chat.completions.update(mine[0], metadata={"team": "b"})
        assert len(chats.calls) == sent  # refused before the provider
    async with client(await run({**one_route({"primary": provider(upstream.origin + "/v1")}),
                                 "passthrough_provider": "primary"})) as sidecar:  # no keys: the provider's list
        assert len([c async for c in sidecar.chat.completions.list()]) == 10


async def test_the_stored_chat_list_of_a_route_is_read_where_the_route_sends_its_calls(servers, run):
    passthrough, routed = StoredChats(), StoredChats(prefix="chatcmpl-routed-")
    first, second = await servers(passthrough), await servers(routed)
    doc = one_route({"primary": provider(first.origin + "/v1"), "second": provider(second.origin + "/v1")})
    doc["routes"].append({"use_case": "code_generation", "tier": "premium", "model": "second/model-p"})
    running = await run({**doc, "passthrough_provider": "primary"}, api_keys=KEYS)
    a = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_A, max_retries=0)
    b = openai.AsyncOpenAI(base_url=running.v1, api_key=KEY_B, max_retries=0)
    async with a, b:
        kept = (await a.chat.completions.create(model="code_generation:premium", messages=MESSAGES, store=True)).id
        await b.chat.completions.create(model="code_generation:premium", messages=MESSAGES, store=True)
        await a.chat.completions.create(model="general_purpose", messages=MESSAGES, store=True)
        listed = await a.chat.completions.list(model="code_generation:premium")
        assert [c.id for c in listed.data] == [kept] and listed.data[0].model == "model-p"
        assert routed.calls[-1] == ("GET", "/v1/chat/completions?model=model-p")  # the route's model id
        assert [c.model for c in (await a.chat.completions.list(model="model-a")).data] == ["model-a"]
        assert passthrough.calls[-1] == ("GET", "/v1/chat/completions?model=model-a")  # not tiergate's: as sent
        # one answer, its messages and its deletion: at the provider that gave it, to its key only
        assert (await a.chat.completions.retrieve(kept)).model == "model-p"
        assert [m.content for m in (await a.chat.completions.messages.list(kept)).data] == ["hi"]
        sent = len(routed.calls)
        with pytest.raises(openai.NotFoundError):
            await b.chat.completions.retrieve(kept)
        assert len(routed.calls) == sent
        assert (await a.chat.completions.delete(kept)).deleted and kept not in routed.kept
