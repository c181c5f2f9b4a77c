"""Who may read GET /metrics when TIERGATE_API_KEYS is set: a real `tiergate serve`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp

from .test_cli import ENV, free_port, wait_healthy

KEY = "tg-metrics-test-key"


async def serve(tmp_path, **settings: str) -> tuple[str, asyncio.subprocess.Process]:
    port = free_port()
    env = {**ENV, "PYTHONPATH": os.getcwd(), "TIERGATE_API_KEYS": KEY, **settings}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port), env=env, cwd=str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url, proc)
    return url, proc


async def stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0


async def status_of(http: aiohttp.ClientSession, url: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_metrics_need_the_key_by_default_and_the_metrics_port_serves_them_without(tmp_path):
    metrics_port = free_port()
    url, proc = await serve(tmp_path, TIERGATE_METRICS_PORT=str(metrics_port))
    try:
        async with aiohttp.ClientSession() as http:
            status, body = await status_of(http, url + "/metrics")
            assert status == 401 and '"invalid_api_key"' in body, body
            status, body = await status_of(http, url + "/metrics", "wrong")
            assert status == 401
            status, body = await status_of(http, url + "/metrics", KEY)
            assert status == 200 and "tiergate_requests_total" in body
            for probe in ("/health", "/ready", "/openapi.json"):  # still open for probes
                assert (await status_of(http, url + probe))[0] == 200, probe
            # the metrics port: /metrics without a key, and nothing else
            side = f"http://127.0.0.1:{metrics_port}"
            status, body = await status_of(http, side + "/metrics")
            assert status == 200 and "tiergate_requests_total" in body
            assert (await status_of(http, side + "/v1/models"))[0] == 404
            assert (await status_of(http, side + "/health/details"))[0] == 404
    finally:
        await stop(proc)


async def test_metrics_auth_open_serves_them_without_a_key(tmp_path):
    url, proc = await serve(tmp_path, TIERGATE_METRICS_AUTH="open")
    try:
        async with aiohttp.ClientSession() as http:
            status, body = await status_of(http, url + "/metrics")
            assert status == 200 and "tiergate_requests_total" in body
            assert (await status_of(http, url + "/v1/models"))[0] == 401  # the API itself still needs the key
    finally:
        await stop(proc)


def test_a_bad_metrics_setting_or_a_taken_metrics_port_is_one_line(tmp_path):
    import socket
    import subprocess

    env = {**ENV, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--demo", "--port", "0"], capture_output=True,
                          text=True, env={**env, "TIERGATE_METRICS_AUTH": "nobody"}, cwd=str(tmp_path), timeout=30)
    assert done.returncode == 2 and "metrics_auth = 'nobody'" in done.stderr and "Traceback" not in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(free_port())],
                              capture_output=True, text=True, env={**env, "TIERGATE_METRICS_PORT": str(port)},
                              cwd=str(tmp_path), timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"tiergate: cannot listen on 127.0.0.1:{port} (metrics_port)" in done.stderr
    assert "Traceback" not in done.stderr
