"""Real Redis topologies of a test's own on free loopback ports: a Redis Cluster (three masters,
each with a replica) and a Sentinel set (a primary, a replica, one sentinel). Started with
redis-server and redis-cli, without persistence, and torn down after; the shared Redis on 6379 is
never touched. Skipped when redis-server or redis-cli is not installed."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from .conftest import _free_port, until


def _binaries() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        reason = "redis-server and redis-cli are needed for a local Redis Cluster or Sentinel set"
        if os.environ.get("TIERGATE_TEST_REQUIRE_SERVICES") == "1":  # CI installs them (.ci/run)
            pytest.fail(reason)
        pytest.skip(reason)
    return server, cli


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)


async def _answers(port: int) -> bool:
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


class _Servers:
    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[int, asyncio.subprocess.Process] = {}

    async def start_server(self, port: int, *extra: str) -> None:
        server, _ = _binaries()
        workdir = self.root / str(port)
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = await _spawn(server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                        "--appendonly", "no", "--dir", str(workdir), *extra)

    async def kill(self, port: int) -> None:
        proc = self.procs.get(port)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        for port in list(self.procs):
            await self.kill(port)


class LocalCluster(_Servers):
    """Three masters and three replicas (`redis-cli --cluster create ... --cluster-replicas 1`)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.ports = [_free_port() for _ in range(6)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    async def start(self) -> LocalCluster:
        _, cli = _binaries()
        for port in self.ports:
            await self.start_server(port, "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                                    "--cluster-port", str(_free_port()),  # not port + 10000: may be > 65535
                                    "--cluster-config-file", f"nodes-{port}.conf",
                                    "--cluster-replica-validity-factor", "0")
        for port in self.ports:
            await until(lambda port=port: _answers(port), timeout=10)
        create = await asyncio.create_subprocess_exec(
            cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "1",
            "--cluster-yes", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(create.communicate(), 30)
        assert create.returncode == 0, out.decode(errors="replace")
        await until(self.healthy, timeout=20)
        return self

    async def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every slot has a live master."""
        for port, proc in self.procs.items():
            if proc.returncode is not None:
                continue
            client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                info = await client.execute_command("CLUSTER", "INFO")
            except (OSError, aioredis.RedisError):
                return False
            finally:
                await client.aclose()
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    async def master_of(self, key: str) -> int:
        """The port of the master holding `key`'s slot."""
        live = next(p for p, proc in self.procs.items() if proc.returncode is None)
        client = aioredis.Redis(host="127.0.0.1", port=live)
        try:
            slot = await client.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, master, *_ in await client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            await client.aclose()
        raise AssertionError(f"no master holds {key}")


class LocalSentinel(_Servers):
    """A primary, its replica and one sentinel watching them as `tiergate-main` (quorum 1)."""

    service = "tiergate-main"

    def __init__(self, root: Path):
        super().__init__(root)
        self.primary, self.replica, self.sentinel = _free_port(), _free_port(), _free_port()

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{self.service}/0"

    async def start(self) -> LocalSentinel:
        await self.start_server(self.primary)
        await self.start_server(self.replica, "--replicaof", "127.0.0.1", str(self.primary))
        conf = self.root / "sentinel.conf"
        conf.write_text(f"port {self.sentinel}\nbind 127.0.0.1\n"
                        f"sentinel monitor {self.service} 127.0.0.1 {self.primary} 1\n"
                        f"sentinel down-after-milliseconds {self.service} 1000\n"
                        f"sentinel failover-timeout {self.service} 3000\n")
        server, _ = _binaries()
        self.procs[self.sentinel] = await _spawn(server, str(conf), "--sentinel")
        for port in (self.primary, self.replica, self.sentinel):
            await until(lambda port=port: _answers(port), timeout=10)
        await until(self._replica_known, timeout=15)
        return self

    async def master(self) -> int:
        client = aioredis.Redis(host="127.0.0.1", port=self.sentinel, socket_timeout=1)
        try:
            _, port = await client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            return int(port)
        finally:
            await client.aclose()

    async def _replica_known(self) -> bool:
        client = aioredis.Redis(host="127.0.0.1", port=self.sentinel, socket_timeout=1)
        try:
            replicas = await client.execute_command("SENTINEL", "REPLICAS", self.service)
            return bool(replicas)
        finally:
            await client.aclose()

    async def failover(self) -> int:
        """Promote the replica (SENTINEL FAILOVER); the port of the new primary once the sentinel names it."""
        old = await self.master()
        async def accepted() -> bool:  # NOGOODSLAVE until the sentinel has heard the replica out
            client = aioredis.Redis(host="127.0.0.1", port=self.sentinel, socket_timeout=1)
            try:
                await client.execute_command("SENTINEL", "FAILOVER", self.service)
                return True
            except aioredis.ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc):
                    raise
                return False
            finally:
                await client.aclose()

        await until(accepted, timeout=15)

        async def moved() -> bool:
            return await self.master() != old

        await until(moved, timeout=15)
        return await self.master()
