"""Clients that leave mid-stream leave nothing large behind. A departure cancels the request's task,
and its traceback keeps the stream's frames in a reference cycle until a full collection (rare under
`tiergate serve`'s collector settings): what those frames hold (the answer relayed so far, on a route
that may continue it) is released when the stream ends, so rounds of departures do not add up."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import aiohttp

from ..conftest import table_doc, until
from ..telemetry_support import config_with, running
from ..upstream import Ok

READ_BEFORE_LEAVING = 300_000  # bytes of the stream each client reads, then it leaves
CLIENTS = 20


async def leave_mid_stream(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async def one() -> None:
            resp = await http.post(url + "/v1/chat/completions", json={
                "model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            got = 0
            while got < READ_BEFORE_LEAVING:
                got += len(await resp.content.readany())
            resp.close()
        await asyncio.gather(*[one() for _ in range(CLIENTS)])


async def test_rounds_of_clients_leaving_mid_stream_leave_no_answer_behind(upstream, backup):
    upstream.default = Ok(content=" ".join(["word" * 20] * 3000), gap=0.001)  # ~700 kB per stream
    async with running(table_doc(upstream, backup, stream_recovery="continue"), config_with()) as (url, router):
        await leave_mid_stream(url)  # pools and caches warm
        await until(lambda: upstream.cancelled >= CLIENTS)
        tasks = len(asyncio.all_tasks())
        tracemalloc.start()
        try:
            for _ in range(3):
                gc.collect()
                gc.disable()  # what the departures leave to the collector stays until we look
                await leave_mid_stream(url)
                await until(lambda: upstream.cancelled >= CLIENTS)  # the upstream streams ended too
                upstream.cancelled = 0
                upstream.requests.clear()
                held = tracemalloc.get_traced_memory()[0]
                gc.enable()
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
                # the client's and the mock's own share is ~40 kB a stream; each answer relayed so far
                # (300 kB) stayed in the cycle before
                assert (held - after) / CLIENTS < 120_000
                await until(lambda: len(asyncio.all_tasks()) <= tasks)  # and no task is left running
        finally:
            gc.enable()
            tracemalloc.stop()
        assert router.get_metrics()["stream_recoveries"] == {}

