"""Start and stop a `tiergate serve --demo` process for the bench scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workers: int = 1, *, monitoring: bool = False, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    env.update({"PYTHONPATH": str(ROOT), "ENABLE_MONITORING": "true" if monitoring else "false"})
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port),
                             "--workers", str(workers)], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tiergate did not start") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(timeout=60)
