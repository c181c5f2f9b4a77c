"""`/health/details` while PostgreSQL is frozen (SIGSTOP: connections open, no answer): it reports
what the last query that finished saw and how long ago, and a query waiting without an answer.
A private cluster (initdb on a free port) is frozen, never the shared one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import aiohttp
import orjson
import yaml

from proxy.table.store import init_db

from ..conftest import make_config, table_doc
from ..pg import private_cluster
from ..upstream import MockUpstream
from .test_cli import ENV, free_port, wait_healthy

CHAT = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})


async def database_health(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with asyncio.timeout(2):  # the health endpoint never waits for the database
        async with http.get(url + "/health/details") as resp:
            return (await resp.json())["routing_table"]["database"]


async def test_health_while_postgres_is_frozen_tells_the_age_of_what_it_saw(tmp_path):
    upstream = await MockUpstream("primary").start()
    try:
        async with private_cluster() as cluster:
            table = tmp_path / "routes.yaml"
            table.write_text(yaml.safe_dump(table_doc(upstream)))
            await init_db(make_config(database_url=cluster.url), table)
            port = free_port()
            env = {**ENV, "PYTHONPATH": os.getcwd(), "DATABASE_URL": cluster.url,
                   "TIERGATE_DB_TIMEOUT": "1", "TIERGATE_REFRESH_INTERVAL": "0.5"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--config", str(table), "--port", str(port), env=env,
                cwd=str(tmp_path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            url = f"http://127.0.0.1:{port}"
            try:
                await wait_healthy(url, proc)
                async with aiohttp.ClientSession() as http:
                    async with asyncio.timeout(10):
                        while (await database_health(http, url))["state"] != "connected":
                            await asyncio.sleep(0.05)
                    cluster.freeze()
                    frozen_at = time.time()
                    waited = False
                    try:
                        async with asyncio.timeout(10):
                            while True:
                                asked_at = time.time()  # the server answers later: its ages are longer
                                health = await database_health(http, url)
                                waited = waited or (health["waiting_s"] or 0) > 0
                                if health["state"] != "connected":
                                    break
                                # "connected" is only ever what a query saw before the freeze
                                assert asked_at - health["state_age_s"] <= frozen_at + 0.05, \
                                    (health, asked_at - frozen_at)
                                await asyncio.sleep(0.05)
                        assert health["state"] == "unreachable", health
                        assert health["state_age_s"] is not None and "timed out" in health["error"], health
                        assert waited, "no poll saw a query waiting for the frozen server"
                        # requests are still routed by the last good table
                        async with http.post(url + "/v1/chat/completions", data=CHAT,
                                             headers={"Content-Type": "application/json"}) as resp:
                            assert resp.status == 200, await resp.text()
                    finally:
                        cluster.thaw()
                    async with asyncio.timeout(15):
                        while (await database_health(http, url))["state"] != "connected":
                            await asyncio.sleep(0.05)
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
            stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            assert "Traceback" not in stderr, stderr[-3000:]
    finally:
        await upstream.stop()
