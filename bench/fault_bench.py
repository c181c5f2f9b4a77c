"""Fault run: 2,000 requests at concurrency 32 through tiergate while the primary misbehaves.

Phases: (1) the primary fails 30% of calls at random; (2) it is healthy again, until its breaker
has closed; (3) it goes down entirely (its process is killed: connection refused); (4) it comes
back. The fallback stays healthy throughout.
Reports per phase: requests, 200s, other statuses, p50/p99 latency, answering providers, and the
primary's breaker state; and how many attempts reached the dead primary before its breaker opened.

One command: `python bench/fault_bench.py` (writes bench/out/fault.md).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

HERE = Path(__file__).resolve().parent
PRIMARY, BACKUP, TIERGATE = 18011, 18012, 18013
THRESHOLD, RECOVERY_S = 5, 2.0
PHASES = (("flaky 30%", 700), ("primary healthy again", 100), ("primary down", 700), ("primary back", 500))
CONCURRENCY = 32

TABLE = f"""
providers:
  primary: {{base_url: "http://127.0.0.1:{PRIMARY}/v1", api_key: sk-primary,
             failure_threshold: {THRESHOLD}, recovery_timeout: {RECOVERY_S}}}
  backup: {{base_url: "http://127.0.0.1:{BACKUP}/v1", api_key: sk-backup}}
routes:
  - {{use_case: general_purpose, tier: standard, model: primary/model-p, fallbacks: [backup/model-b]}}
"""
BODY = orjson.dumps({"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]})


def start_mock(port: int, name: str, fail_rate: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), str(port), "--name", name,
                             "--fail-rate", str(fail_rate), "--fail-status", "500"])


async def wait_up(http: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


async def details(http: aiohttp.ClientSession) -> dict:
    async with http.get(f"http://127.0.0.1:{TIERGATE}/health/details") as resp:
        return await resp.json()


async def run_phase(http: aiohttp.ClientSession, count: int, pace_s: float = 0.0) -> dict:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    providers: Counter[str] = Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            started = time.perf_counter()
            try:
                async with http.post(f"http://127.0.0.1:{TIERGATE}/v1/chat/completions", data=BODY,
                                     headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                    providers[resp.headers.get("x-tiergate-provider", "-")] += 1
            except aiohttp.ClientError as exc:
                statuses[type(exc).__name__] += 1  # type: ignore[index]
            latencies.append((time.perf_counter() - started) * 1000)
            if pace_s:
                await asyncio.sleep(pace_s)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    latencies.sort()
    return {"requests": count, "ok": statuses.get(200, 0),
            "other": {str(k): v for k, v in statuses.items() if k != 200},
            "p50": statistics.median(latencies), "p99": latencies[int(len(latencies) * 0.99) - 1],
            "providers": dict(providers)}


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tiergate-fault-"))
    (tmp / "routes.yaml").write_text(TABLE)
    primary = start_mock(PRIMARY, "primary", 0.3)
    backup = start_mock(BACKUP, "backup")
    env = {**os.environ, "TIERGATE_HEALTH_CHECK_INTERVAL": "0", "TIERGATE_MAX_RETRIES": "3"}
    tiergate = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(tmp / "routes.yaml"),
                                 "--port", str(TIERGATE)], env=env, cwd=str(tmp),
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "tiergate.log", "w"))
    rows = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:
            for port in (PRIMARY, BACKUP):
                await wait_up(http, f"http://127.0.0.1:{port}/_stats")
            await wait_up(http, f"http://127.0.0.1:{TIERGATE}/health")

            result = await run_phase(http, PHASES[0][1])
            result["breaker"] = (await details(http))["circuit_breakers"]["primary"]["state"]
            rows.append((PHASES[0][0], result))

            async with http.post(f"http://127.0.0.1:{PRIMARY}/_control", data=b'{"fail_rate": 0}') as resp:
                assert resp.status == 200
            result = await run_phase(http, PHASES[1][1], pace_s=CONCURRENCY * (RECOVERY_S * 1.5) / PHASES[1][1])
            result["breaker"] = (await details(http))["circuit_breakers"]["primary"]["state"]
            rows.append((PHASES[1][0], result))

            before = (await details(http))["providers"]["primary"]["requests"]
            primary.kill()
            primary.wait()
            result = await run_phase(http, PHASES[2][1])
            d = await details(http)
            result["breaker"] = d["circuit_breakers"]["primary"]["state"]
            result["attempts_to_dead_primary"] = d["providers"]["primary"]["requests"] - before
            rows.append((PHASES[2][0], result))

            primary = start_mock(PRIMARY, "primary", 0.0)
            await wait_up(http, f"http://127.0.0.1:{PRIMARY}/_stats")
            came_back = time.monotonic()
            # paced so the phase outlasts the recovery timeout and shows the breaker closing
            result = await run_phase(http, PHASES[3][1], pace_s=CONCURRENCY * (RECOVERY_S * 2) / PHASES[3][1])
            d = await details(http)
            result["breaker"] = d["circuit_breakers"]["primary"]["state"]
            result["seconds_after_return"] = round(time.monotonic() - came_back, 2)
            rows.append((PHASES[3][0], result))
    finally:
        for p in (primary, backup, tiergate):
            p.terminate()
        for p in (primary, backup, tiergate):
            p.wait(10)

    total = sum(r["requests"] for _, r in rows)
    ok = sum(r["ok"] for _, r in rows)
    lines = [f"Fault run: {total} requests at concurrency {CONCURRENCY}; breaker threshold {THRESHOLD}, "
             f"recovery {RECOVERY_S}s; fallback healthy throughout.", "",
             "| phase | requests | 200 | other | p50 ms | p99 ms | answered by | primary breaker after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['requests']} | {r['ok']} | {r['other'] or '-'} | {r['p50']:.2f} | "
                     f"{r['p99']:.2f} | {r['providers']} | {r['breaker']} |")
    lines += ["", f"answered 200: {ok}/{total} ({100 * ok / total:.1f}%); attempts that reached the dead "
              f"primary before its breaker opened: {rows[2][1]['attempts_to_dead_primary']} "
              f"(threshold {THRESHOLD}, concurrency {CONCURRENCY})"]
    text = "\n".join(lines)
    print(text)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "fault.md").write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
