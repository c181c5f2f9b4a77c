"""RSS of `tiergate serve` over rounds of clients that leave mid-stream.

    python bench/departures.py [--clients 500] [--rounds 3] [--read 60000] [--recovery off]

A real `tiergate serve` (one worker, defaults: stream recovery on, the route has a fallback) in front of
the mock provider of tests/upstream.py (a real aiohttp server on loopback) streaming a ~800 kB answer,
a token-sized word a chunk, over about 4 s.
Each round, `--clients` clients start a stream at once, read `--read` bytes of it and disconnect; the
round ends when the provider has seen every one of its streams cancelled. Printed: the process's RSS
before the first round and after each. What a departed stream leaves behind would add up round after
round; the target is RSS after the last round within 5 MB of RSS after the first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._server import free_port  # noqa: E402
from tests.upstream import MockUpstream, Ok  # noqa: E402

ANSWER = " ".join(f"w{i:04d}" for i in range(4000))  # a token-sized word a chunk, as providers stream: ~800 kB


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Departures:
    """tiergate and its two providers; `round()` sends the clients that leave."""

    def __init__(self, clients: int, read: int, recovery: str = "continue"):
        self.clients, self.read, self.recovery = clients, read, recovery
        self.primary, self.backup = MockUpstream("primary"), MockUpstream("backup")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    async def start(self, workdir: Path) -> None:
        await self.primary.start()
        await self.backup.start()
        self.primary.default = Ok(content=ANSWER, gap=0.001)  # 4 s a stream: the clients leave well before
        self.backup.default = Ok(content=ANSWER, gap=0.001)
        table = workdir / "routes.yaml"
        table.write_text(
            "providers:\n"
            f'  primary: {{base_url: "{self.primary.url}", api_key: sk-primary}}\n'
            f'  backup: {{base_url: "{self.backup.url}", api_key: sk-backup}}\n'
            "routes:\n"
            "  - {use_case: general_purpose, tier: standard, model: primary/model-p, fallbacks: [backup/model-b], "
            # the mock shares this process with the clients: its first bytes may be slow under 500 at once
            f"first_byte_timeout: 120, stream_recovery: {self.recovery}}}\n")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
        env.update({"PYTHONPATH": str(ROOT), "TIERGATE_HEALTH_CHECK_INTERVAL": "0", "TIERGATE_REQUEST_LOG": "off",
                    "TIERGATE_MAX_CONNECTIONS": str(max(4 * self.clients, 1024))})
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(table),
                                      "--port", str(port)], env=env, cwd=str(ROOT),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(self.url + "/health"):
                        return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        raise RuntimeError("tiergate did not start")

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
        await self.primary.stop()
        await self.backup.stop()

    @property
    def rss_kib(self) -> int:
        assert self.proc is not None
        return rss_kib(self.proc.pid)

    async def round(self) -> None:
        """`clients` streams at once, each read for `read` bytes and left; returns when the provider has
        seen each of them cancelled (tiergate let go of its upstream stream)."""
        body = orjson.dumps({"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        cancelled = self.primary.cancelled
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
            async def one() -> None:
                resp = await http.post(self.url + "/v1/chat/completions", data=body)
                got = 0
                while got < self.read:
                    data = await resp.content.readany()
                    if not data:
                        raise RuntimeError("the stream ended before the client left")
                    got += len(data)
                resp.close()  # leaves mid-stream

            await asyncio.gather(*[one() for _ in range(self.clients)])
        for _ in range(30_000):  # the provider hears each departure (a 5 min backstop)
            if self.primary.cancelled - cancelled >= self.clients:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("the provider's streams were not all cancelled")


async def measure(clients: int, rounds: int, read: int, recovery: str = "continue") -> list[int]:
    """RSS in KiB: before the first round, then after each."""
    bench = Departures(clients, read, recovery)
    with tempfile.TemporaryDirectory() as tmp:
        await bench.start(Path(tmp))
        try:
            sizes = [bench.rss_kib]
            for _ in range(rounds):
                await bench.round()
                sizes.append(bench.rss_kib)
            return sizes
        finally:
            await bench.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--read", type=int, default=60_000, help="bytes each client reads before leaving")
    parser.add_argument("--recovery", default="continue", help="the route's stream_recovery (continue, off)")
    args = parser.parse_args()
    sizes = await measure(args.clients, args.rounds, args.read, args.recovery)
    print(f"{args.clients} clients a round, each leaving after {args.read} bytes of a ~800 kB stream "
          f"(stream_recovery: {args.recovery})")
    print("| | RSS MiB |\n| --- | ---: |")
    print(f"| before | {sizes[0] / 1024:.1f} |")
    for i, size in enumerate(sizes[1:], 1):
        print(f"| after round {i} | {size / 1024:.1f} |")
    print(f"last round - first round: {(sizes[-1] - sizes[1]) / 1024:+.1f} MiB (target: within 5)")


if __name__ == "__main__":
    asyncio.run(main())
