"""A fleet in miniature: N `tiergate serve` processes sharing one limit through one Redis server and
through a local three-master Redis Cluster (each master with a replica).

    python bench/fleet_bench.py [--processes 16] [--limit 300] [--budget 3000] [--checks 2000]

For each target it reports: the overshoot past a requests-per-minute limit when the fleet is sent
three times the limit at once (target: 0) and past a tokens-per-minute budget (target: within one
request's estimate); Redis commands (INFO commandstats, every node) and round trips (the processes'
batches) per request; and the p50/p99 of one limit check that waits for Redis's atomic answer,
measured in this process. Nothing touches the shared Redis on 6379: the servers are the bench's own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._server import free_port  # noqa: E402
from proxy.fleet.cluster_link import open_link  # noqa: E402
from proxy.fleet.state import FleetLimits  # noqa: E402
from proxy.limits.spec import Check  # noqa: E402
from tests.redis_topology import LocalCluster, _Servers  # noqa: E402

CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def _wait_http(url: str, proc: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError("tiergate exited at start-up")
            try:
                async with http.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not start")


async def _fleet(n: int, redis_url: str, upstream: str, limits: list[dict], namespace: str, workdir: Path):
    table = workdir / f"{namespace}.yaml"
    table.write_text(yaml.safe_dump({
        "providers": {"mock": {"base_url": upstream, "api_key": "sk-bench"}},
        "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "mock/m"}],
        "limits": limits}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    env.update({"PYTHONPATH": str(ROOT), "TIERGATE_REDIS_URL": redis_url, "TIERGATE_CACHE_NAMESPACE": namespace,
                "TIERGATE_ENABLE_CACHING": "false", "TIERGATE_HEALTH_CHECK_INTERVAL": "0",
                "TIERGATE_REQUEST_LOG": "off", "TIERGATE_REDIS_TIMEOUT": "1", "ENABLE_MONITORING": "false"})
    procs, urls = [], []
    for _ in range(n):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(table),
                                       "--port", str(port)], env=env, cwd=str(workdir),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls.append(f"http://127.0.0.1:{port}")
    await asyncio.gather(*(_wait_http(u, p) for u, p in zip(urls, procs, strict=True)))
    return procs, urls


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


_NOT_OURS = ("cmdstat_info", "cmdstat_cluster", "cmdstat_ping", "cmdstat_command", "cmdstat_replconf",
             "cmdstat_psync", "cmdstat_client", "cmdstat_hello", "cmdstat_config")


async def _script_usec(ports: list[int]) -> float:
    """Redis's own CPU time per EVALSHA (microseconds, INFO commandstats), the busiest master's."""
    worst = 0.0
    for port in ports:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            stats = await client.info("commandstats")
            worst = max(worst, float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0)))
        except (OSError, aioredis.RedisError):
            pass
        finally:
            await client.aclose()
    return worst


async def _commands(ports: list[int]) -> tuple[int, int]:
    """(commands the clients sent, every command run including those inside scripts), on the masters."""
    sent = ran = 0
    for port in ports:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            if (await client.info("replication")).get("role") != "master":
                continue
            stats = await client.info("commandstats")
            for name, value in stats.items():
                if name.startswith("cmdstat_") and name not in _NOT_OURS:
                    ran += value["calls"]
                    if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_zrem", "cmdstat_set", "cmdstat_get",
                                "cmdstat_publish"):
                        sent += value["calls"]  # scripts' own commands are counted under their names too
        except (OSError, aioredis.RedisError):
            pass
        finally:
            await client.aclose()
    return sent, ran


async def _batches(http: aiohttp.ClientSession, urls: list[str]) -> tuple[int, int, str | None]:
    """(round trips, Redis errors, the last error) summed over the fleet's processes."""
    total = errors = 0
    last = None
    for url in urls:
        async with http.get(url + "/health/details") as resp:
            redis_state = (await resp.json())["limits"]["redis"]
        total += redis_state["batches"]
        errors += redis_state["errors"]
        last = redis_state["last_error"] or last
    return total, errors, last


