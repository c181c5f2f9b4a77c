"""Real-Postgres helpers for tests: a fresh schema per test, and a TCP forwarder to cut the database.

The database is TIERGATE_TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test).
Unreachable: the test is skipped, or failed when TIERGATE_TEST_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web

from proxy.router import Router
from proxy.server import build_app

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def database_url() -> str:
    return os.environ.get("TIERGATE_TEST_DATABASE_URL") or DEFAULT_URL


def with_search_path(url: str, schema: str) -> str:
    """The same URL with `?search_path=schema` (asyncpg passes unknown query keys as server settings)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"] + [("search_path", schema)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_address(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=(auth + "@" if auth else "") + f"{host}:{port}"))


async def connect_or_skip(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = f"PostgreSQL unreachable at {urlsplit(url).hostname}:{urlsplit(url).port} ({type(exc).__name__}); " \
                 "set TIERGATE_TEST_DATABASE_URL"
        if os.environ.get("TIERGATE_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass
class Schema:
    """A schema of its own for one test: `url` puts tiergate in it, `conn` runs plain SQL in it."""

    name: str
    url: str
    conn: asyncpg.Connection

    def url_via(self, port: int) -> str:
        """The schema's URL, but reaching Postgres through a forwarder on 127.0.0.1:port."""
        return with_address(self.url, "127.0.0.1", port)


@contextlib.asynccontextmanager
async def fresh_schema() -> AsyncIterator[Schema]:
    base = database_url()
    admin = await connect_or_skip(base)
    name = f"tg_test_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE SCHEMA "{name}"')
    url = with_search_path(base, name)
    conn = await asyncpg.connect(url, timeout=5)
    try:
        yield Schema(name, url, conn)
    finally:
        await conn.close()
        await admin.execute(f'DROP SCHEMA "{name}" CASCADE')
        await admin.close()


class Forwarder:
    """A loopback TCP forwarder to Postgres that the test can close (cutting every connection) and reopen."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def to(cls, url: str) -> Forwarder:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    async def open(self) -> Forwarder:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and cut every open connection, as a database host going away would."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the other side went away: closing below is all there is to do
    finally:
        writer.transport.abort()


async def poll(condition: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.01,
               what: str = "condition") -> Any:
    """Await `condition()` until it returns something truthy; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Served:
    url: str
    router: Router
    runner: web.AppRunner


async def serve_router(router: Router) -> Served:
    """Run a router behind the real aiohttp app on a loopback port."""
    runner = web.AppRunner(build_app(router), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Served(f"http://127.0.0.1:{port}", router, runner)
