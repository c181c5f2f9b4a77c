"""Machine instructions per proxied request, from valgrind's callgrind: C-level work included.

    python bench/callgrind.py [--pythonpath DIR] [--upstream http://127.0.0.1:18001/v1] [--requests 800]
                              [--strategy ordered|weighted|least_latency|cheapest]

Runs `tiergate serve` (uvloop, one worker, health checks off) under `valgrind --tool=callgrind`
twice, serving 8 and then 8 + N requests (aiohttp, 8 concurrent, the body and headers of
`bench/opcount.py`), and prints (Ir(8 + N) - Ir(8)) / N: start-up, shutdown and warm-up cancel out.
A count, not a timing: the machine's load does not change it (string hashing is seeded the same in
every run, so two runs of one build agree to a few hundred instructions). Needs valgrind and an upstream
answering `POST /v1/chat/completions` (`bench/mock_upstream.py`). `--pythonpath` measures another
checkout (e.g. a worktree of an older build) with the same interpreter and packages. `--strategy S`
routes to two deployments (`bench-model`, then `bench-model-b`) under strategy S (weights 9:1 for
`weighted`), so one strategy's cost per request can be compared with another's.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opcount import LOAD  # the same requests as the opcode count

REPO = Path(__file__).resolve().parent.parent
EXTRA_ENV: dict[str, str] = {}  # --env KEY=VALUE
STRATEGY: list[str] = []  # --strategy: the route's, over two deployments
_TOTALS = re.compile(r"^(?:summary|totals):\s*([\d,]+)", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tiergate exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"tiergate did not listen on {port} within {timeout}s")


def instructions(pythonpath: str, upstream: str, requests: int, workdir: Path) -> int:
    """Total instructions (Ir) of one `tiergate serve` process that served `requests` requests."""
    table = workdir / "routes.yaml"
    route = "{use_case: general_purpose, tier: standard, model: bench/bench-model}"
    if STRATEGY:
        weights = ", weights: [9, 1]" if STRATEGY[0] == "weighted" else ""
        route = ("{use_case: general_purpose, tier: standard, model: bench/bench-model, "
                 f"fallbacks: [bench/bench-model-b], strategy: {STRATEGY[0]}{weights}}}")
    table.write_text(f'providers:\n  bench: {{base_url: "{upstream}", api_key: sk-bench}}\n'
                     f"routes:\n  - {route}\n")
    port = free_port()
    out = workdir / f"callgrind.{requests}.out"
    env = {**os.environ, "PYTHONPATH": pythonpath, "TIERGATE_HEALTH_CHECK_INTERVAL": "0", **EXTRA_ENV,
           "PYTHONHASHSEED": "0"}
    # the interpreter itself, not a shim script (valgrind would count the shim's shell too)
    python = os.path.realpath(sys.executable)
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, "-m", "proxy", "serve",
         "--config", str(table), "--port", str(port)],
        env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        subprocess.run([python, "-c", LOAD, str(port), str(requests), "0"], check=True, cwd=workdir)  # non-stream
    finally:
        proc.send_signal(signal.SIGINT)  # a clean shutdown: callgrind writes its file at exit
        proc.wait(timeout=300)
    match = _TOTALS.search(out.read_text())
    if match is None:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pythonpath", default=str(REPO), help="the checkout to measure (default: this one)")
    parser.add_argument("--upstream", default="http://127.0.0.1:18001/v1")
    parser.add_argument("--requests", type=int, default=800, help="requests counted (beyond the 8 of warm-up)")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for tiergate")
    parser.add_argument("--keep", metavar="DIR", help="leave the callgrind files in DIR (for callgrind_annotate)")
    parser.add_argument("--strategy", help="the route's strategy, over two deployments (default: one deployment)")
    args = parser.parse_args()
    if args.strategy:
        STRATEGY.append(args.strategy)
    EXTRA_ENV.update(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        base = instructions(args.pythonpath, args.upstream.rstrip("/"), 8, workdir)
        total = instructions(args.pythonpath, args.upstream.rstrip("/"), 8 + args.requests, workdir)
    print(f"{args.pythonpath}: {(total - base) / args.requests:,.0f} instructions per request "
          f"(Ir {base:,} for 8 requests, {total:,} for {8 + args.requests})")


if __name__ == "__main__":
    main()