async def _burst(http: aiohttp.ClientSession, urls: list[str], count: int) -> tuple[int, int]:
    """`count` requests round the fleet, 64 at a time: (admitted, tokens the admitted used)."""
    gate = asyncio.Semaphore(64)
    body = orjson.dumps(CHAT)

    async def one(i: int) -> tuple[int, int]:
        async with gate, http.post(urls[i % len(urls)] + "/v1/chat/completions", data=body) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return 0, 0
            return 1, orjson.loads(raw)["usage"]["total_tokens"]

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return sum(r[0] for r in results), sum(r[1] for r in results)


async def _check_latency(redis_url: str, checks: int) -> tuple[float, float]:
    link = open_link(redis_url, timeout=1.0)
    limits = FleetLimits(link, "bench-latency", sync_within=1.0)
    check = (Check(None, "requests_per_minute", "w", 1e12, "lat:requests_per_minute"),)  # type: ignore[arg-type]
    times = []
    try:
        for _ in range(checks):
            started = time.perf_counter()
            await limits.admit(check, [1.0], [1e12])
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await link.close()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


async def run_target(name: str, redis_url: str, ports: list[int], upstream: str, args, workdir: Path) -> dict:
    out: dict = {"target": name, "processes": args.processes}
    limits = [{"name": "rpm", "requests_per_minute": args.limit}]
    procs, urls = await _fleet(args.processes, redis_url, upstream, limits, f"rpm-{name}", workdir)
    try:
        async with aiohttp.ClientSession() as http:
            before_cmds, before_batches = await _commands(ports), await _batches(http, urls)
            started = time.monotonic()
            admitted, _ = await _burst(http, urls, 3 * args.limit)
            out["burst_s"] = round(time.monotonic() - started, 2)
            requests = 3 * args.limit
            out["requests_limit"] = args.limit
            out["requests_admitted"] = admitted
            out["requests_overshoot"] = max(0, admitted - args.limit)
            sent, ran = await _commands(ports)
            out["redis_commands_sent_per_request"] = round((sent - before_cmds[0]) / requests, 2)
            out["redis_commands_run_per_request"] = round((ran - before_cmds[1]) / requests, 2)
            batches, errors, last_error = await _batches(http, urls)
            out["round_trips_per_request"] = round((batches - before_batches[0]) / requests, 2)
            out["redis_errors"], out["last_redis_error"] = errors, last_error
            out["evalsha_server_usec"] = await _script_usec(ports)
    finally:
        _stop(procs)
    budget = [{"name": "tpm", "tokens_per_minute": args.budget}]
    procs, urls = await _fleet(args.processes, redis_url, upstream, budget, f"tpm-{name}", workdir)
    try:
        async with aiohttp.ClientSession() as http:
            _, tokens = await _burst(http, urls, max(64, 3 * args.budget // 15))
            out["budget_redis_errors"], out["budget_last_error"] = (await _batches(http, urls))[1:]
            out["token_budget"] = args.budget
            out["tokens_used"] = tokens
            out["tokens_overshoot"] = max(0, tokens - args.budget)
    finally:
        _stop(procs)
    out["check_p50_ms"], out["check_p99_ms"] = (round(x, 3) for x in await _check_latency(redis_url, args.checks))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--budget", type=int, default=3000)
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--targets", default="redis,cluster", help="redis, cluster or both (comma list)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tiergate-fleet-bench-"))
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "mock_upstream.py"), str(upstream_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    single = _Servers(workdir / "single")
    cluster = LocalCluster(workdir / "cluster")
    try:
        port = free_port()
        await single.start_server(port)
        await asyncio.sleep(0.3)
        await cluster.start()
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        targets = {"redis": (f"redis://127.0.0.1:{port}/0", [port]), "cluster": (cluster.url, cluster.ports)}
        for name in args.targets.split(","):
            url, ports = targets[name]
            print(orjson.dumps(await run_target(name, url, ports, upstream_url, args, workdir)).decode(), flush=True)
    finally:
        await single.stop()
        await cluster.stop()
        upstream.terminate()
        upstream.wait()


if __name__ == "__main__":
    asyncio.run(main())
