"""Shared fixtures: mock upstreams on loopback, a running tiergate, the official OpenAI SDK."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.edge.app import build_app
from proxy.edge.connections import ConnectionLimits, GuardedAppRunner
from proxy.engine.router import Router
from proxy.settings import RouterConfig
from proxy.table.routing import table_from_dict

from .upstream import MockUpstream

REDIS_URL = os.environ.get("TIERGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PRIMARY_KEY = "sk-primary-SECRET-1234567890"
BACKUP_KEY = "sk-backup-SECRET-0987654321"


def make_config(**overrides: Any) -> RouterConfig:
    """Settings for tests: no environment, no .env, small fast timeouts unless overridden."""
    base = {"timeout": 5.0, "retry_backoff": 0.001, "retry_after_cap": 0.05, "enable_monitoring": True}
    base.update(overrides)
    return RouterConfig.load(environ={}, dotenv_path=None, overrides=base)


def table_doc(primary: MockUpstream, backup: MockUpstream | None = None, **route: Any) -> dict[str, Any]:
    """A table with provider `primary` (and `backup` as fallback) for every route of general_purpose."""
    providers: dict[str, Any] = {"primary": {"base_url": primary.url, "api_key": PRIMARY_KEY}}
    fallbacks = []
    if backup is not None:
        providers["backup"] = {"base_url": backup.url, "api_key": BACKUP_KEY,
                               "api_key_header": "x-backup-key"}
        fallbacks = ["backup/model-b"]
    routes = [
        {"use_case": "general_purpose", "tier": "standard", "model": "primary/model-a",
         "fallbacks": fallbacks, **route},
        {"use_case": "code_generation", "tier": "premium", "model": "primary/model-p",
         "fallbacks": fallbacks, "max_tokens": 999, "temperature": 0.1,
         "system_prompt": "You write code."},
    ]
    return {"providers": providers, "routes": routes,
            "aliases": {"fast": "primary/model-fast", "embed-small": "primary/text-embed"}}


@dataclass
class Running:
    url: str
    router: Router
    runner: web.AppRunner

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("primary").start()
    yield server
    await server.stop()


@pytest.fixture
async def backup() -> AsyncIterator[MockUpstream]:
    server = await MockUpstream("backup").start()
    yield server
    await server.stop()


def production_runner(router: Router, *, handler_cancellation: bool = True) -> web.AppRunner:
    """The runner `tiergate serve` uses for `router`'s app: its connection guard and direct routes included."""
    config = router.config
    limits = ConnectionLimits(config.header_timeout, config.keepalive_timeout, config.max_connections or 4096)
    return GuardedAppRunner(build_app(router), limits=limits, handler_cancellation=handler_cancellation,
                            access_log=None, shutdown_timeout=1.0)


@pytest.fixture
async def start_tiergate() -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Factory: `await start_tiergate(doc, **settings)` runs tiergate on a loopback port."""
    started: list[Running] = []

    async def start(doc: dict[str, Any], *, breaker_clock: Any = None, handler_cancellation: bool = True,
                    **settings: Any) -> Running:
        config = make_config(**settings)
        router = Router(config, table=table_from_dict(doc, source="test",
                                                      allow_model_override=config.allow_model_override),
                        breaker_clock=breaker_clock)
        runner = production_runner(router, handler_cancellation=handler_cancellation)
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


# the routing headers as client libraries carry them (LangChain's default_headers, LiteLLM's extra_headers)
ROUTING = {"X-Use-Case": "general_purpose", "X-Model-Tier": "standard"}


@pytest.fixture
async def routed(upstream: MockUpstream, start_tiergate: Callable[..., Awaitable[Running]]) -> Running:
    """tiergate in front of `upstream`, its route naming an embeddings model besides its chat model."""
    doc = table_doc(upstream)
    doc["routes"][0]["embeddings_model"] = "primary/text-embedding-3-small"
    return await start_tiergate(doc)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def tiergate(upstream: MockUpstream, backup: MockUpstream,
                   start_tiergate: Callable[..., Awaitable[Running]]) -> Running:
    """tiergate in front of `upstream` (primary) with `backup` as the fallback."""
    return await start_tiergate(table_doc(upstream, backup))


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError) as exc:
        await client.aclose()
        message = f"Redis at {REDIS_URL} is unreachable ({type(exc).__name__}); set TIERGATE_TEST_REDIS_URL"
        if os.environ.get("TIERGATE_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    yield client
    await client.aclose()


@pytest.fixture
async def namespace(redis_client) -> AsyncIterator[str]:
    ns = f"tiergate-test-{uuid.uuid4().hex}"
    yield ns
    keys = await redis_client.keys(f"{ns}:*")
    if keys:
        await redis_client.delete(*keys)


@dataclass
class SilentServer:
    """A TCP server that accepts connections and never answers (a Redis that hangs)."""

    port: int
    accepted: list[asyncio.StreamWriter]


@pytest.fixture
async def silent_server() -> AsyncIterator[SilentServer]:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept and never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield SilentServer(server.sockets[0].getsockname()[1], accepted)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own, on a free port, without persistence."""

    def __init__(self, tmp_path):
        self.port = _free_port()
        self.dir = tmp_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return
                except OSError:
                    await asyncio.sleep(0.02)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


UNTIL_BACKSTOP = 30.0  # seconds a condition may take before `until` gives up (tests wait on conditions)


async def until(condition: Callable[[], object], timeout: float = UNTIL_BACKSTOP) -> float:
    """Poll `condition` (a function, or one returning an awaitable) until it holds, instead of a fixed
    sleep; the seconds it took. AssertionError when it does not hold within `timeout`, a failure
    backstop only: never less than UNTIL_BACKSTOP, so a loaded machine is not a failing test."""
    timeout = max(timeout, UNTIL_BACKSTOP)
    started = time.monotonic()
    while True:
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.005)
