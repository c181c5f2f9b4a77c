"""`tiergate serve --workers N`: N server processes sharing one port through SO_REUSEPORT.

Each worker is a fresh (spawned) process with its own event loop, pools and breakers; the
kernel spreads new connections across them. The parent only supervises: it forwards SIGTERM /
SIGINT so every worker drains, restarts a worker that dies while serving, and stops all of them
if one fails at start-up (a bad bind would otherwise restart forever).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time
from types import FrameType

from .settings import RouterConfig

log = logging.getLogger("tiergate")

STARTUP_GRACE = 5.0  # a worker that exits sooner than this after its start failed to start


def _worker_main(config: RouterConfig) -> None:
    """Entry point of one worker process."""
    import asyncio

    from .server import serve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        pass
    asyncio.run(serve(config))


def run_workers(config: RouterConfig) -> int:
    """Run `config.workers` workers until SIGTERM/SIGINT; return the exit code for the CLI."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus-client's multiprocess mode shares metrics across the workers; it needs a
        # fresh directory per pod run (the observability module collects from it)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tiergate-prom-")
    ctx = multiprocessing.get_context("spawn")
    workers: dict[int, tuple[multiprocessing.process.BaseProcess, float]] = {}
    stopping = False

    def start(slot: int) -> None:
        proc = ctx.Process(target=_worker_main, args=(config,), name=f"tiergate-worker-{slot}", daemon=False)
        proc.start()
        workers[slot] = (proc, time.monotonic())

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc, _ in workers.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    exit_code = 0
    try:
        for slot in range(config.workers):
            start(slot)
        log.info("tiergate: %d workers on http://%s:%s (pids %s)", config.workers, config.host, config.port,
                 ", ".join(str(p.pid) for p, _ in workers.values()))
        while workers:
            sentinels = {proc.sentinel: slot for slot, (proc, _) in workers.items()}
            for ready in multiprocessing.connection.wait(list(sentinels)):
                slot = sentinels[ready]  # type: ignore[index]
                proc, started = workers.pop(slot)
                proc.join()
                code = proc.exitcode or 0
                if stopping:
                    exit_code = exit_code or (code if code > 0 else 0)
                    continue
                if code != 0 and time.monotonic() - started < STARTUP_GRACE:
                    log.error("tiergate: worker %s failed at start-up (exit %s); stopping", proc.pid, code)
                    exit_code = code if code > 0 else 1
                    forward(signal.SIGTERM, None)
                    continue
                log.warning("tiergate: worker %s exited (%s); starting another", proc.pid, code)
                start(slot)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc, _ in workers.values():  # only on an unexpected error in the loop above
            proc.terminate()
    return exit_code
