"""`tiergate serve --workers 2` as a user runs it: two processes on one port, SIGTERM stops all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import openai

from .test_cli import ENV, free_port, wait_healthy


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def is_running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_two_workers_share_the_port_and_stop_on_sigterm(tmp_path):
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--demo", "--workers", "2", "--port", str(port),
        env={**ENV, "PYTHONPATH": os.getcwd()}, cwd=str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    try:
        await wait_healthy(url, proc)
        # a fresh connection each time: the kernel spreads connections over the listening workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            async with asyncio.timeout(20):
                while len(pids) < 2:
                    async with http.get(url + "/health/details") as resp:
                        assert resp.status == 200
                        pids.add((await resp.json())["pid"])
        assert all(parent_of(pid) == proc.pid for pid in pids)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            for _ in range(4):
                answer = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
                assert answer.choices[0].message.content == "Mock answer from gpt-4o-mini: hi"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert code == 0, stderr
    assert stderr.count("draining") == 2, stderr
    assert "Traceback" not in stderr
    assert not [pid for pid in pids if is_running(pid)], "a worker is still running"
