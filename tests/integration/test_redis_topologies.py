"""The fleet on a real local Redis Cluster (three masters, each with a replica) and a real Sentinel
set: limits exact across three `tiergate serve` processes, the cache, Responses affinity and object
owners shared, a master killed mid-traffic (its replica promoted) with no request lost, a Sentinel
failover followed. And `check` and `serve` agreeing on what the URL may be."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter

import aiohttp
import orjson
import pytest

from proxy.fleet.affinity import Holder, ResponseAffinity
from proxy.fleet.cluster_link import ClusterLink, open_link
from proxy.fleet.owners import ObjectOwners
from proxy.fleet.state import FleetHealth, FleetLimits, RedisLink
from proxy.limits.spec import Check, FleetUnavailable
from proxy.settings import RouterConfig
from proxy.types import ModelRef

from ..conftest import table_doc, until
from ..redis_topology import LocalCluster, LocalSentinel
from ..upstream import MockUpstream
from .test_cli import ENV
from .test_fleet import CHAT, fleet


def _check(key: str) -> Check:
    return Check(None, "requests_per_minute", "w", 100.0, key)  # type: ignore[arg-type] - the counter alone


@pytest.fixture
async def cluster(tmp_path):
    local = LocalCluster(tmp_path / "cluster")
    try:
        yield await local.start()
    finally:
        await local.stop()


@pytest.fixture
async def sentinel(tmp_path):
    local = LocalSentinel(tmp_path / "sentinel")
    try:
        yield await local.start()
    finally:
        await local.stop()


async def test_check_and_serve_agree_on_an_unknown_option(tmp_path):
    env = {**{k: v for k, v in ENV.items() if k != "DATABASE_URL"}, "PYTHONPATH": os.getcwd(),
           "TIERGATE_REDIS_URL": "redis://:s3cret@127.0.0.1:6379/0?cluster=true"}
    lines = []
    for command in (["check"], ["serve", "--port", "0"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *command, env=env, cwd=str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode != 0
        text = (out + err).decode().strip()
        assert "s3cret" not in text and "Traceback" not in text
        lines.append(text.splitlines()[-1])
    assert lines[0] == lines[1]
    assert "unknown option 'cluster'" in lines[0] and "redis+cluster://" in lines[0]


async def test_cluster_limits_exact_across_three_processes_and_cache_shared(tmp_path, cluster):
    upstream = await MockUpstream("primary").start()
    doc = table_doc(upstream)
    doc["limits"] = [{"name": "fleet-rpm", "requests_per_minute": 40}]
    try:
        async with fleet(tmp_path, doc, "topo", TIERGATE_REDIS_URL=cluster.url,
                         TIERGATE_ENABLE_CACHING="true") as urls, aiohttp.ClientSession() as http:
            limit = asyncio.Semaphore(16)

            async def one(i: int) -> int:
                body = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": f"hi {i}"}]})
                async with limit, http.post(urls[i % 3] + "/v1/chat/completions", data=body) as resp:
                    await resp.read()
                    return resp.status

            results = await asyncio.gather(*(one(i) for i in range(120)))
            assert Counter(results) == {200: 40, 429: 80}
            assert upstream.calls == 40
            for url in urls:
                async with http.get(url + "/health/details") as resp:
                    limits = (await resp.json())["limits"]
                assert limits["redis"]["available"] is True and limits["limits"][0]["used"] == 40
                assert limits["redis"]["where"].startswith("cluster 127.0.0.1:")
    finally:
        await upstream.stop()


async def test_cache_affinity_and_owners_shared_on_the_cluster(tmp_path, cluster):
    from proxy.engine.cache import CachedResponse, RedisLevel, redis_cache_from_url

    config = RouterConfig(redis_url=cluster.url, redis_timeout=1.0, cache_namespace="shared")
    one, two = ResponseAffinity(config), ResponseAffinity(config)
    owners_one, owners_two = ObjectOwners(config), ObjectOwners(config)
    caches = [RedisLevel(redis_cache_from_url(cluster.url, timeout=1.0, namespace="c")) for _ in range(2)]
    try:
        ids = [f"resp_{i}" for i in range(20)]  # spread over the three masters
        for rid in ids:
            await one.remember(rid, Holder("primary", "model-a", True, "team"))
        for rid in ids:
            assert (await two.lookup(rid)).provider == "primary"
        files = [f"file-{i}" for i in range(20)]
        for fid in files:
            await owners_one.remember(fid, "team-a")
        assert await owners_two.owners(files) == dict.fromkeys(files, "team-a")  # one MGET per node
        assert caches[0].cache.client.__class__.__name__ == "RedisCluster"  # aiocache's client replaced
        entry = CachedResponse(b'{"ok": true}', ModelRef("primary", "m"))
        await caches[0].set("k1", entry, 60)
        assert (await caches[1].get("k1")).body == b'{"ok": true}'
        assert caches[1].errors == 0
    finally:
        for closer in (one.close, two.close, owners_one.close, owners_two.close):
            await closer()
        for cache in caches:
            await cache.close()


async def test_a_master_killed_mid_traffic_loses_no_request(tmp_path, cluster):
    """fail_open: while the slot's master is gone every request is still answered (counted per
    process); once its replica is promoted the fleet counts in Redis again."""
    link = open_link(cluster.url, timeout=0.5)
    assert isinstance(link, ClusterLink)
    limits = FleetLimits(link, "failover")
    upstream = await MockUpstream("primary").start()
    doc = table_doc(upstream)
    doc["limits"] = [{"name": "big", "requests_per_minute": 100000}]
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()
    try:
        async with fleet(tmp_path, doc, "failover", size=2, TIERGATE_REDIS_URL=cluster.url,
                         TIERGATE_REDIS_TIMEOUT="0.3") as urls, aiohttp.ClientSession() as http:

            async def traffic(url: str) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    async with http.post(url + "/v1/chat/completions", data=orjson.dumps(CHAT)) as resp:
                        await resp.read()
                        statuses[resp.status] += 1

            async def counted() -> float:
                return (await limits.usage([_check("big:requests_per_minute")]))["big:requests_per_minute"]

            workers = [asyncio.create_task(traffic(url)) for url in urls for _ in range(3)]
            await until(lambda: sum(statuses.values()) > 30, timeout=20)
            await cluster.kill(await cluster.master_of("failover:{limits}:x"))
            seen = sum(statuses.values())
            await until(lambda: sum(statuses.values()) > seen + 30, timeout=20)  # answered meanwhile
            await until(cluster.healthy, timeout=30)  # the replica has taken the slots over
            before = None

            async def counting_again() -> bool:
                nonlocal before
                try:
                    now = await counted()
                except FleetUnavailable:
                    return False
                if before is not None and now > before:
                    return True
                before = now
                return False

            await until(counting_again, timeout=20)
            stop.set()
            await asyncio.gather(*workers)
            assert set(statuses) == {200}, statuses  # not one request lost
            errors = 0
            for url in urls:  # the outage was seen (and survived by the fail_open policy)
                async def redis_state(url: str = url) -> dict:
                    async with http.get(url + "/health/details") as resp:
                        return (await resp.json())["limits"]["redis"]

                async def available(url: str = url) -> bool:  # each process's link retries on its own clock
                    return (await redis_state(url))["available"] is True

                await until(available, timeout=20)
                errors += (await redis_state())["errors"]
            assert errors >= 1
    finally:
        stop.set()
        await link.close()
        await upstream.stop()


async def test_sentinel_primary_and_its_failover_followed(tmp_path, sentinel):
    link = open_link(sentinel.url, timeout=1.0)
    assert isinstance(link, RedisLink)
    limits = FleetLimits(link, "sentinel")
    config = RouterConfig(redis_url=sentinel.url, redis_timeout=1.0, cache_namespace="sentinel")
    affinity = ResponseAffinity(config)
    check = (_check("s:requests_per_minute"),)
    try:
        assert (await limits.admit(check, [1.0], [100.0])).used == (1.0,)
        await affinity.remember("resp_1", Holder("primary", "m", True, None))
        new_primary = await sentinel.failover()
        assert new_primary == sentinel.replica

        async def admitted_on_the_new_primary() -> bool:
            try:
                await limits.admit(check, [1.0], [100.0])
            except FleetUnavailable:
                return False
            return True

        await until(admitted_on_the_new_primary, timeout=20)
        assert link.where().startswith("sentinel 127.0.0.1:")
        used = await limits.usage(check)
        assert used["s:requests_per_minute"] >= 2  # the count replicated before the failover went on
        later = ResponseAffinity(config)  # a pod started after the failover finds what was stored before
        assert (await later.lookup("resp_1")).provider == "primary"
        await later.close()
    finally:
        await affinity.close()
        await link.close()


async def test_fleet_health_is_heard_across_the_cluster(cluster):
    """A breaker one pod opens reaches another through the cluster's pub/sub, and the key that holds
    it (with its index, in one slot) is read whole by a pod that subscribes later."""
    links = [open_link(cluster.url, timeout=1.0) for _ in range(3)]
    one, two = FleetHealth(links[0], "health"), FleetHealth(links[1], "health")
    try:
        two.start()
        await until(lambda: two.subscribed, timeout=10)
        one.publish("primary/model-a", "open", 30.0, "breaker")
        await until(lambda: two.state("primary/model-a") == "open", timeout=5)
        late = FleetHealth(links[2], "health")
        await late.sync()
        assert late.state("primary/model-a") == "open"
        one.publish("primary/model-a", "closed", 0)
        await until(lambda: two.state("primary/model-a") is None, timeout=5)
        assert await one.claim_trial("primary/model-b", 5.0) is True
        assert await two.claim_trial("primary/model-b", 5.0) is False  # exactly one pod makes the trial
    finally:
        await two.stop()
        for link in links:
            await link.close()


async def test_fleet_health_through_the_sentinels_primary(sentinel):
    links = [open_link(sentinel.url, timeout=1.0) for _ in range(2)]
    one, two = FleetHealth(links[0], "health"), FleetHealth(links[1], "health")
    try:
        two.start()
        await until(lambda: two.subscribed, timeout=10)
        one.publish("primary/model-a", "cooldown", 30.0, "429")
        await until(lambda: two.state("primary/model-a") == "cooldown", timeout=5)
    finally:
        await two.stop()
        for link in links:
            await link.close()
