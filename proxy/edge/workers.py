"""`tiergate serve --workers N`: N server processes sharing one port through SO_REUSEPORT.

Each worker is a fresh (spawned) process with its own event loop, pools and breakers; the
kernel spreads new connections across them. The parent only supervises: it forwards SIGTERM /
SIGINT so every worker drains, and restarts a worker that dies, after a backoff that doubles
while it keeps dying quickly (`worker_restart_backoff` up to `worker_restart_backoff_max`). Only a
worker's very first start failing (it exits before it listens: a bad bind, a bad setting) stops
the pod: that would fail the same way forever, while a crash later is the one thing to survive.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from ..settings import RouterConfig

log = logging.getLogger("tiergate")


def _worker_main(config: RouterConfig, listening: Any) -> None:
    """Entry point of one worker process; sets `listening` once it accepts connections."""
    import asyncio

    from ..types import ConfigError
    from .app import serve

    logging.basicConfig(level=config.log_level.upper(), format="%(message)s")  # checked by `serve`
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        pass
    try:
        asyncio.run(serve(config, started=listening))
    except ConfigError as exc:  # e.g. the port is taken: one line, as the single-process server says it
        print(f"tiergate: {exc.message}", file=sys.stderr)
        sys.exit(2)


@dataclass
class _Slot:
    """One worker position: its current process, and how its restarts are paced."""

    backoff: float
    proc: BaseProcess | None = None
    listening: Any = None  # a multiprocessing Event, set by the worker once it listens
    started: float = 0.0
    ever_listened: bool = False
    restart_at: float | None = None


def run_workers(config: RouterConfig) -> int:
    """Run `config.workers` workers until SIGTERM/SIGINT; return the exit code for the CLI."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus-client's multiprocess mode shares metrics across the workers; it needs a
        # fresh directory per pod run (the observability module collects from it)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tiergate-prom-")
    ctx = multiprocessing.get_context("spawn")
    first_backoff = max(0.0, config.worker_restart_backoff)
    max_backoff = max(first_backoff, config.worker_restart_backoff_max)
    slots = [_Slot(backoff=first_backoff) for _ in range(config.workers)]
    stopping = False

    def start(number: int, slot: _Slot) -> None:
        slot.listening = ctx.Event()
        slot.proc = ctx.Process(target=_worker_main, args=(config, slot.listening),
                                name=f"tiergate-worker-{number}", daemon=False)
        slot.proc.start()
        slot.started = time.monotonic()
        slot.restart_at = None

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for slot in slots:
            slot.restart_at = None
            if slot.proc is not None and slot.proc.is_alive() and slot.proc.pid is not None:
                os.kill(slot.proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    exit_code = 0
    try:
        for number, slot in enumerate(slots):
            start(number, slot)
        log.info("tiergate: %d workers on http://%s:%s (pids %s)", config.workers, config.host, config.port,
                 ", ".join(str(s.proc.pid) for s in slots if s.proc is not None))
        while True:
            now = time.monotonic()
            for number, slot in enumerate(slots):
                if slot.restart_at is not None and slot.restart_at <= now and not stopping:
                    start(number, slot)
                    log.info("tiergate: worker %d restarted (pid %s)", number, slot.proc.pid)  # type: ignore[union-attr]
            running = {s.proc.sentinel: s for s in slots if s.proc is not None}
            due = [s.restart_at for s in slots if s.restart_at is not None]
            if not running and not due:
                break
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            for sentinel in multiprocessing.connection.wait(list(running), timeout):
                slot = running[sentinel]  # type: ignore[index]
                proc, slot.proc = slot.proc, None
                assert proc is not None
                proc.join()
                code = proc.exitcode or 0
                if stopping:
                    exit_code = exit_code or (code if code > 0 else 0)
                    continue
                ran = time.monotonic() - slot.started
                slot.ever_listened = slot.ever_listened or slot.listening.is_set()
                if not slot.ever_listened:
                    log.error("tiergate: worker %s failed at start-up (exit %s); stopping", proc.pid, code)
                    exit_code = code if code > 0 else 1
                    forward(signal.SIGTERM, None)
                    continue
                if ran >= max_backoff:  # it had been serving a good while: this death is a fresh one
                    slot.backoff = first_backoff
                delay, slot.backoff = slot.backoff, min(max_backoff, max(slot.backoff * 2, 0.05))
                slot.restart_at = time.monotonic() + delay
                log.warning("tiergate: worker %s exited (%s) after %.1f s; restarting it in %.1f s",
                            proc.pid, code, ran, delay)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for slot in slots:  # only on an unexpected error in the loop above
            if slot.proc is not None:
                slot.proc.terminate()
    return exit_code
