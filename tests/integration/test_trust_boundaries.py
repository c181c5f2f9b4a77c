"""What a request can make tiergate do with its credentials beyond the path: a provider's redirect is
never followed (the key would go where it points); a provider key that is also an inbound key is refused
at start and on reload; the headers of a routed success carry no secret tiergate sent. Real tiergate,
real sockets, upstreams that record what they get."""

from __future__ import annotations

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

from proxy.engine.router import Router
from proxy.settings import RouterConfig
from proxy.table.routing import table_from_dict
from proxy.types import ConfigError

from ..conftest import Running, production_runner, until

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
