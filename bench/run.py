"""Load benchmark: direct (nginx mock upstream) vs the floor forwarder vs tiergate.

One command: `python bench/run.py` (needs nginx and wrk from Debian: apt-get install nginx-light wrk).
tiergate and the floor are pinned to core 0, nginx and wrk to core 1. For each target: latency
p50/p99 at concurrency 1, requests/s and the server's CPU time per request at concurrency 64, errors,
and the server's RSS after the load. Floor and tiergate are measured in interleaved rounds (medians).
Writes bench/out/last.md and prints the table.

`--limit` adds a third target, tiergate with one limit on every request counted in a local Redis
(`--redis-url`, default db 15; a key namespace of its own), measured in the same interleaved rounds:
the added p50 at concurrency 1 and the requests/s at concurrency 64 against tiergate without one.

`--keys` adds `tiergate+keys`, the same with three named inbound keys (the load's among them).

`--strategy S` routes over two deployments of the upstream (its model, then a fallback) and adds
`tiergate+S`, the same two chosen among by strategy S per request, measured in the same rounds
against the ordered route.

`--baseline DIR` adds tiergate run from another checkout (`PYTHONPATH=DIR`, e.g. a worktree of an
older build), measured in the same interleaved rounds: the regression of this build against that
one, with the machine's drift shared by both.
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
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def free_port() -> int:
    """A port nobody listens on now (a mock upstream of another run may hold 18001)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


UPSTREAM_PORT, FLOOR_PORT, TIERGATE_PORT, LIMITED_PORT, BASELINE_PORT, STRATEGY_PORT, KEYS_PORT = (
    free_port() for _ in range(7))
ANSWER = ('{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model",'
          '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},'
          '"logprobs":null,"finish_reason":"stop"}],'
          '"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}')
BODY = ('{"model":"general_purpose","messages":[{"role":"system","content":"You are helpful."},'
        '{"role":"user","content":"Hello there, please say hello back."}],"temperature":0.7}')

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      default_type application/json;{extra_headers}
      return 200 '{answer}';
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

# --strategy S: both tables route over two deployments of the one upstream (its model, then a
# fallback); the ordered one is `tiergate` (and the baseline), the one choosing by S per request is
# `tiergate+S`, measured in the same rounds
TWO_DEPLOYMENTS = """
providers:
  bench: {{base_url: "http://127.0.0.1:{port}/v1", api_key: sk-bench}}
  bench2: {{base_url: "http://127.0.0.1:{port}/v1", api_key: sk-bench}}
routes:
  - {{use_case: general_purpose, tier: standard, model: bench/bench-model, fallbacks: [bench2/bench-model]{strategy}}}
"""

# one limit that every request is checked against and none reaches (a count in Redis per request)
LIMIT = """
limits:
  - {name: bench, requests_per_minute: 1000000000}
"""

