"""A standalone OpenAI-compatible mock upstream for benchmarks, with failure injection.

    python bench/mock_upstream.py PORT [--name N] [--fail-rate 0.3] [--fail-status 500] [--delay-ms 0]

`POST /_control {"fail_rate": 0.0, "fail_status": 503, "delay_ms": 5}` changes behaviour at run time;
`GET /_stats` returns counts. The answer is a fixed JSON body (or an SSE stream when asked).
"""

from __future__ import annotations

import argparse
import asyncio
import random

import orjson
from aiohttp import web


def make_app(name: str, fail_rate: float, fail_status: int, delay_ms: float) -> web.Application:
    state = {"fail_rate": fail_rate, "fail_status": fail_status, "delay_ms": delay_ms}
    stats = {"requests": 0, "failed": 0}
    rng = random.Random(1)
    answer = orjson.dumps({
        "id": f"chatcmpl-{name}", "object": "chat.completion", "created": 1700000000, "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hello from {name}"},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
    chunks = [b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1700000000,
                                         "model": name, "choices": [{"index": 0, "delta": {"content": w},
                                                                     "finish_reason": None}]}) + b"\n\n"
              for w in ("hello ", "from ", name)] + [b"data: [DONE]\n\n"]

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        stats["requests"] += 1
        if state["delay_ms"]:
            await asyncio.sleep(state["delay_ms"] / 1000)
        if state["fail_rate"] and rng.random() < state["fail_rate"]:
            stats["failed"] += 1
            return web.Response(status=state["fail_status"], content_type="application/json",
                                body=b'{"error":{"message":"injected failure","type":"server_error"}}')
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for chunk in chunks:
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        return web.Response(body=answer, content_type="application/json")

    async def control(request: web.Request) -> web.Response:
        state.update(orjson.loads(await request.read()))
        return web.json_response(state)

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/_control", control)
    app.router.add_get("/_stats", get_stats)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--name", default="mock")
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(args.name, args.fail_rate, args.fail_status, args.delay_ms), host="127.0.0.1",
                port=args.port, access_log=None, print=None)
