"""Soak: a steady rate of mixed traffic against `tiergate serve --demo` for a given duration,
watching the server's RSS, open file descriptors and errors.

    python bench/soak.py --duration 600 --rate 200 [--workers 1]

Traffic, in turn: non-streamed chat, streamed chat, a repeated identical chat (cacheable),
embeddings, text completion. RSS drift is last sample vs the first sample after warm-up (the
first 10% of the run). With --workers N the figures are summed over the worker processes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import start, stop  # noqa: E402

REQUESTS = [
    ("/v1/chat/completions", lambda i: {"model": "chat_conversation:standard",
                                        "messages": [{"role": "user", "content": f"question {i}"}]}),
    ("/v1/chat/completions", lambda i: {"model": "code_generation:premium", "stream": True,
                                        "stream_options": {"include_usage": True},
                                        "messages": [{"role": "user", "content": f"stream {i}"}]}),
    ("/v1/chat/completions", lambda i: {"model": "gpt-4o-mini", "temperature": 0,
                                        "messages": [{"role": "user", "content": "the same question"}]}),
    ("/v1/embeddings", lambda i: {"model": "text-embedding-3-small", "input": [f"text {i}", "more"]}),
    ("/v1/completions", lambda i: {"model": "documentation:economy", "prompt": f"complete {i}"}),
]


def pids_of(proc_pid: int) -> list[int]:
    """The server process and its children (the workers)."""
    children = Path(f"/proc/{proc_pid}/task/{proc_pid}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [proc_pid, *kids]


def sample(pids: list[int]) -> tuple[int, int]:
    rss = fds = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss += int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return rss, fds


async def drive(url: str, duration: float, rate: float, server_pid: int) -> dict:
    errors: dict[str, int] = {}
    done = 0
    samples: list[tuple[float, int, int]] = []
    in_flight: set[asyncio.Task] = set()
    kinds = itertools.cycle(range(len(REQUESTS)))
    interval = 1.0 / rate

    async def one(session: aiohttp.ClientSession, i: int, kind: int) -> None:
        nonlocal done
        path, make = REQUESTS[kind]
        try:
            async with session.post(url + path, data=orjson.dumps(make(i)),
                                    headers={"Content-Type": "application/json"}) as resp:
                body = await resp.read()
                if resp.status != 200 or (b'"error"' in body and b"choices" not in body):
                    errors[f"{path} {resp.status}"] = errors.get(f"{path} {resp.status}", 0) + 1
                done += 1
        except (TimeoutError, aiohttp.ClientError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=200)) as session:
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_sample = started
        i = 0
        pids = pids_of(server_pid)
        while (now := loop.time()) < started + duration:
            if now >= next_sample:
                rss, fds = sample(pids)
                samples.append((round(now - started, 1), rss, fds))
                next_sample += 5.0
            task = asyncio.create_task(one(session, i, next(kinds)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            i += 1
            await asyncio.sleep(max(0.0, started + i * interval - loop.time()))
        await asyncio.gather(*in_flight)
        rss, fds = sample(pids)
        samples.append((round(loop.time() - started, 1), rss, fds))
    warm = [s for s in samples if s[0] >= duration * 0.1] or samples
    drift = (samples[-1][1] - warm[0][1]) / warm[0][1] * 100
    return {"duration_s": duration, "rate_rps": rate, "sent": i, "completed": done, "errors": errors,
            "rss_kb_first_after_warmup": warm[0][1], "rss_kb_last": samples[-1][1],
            "rss_kb_max": max(s[1] for s in samples), "rss_drift_pct": round(drift, 2),
            "fds_first": samples[0][2], "fds_after_warmup": warm[0][2], "fds_last": samples[-1][2],
            "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="write the full result (with samples) to this file")
    args = parser.parse_args()
    proc, url = start(args.workers)
    try:
        result = asyncio.run(drive(url, args.duration, args.rate, proc.pid))
    finally:
        code = stop(proc)
    result["server_exit_code"] = code
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
