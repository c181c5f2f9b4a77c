"""The streaming floor: a bare aiohttp relay, the least any aiohttp proxy of a stream can do.

Usage: python bench/stream_floor.py PORT UPSTREAM_URL
"""

import sys

import aiohttp
import uvloop
from aiohttp import web


async def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def relay(request: web.Request) -> web.StreamResponse:
        async with session.post(upstream, data=await request.read(),
                                headers={"Content-Type": "application/json"}) as resp:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for data in resp.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response

    async def close(app: web.Application) -> None:
        await session.close()

    app.router.add_post("/v1/chat/completions", relay)
    app.on_cleanup.append(close)
    return app


if __name__ == "__main__":
    uvloop.install()
    web.run_app(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                backlog=4096)
