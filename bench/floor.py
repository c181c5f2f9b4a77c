"""The floor: the smallest useful aiohttp forwarder (one pooled session, read, set model, post, return).

No aiohttp proxy can be faster than this on the same machine; tiergate is measured against it.
Usage: python bench/floor.py PORT UPSTREAM_URL
"""

import sys

import aiohttp
import orjson
import uvloop
from aiohttp import web


async def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=120))

    async def forward(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        body["model"] = "bench-model"
        async with session.post(upstream, data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")

    async def close(app: web.Application) -> None:
        await session.close()

    app.router.add_post("/v1/chat/completions", forward)
    app.on_cleanup.append(close)
    return app


if __name__ == "__main__":
    uvloop.install()
    web.run_app(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
