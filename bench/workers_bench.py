"""Requests/s of `tiergate serve --demo --workers N` for N = 1 and 2 (non-streamed chat completions).

    python bench/workers_bench.py [--duration 10] [--connections 64] [--workers 1 2]

Uses wrk (Debian: apt-get install -y wrk) when it is installed, else a built-in aiohttp load
generator. The demo table answers in-process (mock provider), so this measures tiergate itself:
HTTP parsing, routing, dispatch and the response. The load generator runs on the same machine and
competes for its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import start, stop  # noqa: E402

BODY = orjson.dumps({"model": "chat_conversation:economy", "max_tokens": 16,
                     "messages": [{"role": "user", "content": "Say hello to the benchmark"}]})
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{BODY.decode()}]]
"""


def run_wrk(url: str, duration: int, connections: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", f.name,
                          url + "/v1/chat/completions"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": _ms(p50), "p99_ms": _ms(p99), "errors": float(errors.group(1)) if errors else 0.0}


def _ms(match: re.Match[str] | None) -> float:
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def run_aiohttp(url: str, duration: int, connections: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", data=BODY,
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[int(len(latencies) * 0.99)], "errors": float(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--generator", choices=["auto", "wrk", "aiohttp"], default="auto")
    args = parser.parse_args()
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "aiohttp"
    print(f"load generator: {generator}, {args.connections} connections, {args.duration}s per run")
    print(f"{'workers':>7} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for workers in args.workers:
        proc, url = start(workers)
        try:
            if generator == "wrk":
                result = run_wrk(url, 2, args.connections)  # warm-up
                result = run_wrk(url, args.duration, args.connections)
            else:
                asyncio.run(run_aiohttp(url, 2, args.connections))
                result = asyncio.run(run_aiohttp(url, args.duration, args.connections))
        finally:
            stop(proc)
        print(f"{workers:>7} {result['rps']:>10.0f} {result['p50_ms']:>8.2f} {result['p99_ms']:>8.2f} "
              f"{int(result['errors']):>7}")


if __name__ == "__main__":
    main()
