"""Streaming benchmark: direct (nginx streaming mock) vs the bare aiohttp relay (floor) vs tiergate.

One command: `python bench/stream_bench.py` (Debian: apt-get install nginx-light
libnginx-mod-http-echo wrk). The mock upstream is nginx with the echo module: a role chunk at once,
then `--chunks` content chunks `--gap` seconds apart, then the final chunk and `data: [DONE]`
(`echo`, `echo_flush`, `echo_sleep`: almost nothing per stream). wrk holds C concurrent streams
(each connection asks for the next stream as soon as one ends, its first one after a random delay of
up to one stream's length, so the C streams are spread as in a steady state rather than starting in
one burst; a Lua `response` hook counts streams that did not end with `[DONE]`). tiergate (one
worker, default features on) and the floor (`bench/stream_floor.py`, a dozen lines) are pinned to
core 1, nginx and wrk to core 0.

Measured per target: time to first chunk (one stream at a time on a fresh connection, raw socket,
the targets interleaved, the median of `--ttfc` streams each);
at each concurrency: completed streams/s, full-stream p50/p99, errors and incomplete streams, the
server's CPU per relayed chunk (CPU seconds over the run / chunks relayed in it, from the bytes wrk
read: streams cut at the end of the run count for what they relayed),
RSS idle and at the peak, and core 0's busy share during the run (the load generator and the mock:
a direct run well under 100% is not saturated). Writes bench/out/stream_last.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from run import cpu_seconds, free_port, stop, to_ms  # bench/run.py: the same /proc and wrk readings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


UPSTREAM_PORT, FLOOR_PORT, TIERGATE_PORT = free_port(), free_port(), free_port()
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
BODY = ('{"model":"general_purpose","messages":[{"role":"user","content":"Tell me a story."}],'
        '"stream":true}')
HEAD = '{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench-model",'


def event(delta: str, finish: str = "null") -> str:
    return f'data: {HEAD}"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}\\n'


def nginx_conf(tmp: Path, chunks: int, gap: float) -> str:
    role = event('{"role":"assistant","content":""}')
    lines = [f"echo '{role}';", "echo_flush;"]
    for i in range(chunks):
        content = event(f'{{"content":" word{i}"}}')
        lines += [f"echo_sleep {gap};", f"echo '{content}';", "echo_flush;"]
    final = event("{}", '"stop"') + "\\ndata: [DONE]\\n"
    lines.append(f"echo '{final}';")
    body = "\n      ".join(lines)
    return f"""
load_module {ECHO_MODULE};
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {{
    listen 127.0.0.1:{UPSTREAM_PORT} reuseport backlog=4096;
    location / {{
      default_type text/event-stream;
      echo_read_request_body;
      {body}
    }}
  }}
}}
"""


TABLE = """
providers:
  bench: {{base_url: "http://127.0.0.1:{port}/v1", api_key: sk-bench}}
routes:
  - {{use_case: general_purpose, tier: standard, model: bench/bench-model}}
"""

WRK_LUA = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-client"
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) incomplete = 0; started = 0 end
-- the first request of each connection starts at a random point of one stream's length: C streams
-- in a steady state, not C streams that start (and end, and start again) in the same millisecond
function delay()
  started = started + 1
  if started <= {connections} then return math.random(0, {stream_ms}) end
  return 0
end
function response(status, headers, body)
  if status ~= 200 or not string.find(body, "data: [DONE]", 1, true) then incomplete = incomplete + 1 end
end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("incomplete") end
  io.write(string.format("INCOMPLETE %d\\n", n))
end
"""


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            first_chunk_ms(port)
            return
        except (OSError, AssertionError):
            time.sleep(0.2)
    raise SystemExit(f"nothing streamed on port {port}")


def first_chunk_ms(port: int) -> float:
    """Milliseconds from sending a stream request (a fresh connection, raw socket: no client library in
    the figure) to its first `data:` bytes; the stream is then dropped (so the server's upstream
    connection is closed too, for the floor and tiergate alike: both pay a new upstream connect)."""
    body = BODY.encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(request)
        data = b""
        while b"data:" not in data:
            more = sock.recv(65536)
            assert more, "the stream ended before its first chunk"
            data += more
        return (time.perf_counter() - started) * 1000


