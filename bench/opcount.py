"""Where the Python work of one request goes: opcodes executed per request, by file and function.

    python bench/opcount.py [floor|tiergate] [--stream] [--upstream http://127.0.0.1:18001/v1] [--lines proxy/]

Deterministic where timings on a shared 2-core machine are not. Needs an upstream answering
`POST /v1/chat/completions` (e.g. the nginx that `bench/run.py` starts, or `bench/mock_upstream.py`).
The server runs in this process under `sys.settrace` with opcode events; the load comes from a
separate process (aiohttp, 8 concurrent requests), so only the server's opcodes are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
from pathlib import Path

from aiohttp import web

HERE = Path(__file__).resolve().parent
LOAD = """
import asyncio, os, sys, aiohttp
port, n, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
headers = {"Content-Type": "application/json"}
if os.environ.get("BENCH_KEY"):  # an inbound key tiergate is serving with
    headers["Authorization"] = "Bearer " + os.environ["BENCH_KEY"]
body = (b'{"model":"general_purpose","messages":[{"role":"user","content":"Hello there"}],"temperature":0.7'
        + (b',"stream":true}' if stream else b'}'))
async def main():
    async with aiohttp.ClientSession() as s:
        left = list(range(n))
        async def worker():
            while left:
                left.pop()
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                  headers=headers) as r:
                    assert r.status == 200, r.status
                    await r.read()
        await asyncio.gather(*(worker() for _ in range(8)))
asyncio.run(main())
"""


async def main(args: argparse.Namespace) -> None:
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    lines: collections.Counter[tuple[str, int]] = collections.Counter()
    line_pattern = args.lines

    def tracer(frame, event, arg):  # noqa: ANN001, ANN202 - the sys.settrace signature
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            path = code.co_filename.split("site-packages/")[-1]
            counts[(path, code.co_name)] += 1
            if line_pattern and line_pattern in path:
                lines[(path, frame.f_lineno)] += 1
        return tracer

    upstream = args.upstream.rstrip("/")
    if args.target == "floor":
        sys.path.insert(0, str(HERE))
        import floor
        import stream_floor

        app = await (stream_floor if args.stream else floor).make_app(upstream + "/chat/completions")
    else:
        from proxy.edge.app import build_app
        from proxy.settings import RouterConfig

        table = Path(tempfile.mkdtemp()) / "routes.yaml"
        table.write_text(f'providers:\n  bench: {{base_url: "{upstream}", api_key: sk-bench}}\n'
                         "routes:\n  - {use_case: general_purpose, tier: standard, model: bench/bench-model}\n"
                         + ("limits:\n  - {name: bench, requests_per_minute: 1000000000}\n" if args.limit else ""))
        environ = {"TIERGATE_HEALTH_CHECK_INTERVAL": "0"}
        if args.redis_url:
            environ.update(TIERGATE_REDIS_URL=args.redis_url,
                           TIERGATE_CACHE_NAMESPACE=f"tiergate-opcount-{os.getpid()}")
        app = build_app(RouterConfig.load(table, environ=environ, dotenv_path=None))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def load(n: int) -> None:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", LOAD, str(port), str(n),
                                                    "1" if args.stream else "0")
        assert await proc.wait() == 0, "the load generator failed (is the upstream answering?)"

    await load(args.requests)  # warm up pools and caches
    sys.settrace(tracer)
    await load(args.requests)
    sys.settrace(None)
    await runner.cleanup()

    n = args.requests
    print(f"{args.target}: {sum(counts.values()) / n:.0f} opcodes per request")
    by_file: collections.Counter[str] = collections.Counter()
    for (path, _), count in counts.items():
        by_file[path] += count
    for path, count in by_file.most_common(15):
        print(f"  {count / n:7.0f}  {path}")
    print("  by function:")
    for (path, name), count in counts.most_common(args.top):
        print(f"  {count / n:7.0f}  {path}:{name}")
    if line_pattern:
        print(f"  by line ({line_pattern}):")
        for (path, lineno), count in sorted(lines.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
            print(f"  {count / n:7.1f}  {path}:{lineno}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("floor", "tiergate"))
    parser.add_argument("--upstream", default="http://127.0.0.1:18001/v1")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--lines", default="", help="also count by line in files whose path contains this")
    parser.add_argument("--stream", action="store_true",
                        help="streamed requests (the floor: bench/stream_floor.py); the upstream must stream")
    parser.add_argument("--redis-url", default="", help="tiergate with this Redis (shared cache, fleet state)")
    parser.add_argument("--limit", action="store_true", help="and one limit every request counts against")
    parser.add_argument("--asyncio", action="store_true", help="asyncio's own loop instead of uvloop")
    arguments = parser.parse_args()
    if not arguments.asyncio:  # as `tiergate serve` runs (and the floor): the loop's own work is in C
        import uvloop
        uvloop.install()
    asyncio.run(main(arguments))
