"""What observability costs: throughput and latency of tiergate with monitoring off, on, and on with
tracing exported over OTLP/HTTP, against a mock upstream on loopback.

    python bench/monitoring_bench.py [--requests 3000] [--concurrency 32] [--rounds 3]

tiergate runs as `tiergate serve` in its own process (uvloop); the mock upstream, an OTLP/HTTP sink
and the load generator share this process. The modes are interleaved over several rounds and the
median round is reported, because the machine is shared. CPU is measured per process: the serving
process, and the span exporter process it starts (`TIERGATE_TRACE_EXPORT=process`). The tracing
modes take the steps one at a time and together: one span per request (`TIERGATE_TRACE_ATTEMPTS=auto`)
or a child span per attempt (`always`), export from a child process or from a thread of the serving
process, OTLP protobuf or JSON. A micro-benchmark of the per-request telemetry work follows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello there"}]}
ANSWER = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello back"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})


async def start_site(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def mock_upstream() -> tuple[web.AppRunner, int]:
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return await start_site(app)


async def otlp_sink() -> tuple[web.AppRunner, int, list[int]]:
    received = [0]

    async def traces(request: web.Request) -> web.Response:
        received[0] += len(await request.read())
        return web.Response(body=b"{}" if request.content_type == "application/json" else b"",
                            content_type=request.content_type)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    runner, port = await start_site(app)
    return runner, port, received


def write_table(path: Path, upstream_port: int) -> None:
    path.write_text(
        "providers:\n"
        f"  bench: {{base_url: 'http://127.0.0.1:{upstream_port}/v1', api_key: sk-bench}}\n"
        "pricing:\n  bench/bench-model: {input: 1.0, output: 2.0}\n"
        "routes:\n  - {use_case: general_purpose, tier: standard, model: bench/bench-model}\n")


async def start_tiergate(table: Path, port: int, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(table), "--port", str(port),
        env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=tempfile.gettempdir(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/ready") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError("tiergate did not become ready")


async def load(url: str, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send `requests` chat completions with `concurrency` in flight; returns (req/s, latencies ms)."""
    latencies: list[float] = []
    body = orjson.dumps(CHAT)
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            for _ in counter:
                t = time.perf_counter()
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"status {resp.status}")
                latencies.append((time.perf_counter() - t) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return requests / elapsed, latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), which sharing the machine disturbs
    far less than wall-clock throughput."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The child processes of `pid` (the span exporter process)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


async def settled(pids: list[int], deadline_s: float = 20.0) -> None:
    """Until these processes use no CPU for 0.3 s (or the deadline passes)."""
    deadline = time.monotonic() + deadline_s
    last = sum(map(cpu_seconds, pids))
    while pids and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = sum(map(cpu_seconds, pids))
        if now == last:
            return
        last = now


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def tracing_mode(sink_port: int, attempts: str, export: str, protocol: str, **extra: str) -> dict[str, str]:
    return {"ENABLE_MONITORING": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "TIERGATE_TRACE_ATTEMPTS": attempts, "TIERGATE_TRACE_EXPORT": export,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, **extra}