def stream_bytes(port: int) -> tuple[int, int]:
    """(header bytes, body bytes as framed on the wire) of one whole stream from `port`."""
    body = BODY.encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        data = b""
        while more := sock.recv(65536):
            data += more
    head = data.index(b"\r\n\r\n") + 4
    assert b"data: [DONE]" in data, data[-200:]
    return head, len(data) - head


def ttfc(ports: dict[str, int], n: int) -> dict[str, float]:
    """Median time to first chunk per target, the targets interleaved (drift hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in ports}
    for _ in range(n):
        for name, port in ports.items():
            times[name].append(first_chunk_ms(port))
            time.sleep(0.01)
    return {name: statistics.median(found) for name, found in times.items()}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def core_ticks(core: int) -> tuple[int, int]:
    """(busy, total) jiffies of one core so far."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]
            return sum(values) - idle, sum(values)
    return 0, 1


def wrk(port: int, connections: int, seconds: int, script: Path, pid: int | None,
        framing: tuple[int, int], chunks_per_stream: int) -> dict[str, float]:
    """One wrk run; samples the server's RSS while it runs (the peak)."""
    peak = [rss_kib(pid) if pid else 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            peak[0] = max(peak[0], rss_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True) if pid else None
    if sampler:
        sampler.start()
    busy0, total0 = core_ticks(0)
    cpu0 = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    out = subprocess.run(
        ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "--latency",
         "-s", str(script), f"http://127.0.0.1:{port}/v1/chat/completions"],
        capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu0 if pid else float("nan")
    busy1, total1 = core_ticks(0)
    stop.set()
    if sampler:
        sampler.join()
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    # chunks relayed in the run: the bytes wrk read (streams cut at its end included) over a stream's
    # framed body, less the response headers, times the chunks of a stream
    amount, unit = re.search(r"([\d.]+)([KMG]?B) read", out).groups()
    read = float(amount) * {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}[unit]
    requests = float(re.search(r"(\d+) requests in", out).group(1))
    head, body = framing
    chunks = max(1.0, (read - head * (requests + connections)) / body * chunks_per_stream)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "chunks": chunks,
            "p50": to_ms(re.search(r"\n\s+50%\s+(\S+)", out).group(1)),
            "p99": to_ms(re.search(r"\n\s+99%\s+(\S+)", out).group(1)),
            "requests": requests,
            "errors": errors, "incomplete": int(re.search(r"INCOMPLETE (\d+)", out).group(1)),
            "cpu": cpu, "elapsed": elapsed, "rss_peak": peak[0],
            "core0": 100 * (busy1 - busy0) / max(1, total1 - total0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20, help="duration of each wrk run")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between chunks")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--ttfc", type=int, default=200, help="streams for time to first chunk (its median moves "
                        "by ±0.15 ms between runs of 50 on a 2-core machine)")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for tiergate")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed: apt-get install nginx-light libnginx-mod-http-echo wrk")
    if not Path(ECHO_MODULE).exists():
        raise SystemExit("nginx's echo module is needed: apt-get install libnginx-mod-http-echo")
    tmp = Path(tempfile.mkdtemp(prefix="tiergate-stream-bench-"))
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, args.chunks, args.gap))
    (tmp / "routes.yaml").write_text(TABLE.format(port=UPSTREAM_PORT))
    stream_ms = int(args.chunks * args.gap * 1000)
    scripts = {}
    for c in args.concurrency:
        scripts[c] = tmp / f"stream-{c}.lua"
        scripts[c].write_text(WRK_LUA.format(body=BODY, connections=c, stream_ms=stream_ms))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    env = {**os.environ, "TIERGATE_HEALTH_CHECK_INTERVAL": "0", "PYTHONPATH": str(ROOT)}
    env.update(dict(kv.split("=", 1) for kv in args.env))
    chunks_per_stream = args.chunks + 2  # the role chunk, the content chunks, the final chunk with [DONE]
    load = Path("/proc/loadavg").read_text().split()[:3]
    procs: list[subprocess.Popen] = []
    rows: dict[str, dict[str, float]] = {}
    try:
        procs.append(subprocess.Popen(["taskset", "-c", "0", nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]))
        wait_port(UPSTREAM_PORT)
        floor = subprocess.Popen(["taskset", "-c", "1", sys.executable, str(HERE / "stream_floor.py"),
                                  str(FLOOR_PORT), f"http://127.0.0.1:{UPSTREAM_PORT}/v1/chat/completions"],
                                 stderr=subprocess.DEVNULL)  # a dropped TTFC stream is logged as an error there
        procs.append(floor)
        log = open(tmp / "tiergate.log", "w")  # noqa: SIM115 - closed with the process
        tiergate = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "proxy", "serve", "--config",
                                     str(tmp / "routes.yaml"), "--port", str(TIERGATE_PORT)],
                                    cwd=str(tmp), env=env, stdout=log, stderr=log)
        procs.append(tiergate)
        wait_port(FLOOR_PORT)
        wait_port(TIERGATE_PORT)
        targets = {"direct": (UPSTREAM_PORT, None), "floor": (FLOOR_PORT, floor.pid),
                   "tiergate": (TIERGATE_PORT, tiergate.pid)}
        framing = {name: stream_bytes(port) for name, (port, _) in targets.items()}
        first = ttfc({name: port for name, (port, _) in targets.items()}, args.ttfc)
        for name, (port, pid) in targets.items():
            row: dict[str, float] = {"ttfc": first[name], "rss_idle": rss_kib(pid) if pid else 0}
            for c in args.concurrency:
                run = wrk(port, c, args.seconds, scripts[c], pid, framing[name], chunks_per_stream)
                run["us_per_chunk"] = run["cpu"] / run["chunks"] * 1e6 if pid else float("nan")
                row.update({f"{k}@{c}": v for k, v in run.items()})
            rows[name] = row
    finally:
        stop(procs)
    d, f, t = rows["direct"], rows["floor"], rows["tiergate"]
    lines = [f"streams of {chunks_per_stream} chunks ({args.chunks} content chunks {args.gap * 1000:.0f} ms apart), "
             f"{args.seconds} s per run; load average at the start {' '.join(load)}", "",
             "| target | TTFC ms | C | streams/s | p50 s | p99 s | p99 vs direct ms | errors | incomplete "
             "| CPU µs/chunk | RSS idle→peak MiB | KiB per open stream | core 0 busy % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        for c in args.concurrency:
            g = lambda k, c=c, r=r: r[f"{k}@{c}"]  # noqa: E731
            pid_row = name != "direct"
            rss = f"{r['rss_idle'] / 1024:.1f}→{g('rss_peak') / 1024:.1f}" if pid_row else "-"
            per_stream = f"{(g('rss_peak') - r['rss_idle']) / c:.1f}" if pid_row else "-"
            cpu = f"{g('us_per_chunk'):.1f}" if pid_row else "-"
            lines.append(f"| {name} | {r['ttfc']:.3f} | {c} | {g('rps'):.1f} | {g('p50') / 1000:.3f} | "
                         f"{g('p99') / 1000:.3f} | {g('p99') - d[f'p99@{c}']:+.0f} | {int(g('errors'))} | "
                         f"{int(g('incomplete'))} | {cpu} | {rss} | {per_stream} | {g('core0'):.0f} |")
    top = max(args.concurrency)
    lines += ["", f"tiergate vs floor: added TTFC {t['ttfc'] - f['ttfc']:+.3f} ms (target <= +0.2); "
              f"CPU per chunk at C={top} {t[f'us_per_chunk@{top}'] / f[f'us_per_chunk@{top}']:.2f}x the floor's "
              f"(target <= 1.3); at C={top}: {int(t[f'errors@{top}'])} errors, {int(t[f'incomplete@{top}'])} "
              f"incomplete, p99 {t[f'p99@{top}'] - d[f'p99@{top}']:+.0f} ms vs direct (target <= 100), "
              f"RSS growth {(t[f'rss_peak@{top}'] - t['rss_idle']) / top:.1f} KiB per open stream (target < 40)"]
    text = "\n".join(lines)
    print(text)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "stream_last.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
