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


async def pid_answering(http: aiohttp.ClientSession, url: str, known: set[int]) -> int:
    """Poll /health/details over fresh connections until a worker not in `known` answers."""
    async with asyncio.timeout(30):
        while True:
            try:
                async with http.get(url + "/health/details") as resp:
                    pid = (await resp.json())["pid"]
                    if pid not in known:
                        return pid
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.02)


async def test_a_worker_that_dies_is_restarted_even_twice_in_quick_succession(tmp_path):
    """SIGKILL a worker, then its replacement well within 5 s of its start: both are replaced and
    the pod keeps serving (a quick second death used to be taken for a start-up failure)."""
    port = free_port()
    env = {**ENV, "PYTHONPATH": os.getcwd(), "TIERGATE_WORKER_RESTART_BACKOFF": "0.05",
           "TIERGATE_WORKER_RESTART_BACKOFF_MAX": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--demo", "--workers", "2", "--port", str(port),
        env=env, cwd=str(tmp_path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            seen = {await pid_answering(http, url, set())}
            seen.add(await pid_answering(http, url, seen))
            victim = seen.pop()
            for _ in range(2):  # two deaths, the second of a worker that started moments ago
                os.kill(victim, signal.SIGKILL)
                replacement = await pid_answering(http, url, seen | {victim})
                assert parent_of(replacement) == proc.pid
                assert proc.returncode is None
                seen.add(victim)
                victim = replacement
            async with http.get(url + "/health") as resp:
                assert resp.status == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert code == 0, stderr
    assert stderr.count("restarting it in") == 2, stderr
    assert "Traceback" not in stderr and "failed at start-up" not in stderr


def test_workers_that_cannot_listen_at_their_first_start_stop_the_pod(tmp_path):
    import socket
    import subprocess

    with socket.socket() as taken:  # no SO_REUSEPORT: the workers' bind fails
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--demo", "--workers", "2", "--port",
                               str(port)], capture_output=True, text=True, cwd=str(tmp_path), timeout=60,
                              env={**ENV, "PYTHONPATH": os.getcwd(), "TIERGATE_WORKER_RESTART_BACKOFF": "0.05"})
    assert done.returncode == 2, done.stderr
    assert f"tiergate: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "failed at start-up" in done.stderr and "Traceback" not in done.stderr
