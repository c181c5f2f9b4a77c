"""Cache benchmark: latency of a cache hit vs a miss through tiergate, and RSS under a full cache.

    python bench/cache_bench.py [--requests 2000] [--limit-mb 64] [--body-kb 32]

tiergate runs as its own process (`python -m proxy serve`, uvloop) in front of a mock upstream on
loopback (tests/upstream.py, in this process); the client sends one request at a time on a kept-alive
connection. Modes:
  floor   - a request tiergate answers itself (unknown model -> 400): parse, validate, resolve, respond
  direct  - the mock upstream without tiergate
  bypass  - through tiergate, not cacheable (temperature 0.7): tiergate's forwarding
  miss    - through tiergate, cacheable but new each time (a different seed): lookup + forward + store
  hit     - through tiergate, the same cacheable request again and again
Then it fills the cache with 10x its byte limit of distinct answers and reads the process's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.upstream import MockUpstream, Ok  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say something"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def timed(session: aiohttp.ClientSession, url: str, body: bytes, expect: int) -> float:
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        if resp.status != expect:
            raise SystemExit(f"unexpected status {resp.status} from {url}")
    return (time.perf_counter() - started) * 1000


async def measure(session, url, bodies, expect=200) -> dict[str, float]:
    for body in bodies[:50]:  # warm up
        await timed(session, url, body, expect)
    samples = sorted([await timed(session, url, body, expect) for body in bodies[50:]])
    return {"p50": statistics.median(samples), "p90": samples[int(len(samples) * 0.9)],
            "p99": samples[int(len(samples) * 0.99)], "mean": statistics.fmean(samples)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per latency mode")
    parser.add_argument("--limit-mb", type=int, default=64, help="CACHE_MEMORY_LIMIT_MB for tiergate")
    parser.add_argument("--body-kb", type=int, default=32, help="size of each answer in the fill phase")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent requests in the fill phase")
    args = parser.parse_args()

    upstream = await MockUpstream("mock").start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "routes.yaml"
        config.write_text(f"""
providers:
  mock: {{base_url: "{upstream.url}", api_key: sk-bench}}
routes:
  - {{use_case: general_purpose, tier: standard, model: mock/model-a}}
""")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CACHE_MEMORY_LIMIT_MB": str(args.limit_mb),
               "CACHE_MAX_SIZE": "10000000", "CACHE_TTL": "3600", "ENABLE_MONITORING": "false",
               "TIERGATE_LOG_LEVEL": "WARNING"}
        env.pop("TIERGATE_REDIS_URL", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
            env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
                for _ in range(500):
                    try:
                        async with session.get(base + "/ready") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.02)
                else:
                    raise SystemExit("tiergate did not start")
                rss_start, _ = rss_mib(proc.pid)
                await run_latency(session, base, upstream, args.requests)
                await run_fill(session, base, upstream, proc.pid, args, rss_start)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
            await upstream.stop()


async def run_latency(session, base, upstream, n) -> None:
    chat = base + "/v1/chat/completions"

    def body(**extra):
        return orjson.dumps({"model": "general_purpose", "messages": MESSAGES, **extra})

    total = n + 50
    results = {
        "floor (400, no upstream)": await measure(session, chat, [body(model="no-such-model")] * total, expect=400),
        "direct to upstream": await measure(session, upstream.url + "/chat/completions",
                                            [body(model="model-a")] * total),
        "bypass (not cacheable)": await measure(session, chat, [body(temperature=0.7)] * total),
        "miss (lookup+forward+store)": await measure(session, chat,
                                                     [body(temperature=0, seed=i) for i in range(total)]),
        "hit": await measure(session, chat, [body(temperature=0, seed=-1)] * total),
    }
    print(f"latency, {n} sequential requests per mode (ms):")
    print(f"  {'mode':30} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}")
    for mode, r in results.items():
        print(f"  {mode:30} {r['p50']:7.3f} {r['p90']:7.3f} {r['p99']:7.3f} {r['mean']:7.3f}")
    floor, hit, miss = (results["floor (400, no upstream)"], results["hit"],
                        results["miss (lookup+forward+store)"])
    print(f"  hit - floor (p50): {hit['p50'] - floor['p50']:+.3f} ms   "
          f"miss - hit (p50): {miss['p50'] - hit['p50']:+.3f} ms")


async def run_fill(session, base, upstream, pid, args, rss_start) -> None:
    content = " ".join(["word"] * (args.body_kb * 1024 // 5))
    upstream.default = Ok(content=content)
    answer_bytes = len(content) + 300
    count = 10 * args.limit_mb * 1024 * 1024 // answer_bytes
    chat = base + "/v1/chat/completions"
    queue = iter(range(count))
    peak = 0.0

    async def worker() -> None:
        nonlocal peak
        for i in queue:
            await timed(session, chat, orjson.dumps({"model": "general_purpose", "messages": MESSAGES,
                                                     "temperature": 0, "seed": 10**6 + i}), 200)
            if i % 500 == 0:
                peak = max(peak, rss_mib(pid)[0])

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(args.concurrency)])
    elapsed = time.perf_counter() - started
    upstream.requests.clear()
    async with session.get(base + "/health/details") as resp:
        stats = orjson.loads(await resp.read())["cache"]
    rss, hwm = rss_mib(pid)
    print(f"fill: {count} distinct answers of ~{answer_bytes // 1024} KiB "
          f"(~{count * answer_bytes / 2**20:.0f} MiB, 10x the {args.limit_mb} MiB limit) in {elapsed:.1f}s")
    print(f"  cache: entries {stats['entries']}, bytes {stats['bytes'] / 2**20:.1f} MiB, "
          f"evictions {stats['evictions']}")
    print(f"  tiergate RSS: at start {rss_start:.1f} MiB, after fill {rss:.1f} MiB, peak sampled "
          f"{max(peak, rss):.1f} MiB, VmHWM {hwm:.1f} MiB")
    growth = hwm - rss_start
    print(f"  target: the cache's share of RSS (peak - start = {growth:.1f} MiB) <= limit + 30 MiB = "
          f"{args.limit_mb + 30} MiB -> {'met' if growth <= args.limit_mb + 30 else 'NOT met'}; "
          f"absolute peak {hwm:.1f} MiB {'<=' if hwm <= args.limit_mb + 30 else '>'} {args.limit_mb + 30} MiB "
          f"(the process starts at {rss_start:.1f} MiB before any caching)")


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