WRK_LUA = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-client"
{extra_headers}"""

# --openai-headers: what the OpenAI SDK sends and what OpenAI answers with, so that tiergate's
# forwarding and relaying of headers is part of what is measured (the floor passes none of them)
PROVIDER_HEADERS = ("x-request-id req_bench", "openai-processing-ms 312", "openai-version 2020-10-01",
                    "openai-organization org-bench", "x-ratelimit-limit-requests 10000",
                    "x-ratelimit-limit-tokens 30000000", "x-ratelimit-remaining-requests 9999",
                    "x-ratelimit-remaining-tokens 29999976", "x-ratelimit-reset-requests 6ms",
                    "x-ratelimit-reset-tokens 0s", "access-control-expose-headers X-Request-ID",
                    "cf-cache-status DYNAMIC", "x-content-type-options nosniff")
SDK_HEADERS = {"Accept": "application/json", "User-Agent": "OpenAI/Python 1.99.0",
               "X-Stainless-Lang": "python", "X-Stainless-Package-Version": "1.99.0",
               "X-Stainless-OS": "Linux", "X-Stainless-Arch": "x64", "X-Stainless-Runtime": "CPython",
               "X-Stainless-Runtime-Version": "3.11.7", "X-Stainless-Async": "false",
               "x-stainless-retry-count": "0", "x-stainless-read-timeout": "600",
               "OpenAI-Organization": "org-bench"}


def wait_port(port: int, timeout: float = 15.0, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=BODY.encode(),
                                         headers={"Content-Type": "application/json", **(headers or {})})
            with urllib.request.urlopen(req, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answered on port {port}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def to_ms(value: str) -> float:
    """wrk's latency figure (`850.00us`, `1.20ms`, `5.03s`, `1.01m`) in milliseconds."""
    m = re.match(r"([\d.]+)(us|ms|s|m)", value)
    assert m, value
    n = float(m.group(1))
    return {"us": n / 1000, "ms": n, "s": n * 1000, "m": n * 60000}[m.group(2)]


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the benchmark's processes, killing any that do not stop within 10 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def wrk(port: int, connections: int, seconds: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
              "p50": to_ms(re.search(r"\n\s+50%\s+(\S+)", out).group(1)),
              "p99": to_ms(re.search(r"\n\s+99%\s+(\S+)", out).group(1))}
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    result["errors"] = errors
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved floor/tiergate rounds (medians)")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for tiergate")
    parser.add_argument("--openai-headers", action="store_true",
                        help="the SDK's request headers and OpenAI's response headers on every call")
    parser.add_argument("--limit", action="store_true", help="also tiergate with one limit per request in Redis")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="the Redis of --limit")
    parser.add_argument("--baseline", metavar="DIR", help="also tiergate from the checkout DIR, to compare builds")
    parser.add_argument("--keys", action="store_true", help="also tiergate with inbound keys (the bench's key named)")
    parser.add_argument("--strategy", metavar="S", help="two deployments: ordered, and also tiergate choosing by S")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed: apt-get install nginx-light wrk")
    tmp = Path(tempfile.mkdtemp(prefix="tiergate-bench-"))
    extra = "".join(f"\n      add_header {h};" for h in PROVIDER_HEADERS) if args.openai_headers else ""
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=UPSTREAM_PORT, answer=ANSWER,
                                                      extra_headers=extra))
    (tmp / "routes.yaml").write_text(TWO_DEPLOYMENTS.format(port=UPSTREAM_PORT, strategy="") if args.strategy
                                     else TABLE.format(port=UPSTREAM_PORT))
    script = tmp / "post.lua"
    sdk = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in SDK_HEADERS.items()) if args.openai_headers else ""
    script.write_text(WRK_LUA.format(body=BODY, extra_headers=sdk))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    env = {**os.environ, "TIERGATE_HEALTH_CHECK_INTERVAL": "0"}
    env.update(dict(kv.split("=", 1) for kv in args.env))
    procs = []
    try:
        procs.append(subprocess.Popen(["taskset", "-c", "1", nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]))
        wait_port(UPSTREAM_PORT)
        floor = subprocess.Popen(["taskset", "-c", "0", sys.executable, str(HERE / "floor.py"), str(FLOOR_PORT),
                                  f"http://127.0.0.1:{UPSTREAM_PORT}/v1/chat/completions"])
        procs.append(floor)
        log = open(tmp / "tiergate.log", "w")
        tiergate = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "proxy", "serve", "--config",
                                     str(tmp / "routes.yaml"), "--port", str(TIERGATE_PORT)],
                                    cwd=str(tmp), env=env, stdout=log, stderr=log)
        procs.append(tiergate)
        wait_port(FLOOR_PORT)
        wait_port(TIERGATE_PORT)
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "floor": [], "tiergate": []}
        targets = {"direct": (UPSTREAM_PORT, None), "floor": (FLOOR_PORT, floor.pid),
                   "tiergate": (TIERGATE_PORT, tiergate.pid)}
        rounds = ["floor", "tiergate"]
        if args.limit:
            (tmp / "limited.yaml").write_text(TABLE.format(port=UPSTREAM_PORT) + LIMIT)
            limited_env = {**env, "TIERGATE_REDIS_URL": args.redis_url,
                           "TIERGATE_CACHE_NAMESPACE": f"tiergate-bench-{os.getpid()}"}
            limited = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "proxy", "serve", "--config",
                                        str(tmp / "limited.yaml"), "--port", str(LIMITED_PORT)],
                                       cwd=str(tmp), env=limited_env, stdout=log, stderr=log)
            procs.append(limited)
            wait_port(LIMITED_PORT)
            runs["tiergate+limit"] = []
            targets["tiergate+limit"] = (LIMITED_PORT, limited.pid)
            rounds.append("tiergate+limit")
        if args.keys:  # wrk sends `Bearer sk-client`: one of three named keys
            keyed = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "proxy", "serve", "--config",
                                      str(tmp / "routes.yaml"), "--port", str(KEYS_PORT)], cwd=str(tmp),
                                     env={**env, "TIERGATE_API_KEYS": "a=sk-other-1,bench=sk-client,c=sk-other-2"},
                                     stdout=log, stderr=log)
            procs.append(keyed)
            wait_port(KEYS_PORT, headers={"Authorization": "Bearer sk-client"})
            runs["tiergate+keys"] = []
            targets["tiergate+keys"] = (KEYS_PORT, keyed.pid)
            rounds.append("tiergate+keys")
        if args.strategy:
            name = f"tiergate+{args.strategy}"
            (tmp / "strategy.yaml").write_text(TWO_DEPLOYMENTS.format(port=UPSTREAM_PORT,
                                                                      strategy=f", strategy: {args.strategy}"))
            chooser = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "proxy", "serve", "--config",
                                        str(tmp / "strategy.yaml"), "--port", str(STRATEGY_PORT)],
                                       cwd=str(tmp), env=env, stdout=log, stderr=log)
            procs.append(chooser)
            wait_port(STRATEGY_PORT)
            runs[name] = []
            targets[name] = (STRATEGY_PORT, chooser.pid)
            rounds.append(name)
        if args.baseline:
            baseline = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "proxy", "serve", "--config",
                                         str(tmp / "routes.yaml"), "--port", str(BASELINE_PORT)],
                                        cwd=str(tmp), env={**env, "PYTHONPATH": args.baseline}, stdout=log, stderr=log)
            procs.append(baseline)
            wait_port(BASELINE_PORT)
            runs["baseline"] = []
            targets["baseline"] = (BASELINE_PORT, baseline.pid)
            rounds.insert(1, "baseline")
        order = ["direct"] + rounds * args.rounds  # interleaved: drift hits them alike
        for name in order:
            port, pid = targets[name]
            wrk(port, 8, 2, script)  # warm up pools and caches
            c1 = wrk(port, 1, args.seconds, script)
            cpu_before = cpu_seconds(pid) if pid else 0.0
            c64 = wrk(port, 64, args.seconds, script)
            cpu = (cpu_seconds(pid) - cpu_before) / c64["requests"] * 1e6 if pid else float("nan")
            runs[name].append({"p50": c1["p50"], "p99": c1["p99"], "rps": c64["rps"], "cpu": cpu,
                               "errors": c1["errors"] + c64["errors"],
                               "rss": rss_mib(pid) if pid else float("nan")})
        rows = {name: {key: (sum(r[key] for r in found) if key == "errors" else
                             max(r[key] for r in found) if key == "rss" else
                             statistics.median(r[key] for r in found)) for key in found[0]}
                for name, found in runs.items()}
    finally:
        stop(procs)
    d, f, t = rows["direct"], rows["floor"], rows["tiergate"]
    lines = [f"medians of {args.rounds} interleaved round(s) of {args.seconds} s per measurement", "",
             "| target | p50 ms (c=1) | p99 ms (c=1) | added p50 / p99 ms | req/s (c=64) | CPU µs/req (c=64) "
             "| errors | RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        added = "-" if name == "direct" else f"{r['p50'] - d['p50']:.3f} / {r['p99'] - d['p99']:.3f}"
        rss = "-" if r["rss"] != r["rss"] else f"{r['rss']:.1f}"
        cpu = "-" if r["cpu"] != r["cpu"] else f"{r['cpu']:.1f}"
        lines.append(f"| {name} | {r['p50']:.3f} | {r['p99']:.3f} | {added} | {r['rps']:.0f} | {cpu} | "
                     f"{int(r['errors'])} | {rss} |")
    lines.append("")
    lines.append(f"tiergate vs floor: added p50 {(t['p50'] - f['p50']):+.3f} ms (target <= +0.1), "
                 f"added p99 {t['p99'] - d['p99']:.3f} ms (target <= 1), "
                 f"req/s {100 * t['rps'] / f['rps']:.1f}% of floor (target >= 85%; by CPU per request "
                 f"{100 * f['cpu'] / t['cpu']:.1f}%), "
                 f"RSS {t['rss']:.1f} MiB (target < 60)")
    if args.limit:
        lt = rows["tiergate+limit"]
        lines.append(f"one limit per request (Redis at {args.redis_url.rpartition('@')[2]}): added p50 "
                     f"{lt['p50'] - t['p50']:+.3f} ms over tiergate (target <= 0.15), req/s "
                     f"{100 * lt['rps'] / t['rps']:.1f}% of tiergate without limits (target >= 80%), "
                     f"CPU {lt['cpu'] - t['cpu']:+.1f} µs/req")
    if args.keys:
        k = rows["tiergate+keys"]
        lines.append(f"with inbound keys: req/s {100 * k['rps'] / t['rps']:.1f}% of tiergate without (target >= "
                     f"95%), CPU per request {100 * (k['cpu'] / t['cpu'] - 1):+.1f}%, added p50 "
                     f"{k['p50'] - t['p50']:+.3f} ms")
    if args.strategy:
        st = rows[f"tiergate+{args.strategy}"]
        lines.append(f"two deployments, {args.strategy} vs ordered: req/s {100 * st['rps'] / t['rps']:.1f}% of "
                     f"ordered (target >= 95%), CPU per request {100 * (st['cpu'] / t['cpu'] - 1):+.1f}%, "
                     f"added p50 {st['p50'] - t['p50']:+.3f} ms")
    if args.baseline:
        b = rows["baseline"]
        lines.append(f"this build vs the baseline {args.baseline}: req/s {100 * t['rps'] / b['rps']:.1f}% of "
                     f"its (target >= 95%), CPU per request {100 * (t['cpu'] / b['cpu'] - 1):+.1f}%, "
                     f"added p50 {t['p50'] - b['p50']:+.3f} ms")
    text = "\n".join(lines)
    print(text)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "last.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
