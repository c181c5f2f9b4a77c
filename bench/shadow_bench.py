"""Shadow traffic: the client's latency on a route that mirrors every call to a slow shadow, against a
route without a shadow, in the same run.

    python bench/shadow_bench.py [--requests 1000] [--shadow-delay-ms 200] [--stream]

Two `bench/mock_upstream.py` processes (the primary answering at once, the shadow after the delay) and
`tiergate serve` (one worker, request log off, health checks off). One client at a time sends the same
chat request alternately to `general_purpose:standard` (shadow `share: 1`, `max_concurrency: 64`) and to
`debugging:standard` (no shadow), after a warm-up; it prints each route's p50 and p99, and the shadow
calls by outcome from `/metrics`. A timing, so compare the two routes of one run, not runs.
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
import yaml
from callgrind import free_port, wait_for_port

HERE = Path(__file__).resolve().parent


def table(primary: int, shadow: int) -> dict:
    return {
        "providers": {"primary": {"base_url": f"http://127.0.0.1:{primary}/v1", "api_key": "sk-bench"},
                      "shadow": {"base_url": f"http://127.0.0.1:{shadow}/v1", "api_key": "sk-bench"}},
        "routes": [
            {"use_case": "general_purpose", "tier": "standard", "model": "primary/model",
             "shadow": {"model": "shadow/candidate", "share": 1.0, "max_concurrency": 64}},
            {"use_case": "debugging", "tier": "standard", "model": "primary/model"},
        ],
    }


async def measure(url: str, n: int, stream: bool) -> dict[str, list[float]]:
    body = {"messages": [{"role": "user", "content": "Hello there"}], "stream": stream}
    out: dict[str, list[float]] = {"general_purpose:standard": [], "debugging:standard": []}
    async with aiohttp.ClientSession() as session:
        for i in range(n + 100):
            order = list(out) if i % 2 == 0 else list(reversed(out))
            for route in order:
                started = time.perf_counter()
                async with session.post(url + "/v1/chat/completions", json={**body, "model": route}) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                if i >= 100:  # after the warm-up
                    out[route].append((time.perf_counter() - started) * 1000)
        async with session.get(url + "/metrics") as resp:
            metrics = await resp.text()
    shadows = [line for line in metrics.splitlines() if line.startswith("tiergate_shadow_requests_total")]
    print("\n".join(shadows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000, help="requests per route, after 100 of warm-up")
    parser.add_argument("--shadow-delay-ms", type=float, default=200.0)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    ports = [free_port() for _ in range(3)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), str(ports[0]), "--name", "primary"]),
             subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), str(ports[1]), "--name", "shadow",
                               "--delay-ms", str(args.shadow_delay_ms)])]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "routes.yaml"
        path.write_text(yaml.safe_dump(table(ports[0], ports[1])))
        env = {**os.environ, "TIERGATE_REQUEST_LOG": "off", "HEALTH_CHECK_INTERVAL": "0"}
        procs.append(subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path),
                                       "--port", str(ports[2])], env=env))
        try:
            for port, proc in zip(ports, procs, strict=True):
                wait_for_port(port, proc)
            latencies = asyncio.run(measure(f"http://127.0.0.1:{ports[2]}", args.requests, args.stream))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
    for route, values in latencies.items():
        values.sort()
        p99 = values[int(len(values) * 0.99) - 1]
        print(f"{route:<26} p50 {statistics.median(values):.3f} ms  p99 {p99:.3f} ms  ({len(values)} requests)")


if __name__ == "__main__":
    main()