async def macro(args: argparse.Namespace) -> dict[str, list[tuple[float, float, float, float, float]]]:
    up_runner, up_port = await mock_upstream()
    sink_runner, sink_port, received = await otlp_sink()
    every = "traces, every request"
    modes = {
        "monitoring off": {"ENABLE_MONITORING": "false"},
        "metrics + logs": {"ENABLE_MONITORING": "true"},
        f"{every}: span per attempt, export thread, protobuf (previous build's shape)":
            tracing_mode(sink_port, "always", "thread", "http/protobuf"),
        f"{every}: one span, export thread, protobuf": tracing_mode(sink_port, "auto", "thread", "http/protobuf"),
        f"{every}: one span, export thread, JSON": tracing_mode(sink_port, "auto", "thread", "http/json"),
        f"{every}: span per attempt, export process, protobuf":
            tracing_mode(sink_port, "always", "process", "http/protobuf"),
        f"{every}: one span, export process, protobuf (default)":
            tracing_mode(sink_port, "auto", "process", "http/protobuf"),
        f"{every}: one span, export process, JSON": tracing_mode(sink_port, "auto", "process", "http/json"),
        "traces sampled at 10% (default shape)": tracing_mode(
            sink_port, "auto", "process", "http/protobuf", OTEL_TRACES_SAMPLER="parentbased_traceidratio",
            OTEL_TRACES_SAMPLER_ARG="0.1"),
    }
    if args.modes:
        modes = {m: env for m, env in modes.items() if any(word in m for word in args.modes)}
    results: dict[str, list[tuple[float, float, float, float, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "routes.yaml"
        write_table(table, up_port)
        for round_no in range(args.rounds):
            for mode, env in modes.items():
                port = args.port
                proc = await start_tiergate(table, port, env)
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                try:
                    await load(url, args.warmup, args.concurrency)
                    exporters = children(proc.pid)
                    await settled(exporters)  # started (imports done) and done with the warm-up's spans
                    cpu_before = cpu_seconds(proc.pid)
                    export_before = sum(map(cpu_seconds, exporters))
                    rps, lat = await load(url, args.requests, args.concurrency)
                    cpu_us = (cpu_seconds(proc.pid) - cpu_before) / args.requests * 1e6
                    # the exporter process catches up after the load: give it its batch delay
                    await asyncio.sleep(0.6 if exporters else 0)
                    export_us = (sum(map(cpu_seconds, exporters)) - export_before) / args.requests * 1e6
                finally:
                    proc.terminate()
                    await proc.wait()
                results[mode].append((rps, pct(lat, 50), pct(lat, 99), cpu_us, export_us))
                print(f"round {round_no + 1} {mode:<70} {rps:8.0f} req/s  p50 {pct(lat, 50):6.2f} ms  "
                      f"p99 {pct(lat, 99):6.2f} ms  tiergate CPU {cpu_us:6.0f} µs/req  exporter process "
                      f"{export_us:5.0f} µs/req  load {os.getloadavg()[0]:.1f}", flush=True)
    await up_runner.cleanup()
    await sink_runner.cleanup()
    print(f"(the OTLP sink received {received[0]} bytes of spans)")
    return results


def micro() -> list[tuple[str, float]]:
    """Per-request telemetry work in microseconds (no network)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry, Counter

    from proxy.engine.costing import charge_answer
    from proxy.engine.router import Router
    from proxy.observability.telemetry import Telemetry
    from proxy.outcome import Attempt, RequestRecord, Result
    from proxy.settings import RouterConfig
    from proxy.table.routing import table_from_dict
    from proxy.types import ModelRef

    counter = Counter("bench_total", "x", ["route", "model", "provider", "status"], registry=CollectorRegistry())
    cache: dict[tuple[str, str, str, int], object] = {}

    def with_labels() -> None:
        counter.labels("general_purpose:standard", "bench/bench-model", "bench", "200").inc()

    def with_cache() -> None:
        key = ("general_purpose:standard", "bench/bench-model", "bench", 200)
        child = cache.get(key)
        if child is None:
            child = cache[key] = counter.labels(*map(str, key))
        child.inc()  # type: ignore[attr-defined]

    n = 200_000
    out = [(".labels(...).inc()", timeit.timeit(with_labels, number=n) / n * 1e6),
           ("cached child .inc()", timeit.timeit(with_cache, number=n) / n * 1e6)]

    doc = {"providers": {"bench": {"base_url": "http://127.0.0.1:1/v1", "api_key": "k"}},
           "pricing": {"bench/bench-model": {"input": 1, "output": 2}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "bench/bench-model"}]}
    ref = ModelRef("bench", "bench-model")
    bench_table = table_from_dict(doc, source="bench")
    for label, enabled, tracer in (("Telemetry.finish, monitoring off", False, None),
                                   ("usage + cost + finish (metrics, stats, log line to stderr)", True, None),
                                   ("... + request and attempt spans (batch exporter)", True, "on")):
        config = RouterConfig.load(environ={}, dotenv_path=None, overrides={"enable_monitoring": enabled})
        provider = None
        if tracer:
            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=1 << 20))
        router = Router(config, table=bench_table, tracer_provider=provider)
        telemetry: Telemetry = router.telemetry
        telemetry.table_changed(bench_table)  # as Router.apply_table does (this router is not initialized)

        def one(telemetry: Telemetry = telemetry, table: Any = bench_table) -> None:
            record = RequestRecord("req", "chat.completions")
            record.route = "general_purpose:standard"
            trace = telemetry.start_trace("chat", record, CHAT, None)
            if trace is not None:
                trace.attempt_started(ref, None)
                trace.attempt_ended(Attempt("bench", "bench-model", "ok", 200, 1.0))
            record.status, record.ref, record.tries = 200, ref, 1
            record.attempts = [Attempt("bench", "bench-model", "ok", 200, 1.0)]
            result = Result(200, ref, record.attempts, body=ANSWER, tries=1)
            if telemetry.enabled:  # as the router does: usage and cost, then what telemetry reports
                charge_answer(record, result, table)
            telemetry.on_result(record, result)
            telemetry.finish(record)

        async def batch(one: Any = one, telemetry: Telemetry = telemetry) -> None:
            for _ in range(256):  # finished requests are counted and logged in batches, as in the server
                one()
            telemetry.drain()

        m = 80
        loop = asyncio.new_event_loop()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # the request log lines
            telemetry._log_stream = None  # through sys.stderr (devnull), not the process's own stderr
            seconds = timeit.timeit(lambda b=batch, lp=loop: lp.run_until_complete(b()), number=m)
            out.append((label, seconds / m / 256 * 1e6))
        loop.close()
        if provider is not None:
            provider.shutdown()
    return out + tracing_breakdown()


def tracing_breakdown() -> list[tuple[str, float]]:
    """Where tracing's per-request CPU time goes, step by step, in µs (CPU time of this process)."""
    import threading
    from collections import deque
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from proxy.observability.span_export import HandOffSpanProcessor, _rebuild, json_exporter_available, own_resource
    from proxy.observability.tracing import Tracing
    from proxy.outcome import Attempt, RequestRecord
    from proxy.protocol.usage import Usage
    from proxy.types import ModelRef

    ref = ModelRef("bench", "bench-model")

    def request(tracing: Tracing) -> None:
        record = RequestRecord("req-1", "chat.completions")
        record.route = "general_purpose:standard"
        trace = tracing.start("chat", record.started, CHAT, None)
        assert trace is not None
        trace.attempt_started(ref, None)
        attempt = Attempt("bench", "bench-model", "ok", 200, 1.0)
        trace.attempt_ended(attempt)
        record.status, record.ref, record.attempts, record.tries = 200, ref, [attempt], 1
        record.usage, record.cost_usd = Usage(12, 3), 1e-5
        trace.response_model, trace.finish_reasons = "bench-model", ("stop",)
        trace.finish(record, ("127.0.0.1", 8080))

    def cpu_us(work: Any, number: int, per: float = 1.0) -> float:
        return min(timeit.repeat(work, number=number, repeat=5, timer=time.process_time)) / number / per * 1e6

    class QueueOnly(HandOffSpanProcessor):
        """The hand-off's `on_end` without its process: the queue is emptied as the thread would
        (keeping one batch for the steps below), so that retained spans do not load the GC."""

        def __init__(self) -> None:  # noqa: D107 - no child process
            self._queue = deque()
            self._max_queue = 1 << 40
            self._max_batch = 512
            self._child_gone = False
            self._scope = None
            self.dropped = 0
            self._wake = threading.Event()
            self.kept: list[Any] = []

        def on_end(self, span: Any) -> None:
            super().on_end(span)
            if len(self._queue) >= self._max_batch:
                if not self.kept:
                    self.kept = list(self._queue)
                self._queue.clear()

        def shutdown(self) -> None:
            pass

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    out = []
    for label, attempts in (("request path: request + attempt span, SDK spans (previous build's shape)", "always"),
                            ("request path: one span, the attempt an event (default)", "auto")):
        provider = TracerProvider()
        out.append((label, cpu_us(lambda t=Tracing(provider, attempts=attempts): request(t), 10_000)))
        provider.shutdown()
    # each processor's on_end alone, on one finished request span
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=own_resource({}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    for _ in range(512):
        request(tracing)
    spans = exporter.get_finished_spans()  # one request a span: a batch of 512
    span = spans[0]
    batch_processor = BatchSpanProcessor(Discard())
    out.append(("export thread: BatchSpanProcessor.on_end, per span (its thread exporting to nowhere)",
                cpu_us(lambda: batch_processor.on_end(span), 20_000)))
    batch_processor.shutdown()
    hand_off = QueueOnly()
    out.append(("export process: the hand-off's on_end (a tuple queued), per span",
                cpu_us(lambda: hand_off.on_end(span), 20_000)))
    from opentelemetry.sdk.trace import sampling

    sampled_out = TracerProvider(sampler=sampling.ParentBasedTraceIdRatio(0.0))
    out.append(("request path: a sampled-out request (9 in 10 at 10% sampling)",
                cpu_us(lambda t=Tracing(sampled_out, owned=True): request(t), 10_000)))
    sampled_out.shutdown()
    batch = hand_off.kept
    out.append(("hand-off thread: orjson of a batch of 512, per span",
                cpu_us(lambda: orjson.dumps(batch, default=str), 200, len(batch))))

    resource, scopes = own_resource({}), {}
    wire = orjson.loads(orjson.dumps(batch, default=str))
    out.append(("exporter process: rebuilding ReadableSpans, per span",
                cpu_us(lambda: [_rebuild(item, resource, scopes) for item in wire], 20, len(wire))))
    out.append(("OTLP protobuf: encode_spans + serialise, per span (batches of 512)",
                cpu_us(lambda: encode_spans(spans).SerializePartialToString(), 20, len(spans))))
    if json_exporter_available():
        from opentelemetry.exporter.otlp.json.common._internal.trace_encoder import encode_spans as encode_json
        out.append(("OTLP JSON: encode_spans + to_json, per span (batches of 512)",
                    cpu_us(lambda: encode_json(spans).to_json().encode(), 20, len(spans))))

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    otlp = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{server.server_port}/v1/traces")
    data = encode_spans(spans).SerializePartialToString()
    out.append(("HTTP POST of the batch, per span (incl. the loopback sink's handling)",
                cpu_us(lambda: otlp._client.export(data), 50, len(spans))))
    otlp.shutdown()
    server.shutdown()
    provider.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--micro-only", action="store_true", help="only the per-request micro-benchmark")
    parser.add_argument("--modes", nargs="*", help="only the modes whose name contains one of these words")
    args = parser.parse_args()
    if args.micro_only:
        for label, us in micro():
            print(f"| {label} | {us:.2f} |")
        return
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    results = asyncio.run(macro(args))
    untraced = results.get("metrics + logs") or results.get("monitoring off")
    base = statistics.median(r[0] for r in untraced)
    base_cpu = statistics.median(r[3] for r in untraced)
    print(f"\n| mode | req/s (median of {args.rounds}) | vs metrics + logs | p50 ms | p99 ms | serving process "
          "CPU µs/req | vs metrics + logs | exporter process CPU µs/req |\n|---|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        rps = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[3] for r in rows)
        print(f"| {mode} | {rps:.0f} | {100 * (rps / base - 1):+.1f}% | "
              f"{statistics.median(r[1] for r in rows):.2f} | {statistics.median(r[2] for r in rows):.2f} | "
              f"{cpu:.0f} | {cpu - base_cpu:+.0f} | {statistics.median(r[4] for r in rows):.0f} |")
    print("\n| per-request telemetry work | µs |\n|---|---|")
    for label, us in micro():
        print(f"| {label} | {us:.2f} |")


if __name__ == "__main__":
    main()
