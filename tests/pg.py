"""Real-Postgres helpers for tests: a fresh schema per test, and a TCP forwarder to cut the database.

The database is TIERGATE_TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test).
Unreachable: the test is skipped, or failed when TIERGATE_TEST_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web

from proxy.engine.router import Router

from .conftest import production_runner

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
    runner = production_runner(router)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Served(f"http://127.0.0.1:{port}", router, runner)


# --- a private PostgreSQL cluster the test may stop and freeze -----------------------------------


@dataclass
class PrivateCluster:
    """A throw-away PostgreSQL on a loopback port (initdb in a temporary directory). `freeze()`
    SIGSTOPs its postmaster and backends: the server still holds every connection open but answers
    nothing, as a host that hangs would. Only this cluster's processes are ever signalled."""

    directory: str
    port: int
    run_as: tuple[int, int] | None  # (uid, gid) when the tests run as root (PostgreSQL refuses root)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pids(self) -> list[int]:
        postmaster = int(open(os.path.join(self.directory, "data", "postmaster.pid")).readline())
        pids = [postmaster]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                    pids.append(int(entry))
        return pids

    def freeze(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    return None


@contextlib.asynccontextmanager
async def private_cluster() -> AsyncIterator[PrivateCluster]:
    """initdb + pg_ctl start on a free port in a temporary directory; stopped and removed after."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        reason = "PostgreSQL's initdb/pg_ctl are not installed: cannot run a private cluster"
        if os.environ.get("TIERGATE_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    run_as = None
    directory = tempfile.mkdtemp(prefix="tiergate-pg-")
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        run_as = (account.pw_uid, account.pw_gid)
        os.chown(directory, *run_as)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = PrivateCluster(directory, port, run_as)
    as_user: dict[str, Any] = {"user": run_as[0], "group": run_as[1], "extra_groups": []} if run_as else {}
    data = os.path.join(directory, "data")

    async def run(*args: str) -> None:
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, cwd=directory, **as_user)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, f"{args[0]} failed: {err.decode()[-2000:]}"

    started = False
    try:
        await run(initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions")
        await run(pg_ctl, "-D", data, "-l", os.path.join(directory, "log"), "-w", "-t", "30", "-o",
                  f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c synchronous_commit=off -c full_page_writes=off", "start")
        started = True
        yield cluster
    finally:
        if started:
            cluster.thaw()
            await run(pg_ctl, "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(directory, ignore_errors=True)
