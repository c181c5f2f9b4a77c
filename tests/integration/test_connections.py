"""Inbound connections against a real `tiergate serve` over raw sockets: silent, trickling and idle
connections are closed on time; at a low descriptor limit, hundreds of idle connections do not
starve legitimate requests; a flood of malformed requests costs a bounded number of log lines."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import openai
import orjson

from .test_cli import ENV, free_port, wait_healthy


@asynccontextmanager
async def tiergate(tmp_path: Any, *, nofile: int | None = None,
                   **settings: str) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """`tiergate serve --demo` with TIERGATE_* settings (and a descriptor limit); yields its port."""
    port = free_port()
    env = {**ENV, "PYTHONPATH": os.getcwd(), **{f"TIERGATE_{k.upper()}": v for k, v in settings.items()}}
    preexec: Callable[[], None] | None = None
    if nofile is not None:
        def preexec() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port), env=env, cwd=str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, preexec_fn=preexec)
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield port, proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_silent_trickling_and_idle_connections_are_closed_on_time(tmp_path):
    async with tiergate(tmp_path, header_timeout="0.5", keepalive_timeout="1.5") as (port, _):
        loop = asyncio.get_running_loop()
        # sends nothing at all
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
        # trickles a header every 0.1 s: bytes keep coming, the headers never complete
        trickle_r, trickle_w = await asyncio.open_connection("127.0.0.1", port)
        trickle_w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

        async def trickle() -> None:
            try:
                while True:
                    await asyncio.sleep(0.1)
                    trickle_w.write(b"X-Slow: 1\r\n")
                    await trickle_w.drain()
            except ConnectionError:
                pass

        trickler = asyncio.create_task(trickle())
        # one request, then idle on keep-alive
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        idle_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(idle_r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        await idle_r.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        idle_since = loop.time()
        try:
            # 30 s: a backstop that fails a connection never closed, not a bound on when
            results = await asyncio.gather(closed_within(silent_r, 30), closed_within(trickle_r, 30),
                                           closed_within(idle_r, 30))
            assert results == [True, True, True]
            # the idle connection had its keep-alive time (1.5 s, less what reading the answer took)
            assert loop.time() - idle_since >= 0.9
        finally:
            trickler.cancel()
            for writer in (silent_w, trickle_w, idle_w):
                writer.close()


async def test_idle_connections_at_a_low_descriptor_limit_do_not_starve_requests(tmp_path):
    """A descriptor limit of 256, and 600 connections that never finish a request (most send
    nothing, some trickle headers), then 300 more while requests are made: every request of a
    legitimate client is answered."""
    async with tiergate(tmp_path, nofile=256, header_timeout="60") as (port, proc):
        stop = asyncio.Event()
        dropped = 0

        async def hog(trickle: bool) -> None:
            nonlocal dropped
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            except (OSError, TimeoutError):
                return
            try:
                if trickle:
                    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
                read = asyncio.ensure_future(reader.read(1))
                halt = asyncio.ensure_future(stop.wait())
                while not read.done() and not halt.done():
                    await asyncio.wait([read, halt], timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                    if trickle and not read.done():
                        writer.write(b"X-Slow: 1\r\n")
                if read.done():
                    dropped += 1
                read.cancel()
                halt.cancel()
            except ConnectionError:
                dropped += 1
            finally:
                writer.close()

        hogs = [asyncio.create_task(hog(trickle=i % 4 == 0)) for i in range(600)]
        try:
            async with asyncio.timeout(20):
                while dropped < 300:  # the cap is reached: the oldest idle connections are being dropped
                    await asyncio.sleep(0.05)
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                          max_retries=0, timeout=10) as client:
                for i in range(20):
                    if i == 10:  # more idle connections arriving while requests are made
                        hogs += [asyncio.create_task(hog(trickle=False)) for _ in range(300)]
                    answer = await client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {i}"}])
                    assert answer.choices[0].message.content == f"Mock answer from gpt-4o-mini: hi {i}"
            assert proc.returncode is None
        finally:
            stop.set()
            await asyncio.gather(*hogs, return_exceptions=True)
    stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert "Traceback" not in stderr and "out of system resource" not in stderr, stderr[-3000:]


MALFORMED = [
    b"GARBAGE \x00\x01 /x HTTP/1.1\r\nHost: x\r\n\r\n",  # bad method
    b"GET /health HTTP/9.9x\r\nHost: x\r\n\r\n",  # bad version
    b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n",  # bad header
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",  # bad length
]


async def test_a_flood_of_malformed_requests_logs_a_bounded_number_of_lines(tmp_path):
    async with tiergate(tmp_path) as (port, proc):
        for i in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(MALFORMED[i % len(MALFORMED)])
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.read()
            writer.close()
            assert head.split(b" ")[1] == b"400", head
            error = orjson.loads(body)["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "malformed_request", body
    stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and "Error handling request" not in stderr, stderr[-3000:]
    malformed = [line for line in lines if "malformed HTTP request" in line]
    assert 1 <= len(malformed) <= 2, malformed
    assert len(lines) <= 6, lines


# -- the direct routes: the hot endpoints past aiohttp's URL dispatcher, nothing else changed -------


async def test_direct_routes_take_only_an_exact_post_and_leave_the_rest_to_the_app():
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from proxy.edge.connections import direct_routes

    seen: list[str] = []

    async def chat(request: web.BaseRequest) -> web.Response:
        seen.append("direct")
        return web.Response()

    async def app(request: web.BaseRequest) -> web.Response:
        seen.append("app")
        return web.Response()

    handle = direct_routes({"/v1/chat/completions": chat}, app)
    cases = [  # method, request target, headers, who answers
        ("POST", "/v1/chat/completions", {}, "direct"),
        ("GET", "/v1/chat/completions", {}, "app"),
        ("POST", "/v1/chat/completions?x=1", {}, "app"),
        ("POST", "/v1/chat%2Fcompletions", {}, "app"),
        ("POST", "/v1/chat/completions/", {}, "app"),
        ("POST", "/v1/chat/completions", {"Expect": "100-continue"}, "app"),
        ("POST", "/v1/embeddings", {}, "app"),
    ]
    for method, target, headers, expected in cases:
        seen.clear()
        await handle(make_mocked_request(method, target, headers=headers))
        assert seen == [expected], (method, target, headers)


async def test_served_endpoints_answer_the_same_by_either_way(tiergate, http):
    body = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]}
    answers = []
    for target in ("/v1/chat/completions", "/v1/chat/completions?via=app"):
        async with http.post(tiergate.url + target, json=body) as resp:
            answers.append((resp.status, (await resp.json())["choices"][0]["message"]["content"]))
    assert answers[0] == answers[1] and answers[0][0] == 200
    async with http.get(tiergate.url + "/v1/embeddings") as resp:  # the app's 405, in OpenAI's shape
        assert resp.status == 405 and "error" in await resp.json()
    async with http.post(tiergate.url + "/v1/chat/completions", json=body,
                         headers={"Expect": "100-continue"}) as resp:  # the app's expect handler
        assert resp.status == 200
