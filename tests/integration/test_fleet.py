"""A fleet acting as one: three `tiergate serve` processes on one Redis enforce one limit; Redis
killed and restarted mid-traffic (a private redis-server) breaks nothing and counting resumes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import openai
import orjson
import yaml

from ..conftest import REDIS_URL, PrivateRedis, table_doc, until
from ..upstream import MockUpstream
from .test_cli import ENV, free_port, wait_healthy
from .test_limits import counter

CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def fleet(tmp_path, doc, key_prefix: str, size: int = 3, **env: str) -> AsyncIterator[list[str]]:
    """`size` tiergate processes sharing the test's Redis namespace; yields their base URLs."""
    config = tmp_path / "routes.yaml"
    config.write_text(yaml.safe_dump(doc))
    settings = {**{k: v for k, v in ENV.items() if k != "DATABASE_URL"}, "PYTHONPATH": os.getcwd(),
                "TIERGATE_REDIS_URL": REDIS_URL, "TIERGATE_CACHE_NAMESPACE": key_prefix,
                "TIERGATE_REDIS_TIMEOUT": "1", "TIERGATE_ENABLE_CACHING": "false",
                "TIERGATE_HEALTH_CHECK_INTERVAL": "0", "TIERGATE_REQUEST_LOG": "off", **env}
    procs, urls = [], []
    try:
        for _ in range(size):
            port = free_port()
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
                env=settings, cwd=str(tmp_path), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            await wait_healthy(url, proc)
        yield urls
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_three_processes_admit_exactly_the_limit(tmp_path, redis_client, namespace):  # noqa: F811
    upstream = await MockUpstream("primary").start()
    doc = table_doc(upstream)
    doc["limits"] = [{"name": "fleet-rpm", "requests_per_minute": 60}]
    try:
        async with fleet(tmp_path, doc, namespace) as urls, aiohttp.ClientSession() as http:
            body = orjson.dumps(CHAT)
            limit = asyncio.Semaphore(24)

            async def one(i: int) -> tuple[int, str | None, str | None]:
                async with limit, http.post(urls[i % 3] + "/v1/chat/completions", data=body) as resp:
                    data = orjson.loads(await resp.read())
                    return resp.status, resp.headers.get("Retry-After"), (data.get("error") or {}).get("code")

            started = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(200)))
            assert time.monotonic() - started < 50  # the sliding minute holds all of them
            assert Counter(status for status, _, _ in results) == {200: 60, 429: 140}
            assert all(code == "rate_limit_exceeded" and 1 <= int(retry) <= 60
                       for status, retry, code in results if status == 429)
            assert upstream.calls == 60
            assert await counter(redis_client, namespace, "fleet-rpm:requests_per_minute") == 60
            # each process tells the same story
            for url in urls:
                async with http.get(url + "/health/details") as resp:
                    limits = (await resp.json())["limits"]
                assert limits["state"] == "shared" and limits["redis"]["available"] is True
                assert limits["limits"][0]["used"] == 60
            # and so does the CLI, from Redis
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "limits", "list", "--json", "--config", str(tmp_path / "routes.yaml"),
                env={**{k: v for k, v in ENV.items() if k != "DATABASE_URL"}, "PYTHONPATH": os.getcwd(),
                     "TIERGATE_REDIS_URL": REDIS_URL, "TIERGATE_CACHE_NAMESPACE": namespace},
                cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(cli.communicate(), 30)
            assert cli.returncode == 0, err
            (row,) = [orjson.loads(line) for line in out.splitlines()]
            assert (row["name"], row["kind"], row["limit"], row["used"], row["remaining"]) == \
                ("fleet-rpm", "requests_per_minute", 60, 60, 0)
    finally:
        await upstream.stop()


async def test_a_token_budget_stops_a_stream_workload_within_one_request(tmp_path, redis_client,  # noqa: F811
                                                                         namespace):  # noqa: F811
    upstream = await MockUpstream("primary").start()
    budget = 600
    doc = table_doc(upstream)
    doc["limits"] = [{"name": "tokens", "tokens_per_minute": budget}]
    try:
        async with fleet(tmp_path, doc, namespace) as urls:
            clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) for url in urls]
            used, refused = [], 0
            one_request = 0
            for i in range(80):  # one after another, round the three processes
                try:
                    stream = await clients[i % 3].chat.completions.create(
                        model="general_purpose", messages=CHAT["messages"], stream=True, max_tokens=10,
                        stream_options={"include_usage": True})
                    chunks = [chunk async for chunk in stream]
                    used.append(chunks[-1].usage.total_tokens)
                    one_request = max(one_request, chunks[-1].usage.total_tokens)
                except openai.RateLimitError as exc:
                    refused += 1
                    assert "tokens" in str(exc) and "600 tokens per minute" in str(exc)
            for client in clients:
                await client.close()
            total = sum(used)
            assert refused > 0 and used
            assert budget - 2 * one_request < total <= budget  # stopped within one request of the budget
            # every stream's estimate was settled with the usage it reported

            async def settled() -> bool:
                return await counter(redis_client, namespace, "tokens:tokens_per_minute") == total

            deadline = time.monotonic() + 5
            while not await settled():
                assert time.monotonic() < deadline, "the charges were not settled"
                await asyncio.sleep(0.02)
    finally:
        await upstream.stop()


