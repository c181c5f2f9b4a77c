"""The `tiergate` command as a user runs it: real processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import aiohttp
import openai

from proxy.settings import DEMO_CONFIG_PATH

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("TIERGATE_", "OPENROUTER", "PORTKEY"))}


def run_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=60)


def test_check_prints_the_table():
    done = run_cli("check", "--demo")
    assert done.returncode == 0, done.stderr
    assert "24 routes" in done.stdout and "code_generation:premium" in done.stdout


def test_check_and_serve_fail_on_a_bad_table_naming_file_and_key(tmp_path):
    bad = tmp_path / "routes.yaml"
    bad.write_text(DEMO_CONFIG_PATH.read_text().replace("tier: economy", "tier: cheap", 1))
    for args in (("check", "--config", str(bad)), ("serve", "--config", str(bad), "--port", "0")):
        done = run_cli(*args, cwd=str(tmp_path))
        assert done.returncode == 2
        assert f"{bad}: routes[2].tier: 'cheap' is not one of" in done.stderr
        assert "Traceback" not in done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(20):
            while True:
                assert proc.returncode is None, "tiergate exited"
                try:
                    async with http.get(url + "/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)


async def test_serve_demo_answers_the_openai_sdk(tmp_path):
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port), env=ENV, cwd=str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            answer = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
            assert answer.choices[0].message.content == "Mock answer from gpt-4o-mini: hello"
            vectors = await client.embeddings.create(model="text-embedding-3-small", input="abc")
            assert len(vectors.data[0].embedding) == 8   # base64 by default in the SDK, decoded
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    # `tiergate serve` writes one JSON line per request on stderr (a library stays quiet)
    assert proc.stderr is not None
    lines = [line for line in (await proc.stderr.read()).decode().splitlines() if line.startswith("{")]
    assert len(lines) == 2 and all('"request_id"' in line for line in lines)


async def test_serve_collects_young_objects_less_often_while_it_runs():
    """`serve` raises the first-generation GC threshold (collections of in-flight requests' objects
    cost ~8% of the CPU under load) and puts it back when it stops."""
    import gc

    from proxy.edge.app import GC_THRESHOLD, serve
    from proxy.settings import RouterConfig

    config = RouterConfig.load(DEMO_CONFIG_PATH, environ={}, dotenv_path=None,
                               overrides={"host": "127.0.0.1", "port": free_port(), "health_check_interval": 0})
    before = gc.get_threshold()
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(config, started=started, stop=stop))
    try:
        await asyncio.wait_for(started.wait(), 30)
        assert gc.get_threshold() == (GC_THRESHOLD, *before[1:])
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        gc.unfreeze()  # serve froze this test process's objects
    assert gc.get_threshold() == before


def test_check_into_a_closed_pipe_ends_quietly():
    """`tiergate check | head`: the reader has gone; no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "proxy", "check", "--demo"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=ENV, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert done.stderr == ""


MALFORMED = [("DATABASE_URL", "postgresql://tg:pw-s3cret@127.0.0.1:54x32/db", "DATABASE_URL"),
             ("DATABASE_URL", "postgresql://tg:pw-s3cret@127.0.0.1:99999/db", "DATABASE_URL"),
             ("DATABASE_URL", "postgresql://tg:pw-s3cret@[::1/db", "DATABASE_URL"),
             ("DATABASE_URL", "mysql://tg:pw-s3cret@127.0.0.1/db", "DATABASE_URL"),
             ("TIERGATE_REDIS_URL", "redis://:pw-s3cret@127.0.0.1:63x79/0", "TIERGATE_REDIS_URL")]


def test_malformed_service_urls_stop_each_command_with_one_line(tmp_path):
    table = tmp_path / "routes.yaml"
    table.write_text(DEMO_CONFIG_PATH.read_text())
    for variable, url, message in MALFORMED:
        commands = [("serve", "--config", str(table), "--port", str(free_port()))]
        if variable == "DATABASE_URL":
            commands += [("db", "init"), ("routes", "list")]
        for args in commands:
            done = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                                  env={**ENV, variable: url}, cwd=str(tmp_path), timeout=60)
            assert done.returncode == 2, (args, url, done.stderr)
            assert done.stderr.startswith(f"tiergate: {message}"), (args, url, done.stderr)
            assert "Traceback" not in done.stderr and "s3cret" not in done.stderr + done.stdout
