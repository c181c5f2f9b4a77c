"""Graceful shutdown of a real `tiergate serve` process: SIGTERM in the middle of streams."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import orjson
import yaml

from ..conftest import table_doc
from ..upstream import MockUpstream, Ok
from .test_cli import ENV, free_port, wait_healthy


async def serve(tmp_path, upstream: MockUpstream, *, drain_timeout: float) -> tuple[asyncio.subprocess.Process, str]:
    """`tiergate serve` in front of `upstream`, as its own process."""
    config = tmp_path / "routes.yaml"
    config.write_text(yaml.safe_dump(table_doc(upstream)))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
        env={**ENV, "TIERGATE_DRAIN_TIMEOUT": str(drain_timeout), "TIERGATE_HEALTH_CHECK_INTERVAL": "0"},
        cwd=str(tmp_path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


async def test_sigterm_lets_in_flight_streams_finish(tmp_path):
    upstream = await MockUpstream("primary").start()
    gate = asyncio.Event()
    streams = 3
    upstream.push(*[Ok(gate=gate) for _ in range(streams)])
    proc, url = await serve(tmp_path, upstream, drain_timeout=20)
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as http:
            body = orjson.dumps({"model": "general_purpose", "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]})
            responses = [await http.post(url + "/v1/chat/completions", data=body) for _ in range(streams)]
            for resp in responses:
                assert resp.status == 200
                await resp.content.readuntil(b"\n\n")   # each stream has started
            proc.send_signal(signal.SIGTERM)
            # new connections are refused while the streams drain
            async with asyncio.timeout(10):
                while True:
                    try:
                        async with aiohttp.ClientSession() as fresh:
                            async with fresh.get(url + "/ready") as ready:
                                assert ready.status in (200, 503)
                        await asyncio.sleep(0.02)
                    except aiohttp.ClientConnectionError:
                        break
            assert proc.returncode is None          # still draining
            gate.set()                              # the upstream finishes the streams
            for resp in responses:
                rest = await asyncio.wait_for(resp.content.read(), 10)
                assert rest.endswith(b"data: [DONE]\n\n")
                resp.close()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert upstream.completed == streams and upstream.cancelled == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await upstream.stop()


async def test_a_drain_takes_what_it_says_and_ends_open_streams_with_an_error_event(tmp_path):
    upstream = await MockUpstream("primary").start()
    gate = asyncio.Event()  # never set: the streams outlive the drain
    upstream.push(Ok(gate=gate), Ok(gate=gate))
    proc, url = await serve(tmp_path, upstream, drain_timeout=1)
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as http:
            body = orjson.dumps({"model": "general_purpose", "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]})
            responses = [await http.post(url + "/v1/chat/completions", data=body) for _ in range(2)]
            for resp in responses:
                await resp.content.readuntil(b"\n\n")
            loop = asyncio.get_running_loop()
            started = loop.time()
            proc.send_signal(signal.SIGTERM)
            for resp in responses:
                rest = await asyncio.wait_for(resp.content.read(), 10)
                assert b"[DONE]" not in rest
                last = rest.strip().split(b"\n\n")[-1]
                assert orjson.loads(last[len(b"data: "):])["error"]["code"] == "server_shutting_down"
                resp.close()
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            assert loop.time() - started < 2.5  # the drain's 1 s, and closing: not twice the setting
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await upstream.stop()


async def test_a_drain_ends_within_moments_of_its_timeout_while_clients_keep_their_connections(tmp_path):
    """20 s streams, a 2 s drain: the process exits soon after 2 s, not a second later. The clients
    keep their connections alive after the error event (a handler's task outlives its request)."""
    upstream = await MockUpstream("primary").start()
    upstream.default = Ok(content=" ".join(["word"] * 200), gap=0.1)  # 20 s per stream
    proc, url = await serve(tmp_path, upstream, drain_timeout=2)
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as http:
            body = orjson.dumps({"model": "general_purpose", "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]})
            responses = [await http.post(url + "/v1/chat/completions", data=body) for _ in range(3)]
            for resp in responses:
                await resp.content.readuntil(b"\n\n")
            loop = asyncio.get_running_loop()
            started = loop.time()
            proc.send_signal(signal.SIGTERM)
            for resp in responses:
                rest = await asyncio.wait_for(resp.content.read(), 10)  # read to its end: the connection is kept
                assert rest.rstrip().endswith(b'"code":"server_shutting_down"}}')
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            took = loop.time() - started
        assert 2.0 <= took < 3.0, took  # the drain's 2 s and the closing, not a second more
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await upstream.stop()