# -- Redis killed and restarted ---------------------------------------------------------------------


async def test_redis_killed_and_restarted_mid_traffic(tmp_path, upstream, start_tiergate):
    server = PrivateRedis(tmp_path)
    await server.start()
    import redis.asyncio as aioredis
    admin = aioredis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    doc = table_doc(upstream)
    doc["limits"] = [{"name": "probe", "key": "probe", "requests_per_minute": 10},
                     {"name": "everyone", "requests_per_minute": 100000}]
    keys = ("probe=sk-probe-SECRET", "bg=sk-background-SECRET")
    settings = {"redis_url": server.url, "redis_timeout": 0.2, "enable_caching": False, "api_keys": keys}
    ns_open, ns_closed = f"t-{uuid.uuid4().hex}", f"t-{uuid.uuid4().hex}"
    open_tg = await start_tiergate(doc, cache_namespace=ns_open, **settings)
    closed_tg = await start_tiergate(doc, cache_namespace=ns_closed, limits_on_redis_failure="fail_closed",
                                     **settings)
    probe = {"Authorization": "Bearer sk-probe-SECRET"}
    background = {"Authorization": "Bearer sk-background-SECRET"}
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()

    # no call hangs: each is bounded by the Redis timeout; 30 s is only the backstop that fails a hang
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def call(tg, headers) -> tuple[int, dict, dict]:
            async with http.post(tg.v1 + "/chat/completions", data=orjson.dumps(CHAT), headers=headers) as resp:
                return resp.status, dict(resp.headers), orjson.loads(await resp.read())

        async def traffic() -> None:  # both sidecars busy the whole time
            while not stop.is_set():
                for tg in (open_tg, closed_tg):
                    statuses[(await call(tg, background))[0]] += 1
                await asyncio.sleep(0)

        async def used(ns: str, name: str) -> float:
            return await counter(admin, ns, f"{name}:requests_per_minute")

        task = asyncio.create_task(traffic())
        try:
            for tg in (open_tg, closed_tg):
                for _ in range(3):
                    assert (await call(tg, probe))[0] == 200
            # far from its cap a charge is admitted ahead and written to Redis without being waited for
            async def counted() -> bool:
                return await used(ns_open, "probe") == 3 and await used(ns_closed, "probe") == 3

            await until(counted)
            await admin.aclose()

            await server.kill()
            # fail_open: counted here against the pod's share (the fleet is this one pod: all of it)
            results = [await call(open_tg, probe) for _ in range(12)]
            assert [s for s, _, _ in results] == [200] * 10 + [429] * 2
            assert "this pod's share" in results[-1][2]["error"]["message"]
            # fail_closed: refused, with the reason, never a 500
            status, headers, body = await call(closed_tg, probe)
            assert status == 503 and body["error"]["code"] == "limits_unavailable" and headers["Retry-After"] == "1"
            health = await open_tg.router.get_health_status()
            details = health["limits"]
            assert details["state"] == "unreachable (fail_open)" and details["redis"]["available"] is False
            assert health["status"] == "degraded"
            assert details["decided_by_policy"] >= 12
            async with http.get(open_tg.url + "/metrics", headers=probe) as resp:  # behind the key
                assert 'tiergate_limits_backend{policy="fail_open",state="unreachable"} 1.0' in await resp.text()
            assert (await closed_tg.router.get_health_status())["limits"]["state"] == "unreachable (fail_closed)"

            await server.start()  # empty: the scripts and counters are gone
            admin = aioredis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
            async def admitted() -> bool:  # counting resumes after the retry interval
                return (await call(closed_tg, probe))[0] == 200

            await until(admitted, timeout=60)
            await until(lambda: used(ns_open, "everyone"), timeout=60)
            assert await used(ns_closed, "probe") >= 1
            assert (await open_tg.router.get_health_status())["limits"]["state"] == "shared"
        finally:
            stop.set()
            await task
            await admin.aclose()
            await server.kill()
    assert set(statuses) <= {200, 503} and statuses[200] > 0, statuses  # background: no 500, no 429
