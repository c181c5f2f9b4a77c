"""The catalogue of provider failures, one at a time, against a route with one fallback.

A real `tiergate serve` in front of two mock providers (tests/upstream.py: real aiohttp servers on
loopback) plays each scenario: 429 with and without Retry-After, persistent 429, one 500, persistent
503, TCP reset, no response, slow first token (20 s), stream cut mid-answer, stream stalled
mid-answer, malformed chunk, stream without [DONE], context length exceeded, content filter (must not
fail over), a fallback that refuses a prefill, a primary that flaps (down, then up), and the accounting
of a fail-over. Per scenario: the outcome (`complete` answer, the `provider's error`, or a `WRONG`
answer: a truncated or doubled one delivered as a success), the time, and the upstream calls. Runs
twice: on defaults (stream recovery on; no provider declares how it continues an answer, so a
continuation is asked by instruction and its join checked, except in the scenario of a fallback that
refuses a prefill, whose provider declares `continuation: prefix`), and with `stream_recovery: off`.

    python bench/fault_catalogue.py [--only NAME] [--flap SECONDS]

The stall scenarios wait for the stream's idle bound (TIERGATE_STREAM_IDLE_TIMEOUT, 60 s by default;
this script sets 10 s so that a run takes minutes, and says so). The flapping primary is down for
`--flap` seconds (default 20) under steady traffic, then up: the figure is how long after it came back
it answered again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._server import free_port  # noqa: E402
from tests.upstream import (  # noqa: E402
    BreakStream,
    Fail,
    Hang,
    MalformedChunk,
    MockUpstream,
    Ok,
    Reset,
    StallStream,
)

ANSWER = " ".join(f"w{i}" for i in range(1, 61))  # sixty words
IDLE = 10.0  # the stream idle bound this run sets (see the docstring)
LONG_PROMPT = "word " * 800  # about 1,000 tokens
FILTERED = orjson.dumps({"error": {"message": "The response was filtered due to the prompt triggering the "
                                   "content management policy.", "type": "invalid_request_error",
                                   "param": "prompt", "code": "content_filter"}})


class Bench:
    def __init__(self, recovery: bool):
        self.recovery = recovery
        self.prefill = False  # the providers declare `continuation: prefix`
        self.primary = MockUpstream("primary", models=("model-p",))
        self.backup = MockUpstream("backup", models=("model-b",))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    async def start(self, workdir: Path) -> None:
        await self.primary.start()
        await self.backup.start()
        self.workdir = workdir

    async def serve(self) -> None:
        """A fresh tiergate for each scenario: no breaker, cooldown or statistics left from the last."""
        workdir = self.workdir
        route = "" if self.recovery else "stream_recovery: off, "
        prefill = ", continuation: prefix" if self.prefill else ""
        table = workdir / f"routes-{int(self.recovery)}.yaml"
        table.write_text(
            "providers:\n"
            f'  primary: {{base_url: "{self.primary.url}", api_key: sk-primary{prefill}}}\n'
            f'  backup: {{base_url: "{self.backup.url}", api_key: sk-backup{prefill}}}\n'
            "routes:\n"
            f"  - {{use_case: general_purpose, tier: standard, {route}model: primary/model-p, "
            "fallbacks: [backup/model-b]}\n")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
        env.update({"PYTHONPATH": str(ROOT), "TIERGATE_STREAM_IDLE_TIMEOUT": str(IDLE),
                    "TIERGATE_HEALTH_CHECK_INTERVAL": "0", "TIERGATE_REQUEST_LOG": "off"})
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(table),
                                      "--port", str(port)], env=env, cwd=str(ROOT),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}/v1"
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health"):
                        return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        raise RuntimeError("tiergate did not start")

    def end(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    async def stop(self) -> None:
        self.end()
        await self.primary.stop()
        await self.backup.stop()

    def reset(self) -> None:
        for up in (self.primary, self.backup):
            up.script.clear()
            up.default = Ok(content=ANSWER)
            up.refuses_prefill.clear()
            up.context_windows.clear()
            up.requests.clear()

    @property
    def calls(self) -> int:
        return self.primary.calls + self.backup.calls


async def call(http: aiohttp.ClientSession, bench: Bench, *, stream: bool, prompt: str = "hi",
               timeout: float = 120) -> tuple[str, dict[str, str]]:
    """One chat call: its outcome and the answer's headers."""
    body = {"model": "general_purpose", "messages": [{"role": "user", "content": prompt}], "stream": stream}
    async with http.post(bench.url + "/chat/completions", data=orjson.dumps(body),
                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        raw = await resp.read()
        headers = dict(resp.headers)
        if resp.status != 200:
            return "provider's error", headers
        if not stream:
            text = orjson.loads(raw)["choices"][0]["message"]["content"]
            return judge(text, True), headers
        text, ended = "", False
        for line in raw.split(b"\n"):
            if line == b"data: [DONE]":
                ended = True
            elif line.startswith(b"data: {"):
                try:
                    event = orjson.loads(line[6:])
                except orjson.JSONDecodeError:
                    return "WRONG (a malformed chunk relayed)", headers
                if "error" in event:
                    return "provider's error", headers
                for choice in event.get("choices") or ():
                    text += (choice.get("delta") or {}).get("content") or ""
        return judge(text, ended), headers


def judge(text: str, ended: bool) -> str:
    whole = text in (ANSWER, "primary answered model-p", "backup answered model-b")
    return "complete" if whole and ended else f"WRONG ({len(text.split())} words{'' if ended else ', no end'})"


Scenario = Callable[[aiohttp.ClientSession, Bench], Awaitable[tuple[str, str]]]


def simple(setup: Callable[[Bench], None], *, stream: bool = False, prompt: str = "hi") -> Scenario:
    async def run(http: aiohttp.ClientSession, bench: Bench) -> tuple[str, str]:
        setup(bench)
        outcome, headers = await call(http, bench, stream=stream, prompt=prompt)
        return outcome, headers.get("x-tiergate-model", "-")
    return run


def _context(bench: Bench) -> None:
    bench.primary.context_windows["model-p"] = 200


def _refusing_fallback(bench: Bench) -> None:
    bench.primary.push(BreakStream(after=40, content=ANSWER))
    bench.backup.refuses_prefill.add("model-b")


async def _flapping(http: aiohttp.ClientSession, bench: Bench, down: float) -> tuple[str, str]:
    """Down for `down` seconds under steady traffic (4 calls a second), then up: seconds until it answers."""
    bench.primary.default = Fail(503)
    started = time.monotonic()
    outcomes: set[str] = set()
    back_at = None
    while True:
        now = time.monotonic()
        if back_at is None and now - started >= down:
            bench.primary.default = Ok(content=ANSWER)
            back_at = now
        outcome, headers = await call(http, bench, stream=False)
        outcomes.add(outcome)
        if back_at is not None and headers.get("x-tiergate-provider") == "primary":
            return ("complete" if outcomes == {"complete"} else "/".join(sorted(outcomes)),
                    f"primary again {time.monotonic() - back_at:.1f} s after it came back")
        if back_at is not None and now - back_at > 120:
            return "/".join(sorted(outcomes)), "primary never used again"
        await asyncio.sleep(0.25)


async def _accounting(http: aiohttp.ClientSession, bench: Bench) -> tuple[str, str]:
    bench.primary.default = Fail(503)
    body = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(bench.url + "/chat/completions", data=orjson.dumps(body)) as resp:
        answer = orjson.loads(await resp.read())
        headers = resp.headers
    right = (answer.get("model") == "model-b" and headers.get("x-tiergate-model") == "backup/model-b"
             and answer.get("usage", {}).get("completion_tokens") == 60)
    note = f"{headers.get('x-tiergate-model')}, model {answer.get('model')}"
    return ("complete" if right else "WRONG (accounting)"), note


def scenarios(flap: float) -> list[tuple[str, Scenario]]:
    return [
        ("429 with Retry-After: 1", simple(lambda b: b.primary.push(Fail(429, retry_after=1)))),
        ("429 without Retry-After", simple(lambda b: b.primary.push(Fail(429)))),
        ("persistent 429", simple(lambda b: setattr(b.primary, "default", Fail(429, retry_after=1)))),
        ("one 500", simple(lambda b: b.primary.push(Fail(500)))),
        ("persistent 503", simple(lambda b: setattr(b.primary, "default", Fail(503)))),
        ("TCP reset", simple(lambda b: b.primary.push(Reset()))),
        ("no response", simple(lambda b: b.primary.push(Hang()))),
        ("slow first token (20 s), stream",
         simple(lambda b: b.primary.push(Ok(delay=20, content=ANSWER)), stream=True)),
        ("stream cut mid-answer", simple(lambda b: b.primary.push(BreakStream(after=40, content=ANSWER)), stream=True)),
        ("stream stalled mid-answer",
         simple(lambda b: b.primary.push(StallStream(after=40, content=ANSWER)), stream=True)),
        ("malformed chunk",
         simple(lambda b: b.primary.push(MalformedChunk(after=40, content=ANSWER)), stream=True)),
        ("stream without [DONE]", simple(lambda b: b.primary.push(Ok(content=ANSWER, done=False)), stream=True)),
        ("context length exceeded", simple(_context, prompt=LONG_PROMPT)),
        ("content filter (no fail-over)", simple(lambda b: b.primary.push(Fail(400, body=FILTERED)))),
        ("fallback refuses a prefill", simple(_refusing_fallback, stream=True)),
        (f"primary flaps (down {flap:.0f} s, then up)", lambda http, b: _flapping(http, b, flap)),
        ("accounting of a fail-over", _accounting),
    ]


Row = tuple[str, str, float, int, str]


async def run_all(recovery: bool, only: str | None, flap: float, workdir: Path) -> list[Row]:
    bench = Bench(recovery)
    await bench.start(workdir)
    rows = []
    try:
        async with aiohttp.ClientSession() as http:
            for name, scenario in scenarios(flap):
                if only and only not in name:
                    continue
                bench.reset()
                bench.prefill = "prefill" in name
                await bench.serve()
                for _ in range(10):  # steady traffic before the fault: the deployments' first bytes are known
                    await call(http, bench, stream=False)
                bench.reset()
                started = time.monotonic()
                try:
                    outcome, note = await scenario(http, bench)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    outcome, note = "no answer", type(exc).__name__
                took = time.monotonic() - started
                rows.append((name, outcome, took, bench.calls, note))
                print(f"{'defaults' if recovery else 'recovery off'} | {name} | {outcome} | {took:.2f} s | "
                      f"{bench.calls} | {note}", flush=True)
                bench.end()
                bench.primary._stopping.set()  # end what still hangs or stalls
                await asyncio.sleep(0.2)
                bench.primary._stopping.clear()
    finally:
        await bench.stop()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the scenarios whose name holds this")
    parser.add_argument("--flap", type=float, default=20.0, help="seconds the flapping primary is down")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tables = []
        for recovery in (True, False):
            tables.append((recovery, await run_all(recovery, args.only, args.flap, Path(tmp))))
    print("\n| scenario | defaults: outcome | time | calls "
          "| with `stream_recovery: off`: outcome | time | calls |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    (_, plain), (_, unrecovered) = tables
    for a, b in zip(plain, unrecovered, strict=True):
        print(f"| {a[0]} | {a[1]} | {a[2]:.2f} s | {a[3]} | {b[1]} | {b[2]:.2f} s | {b[3]} |")
    print("\nnotes:", "; ".join(f"{a[0]}: {a[4]}" for a in plain if a[4] and a[4] != "-" and "/" not in a[4][:8]))


if __name__ == "__main__":
    asyncio.run(main())
