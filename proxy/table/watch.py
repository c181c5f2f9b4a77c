"""The table file and the inbound keys file, watched: a change is loaded, validated and swapped in
whole; a bad file keeps what is running and says why (the log, `/health/details`, `/metrics`).

The file's stat is polled (no new dependency, and inotify misses Kubernetes' ConfigMap updates,
which swap a `..data` symlink): the resolved path, inode, size and modification time, so a
symlink swap, an editor's write-and-rename and an in-place write are each seen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..settings import read_keys_file
from ..types import ConfigError, cancel_and_wait
from ..urls import redact_credentials

log = logging.getLogger("tiergate.table")

WATCH_INTERVAL_S = 0.5

_Signature = tuple[str, int, int, int, int] | None
T = TypeVar("T")


def file_signature(path: Path) -> _Signature:
    """What changes when the file does: its resolved target, device, inode, size, mtime (ns)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None  # missing for a moment (mid-swap): the next poll sees the new file
    return real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class FileWatch(Generic[T]):
    """Polls `path` every `interval` seconds; on a change, `load(path)` (raising on a bad file: the
    running state stays) then `apply(value)`. `what` names the file in logs and metrics."""

    def __init__(self, path: Path, load: Callable[[Path], T], apply: Callable[[T], Awaitable[None]], *,
                 what: str = "table", interval: float = WATCH_INTERVAL_S):
        self.path = Path(path)
        self.load = load
        self.apply = apply
        self.what = what
        self.interval = interval
        self._seen = file_signature(self.path)
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None
        self.changed_at: float | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name=f"tiergate-{self.what}-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # a bug must not end the watch for the life of the process
                log.exception("watching the %s file %s failed", self.what, self.path)

    async def check(self) -> bool:
        """Reload if the file changed since last seen; True when a new table was swapped in."""
        signature = file_signature(self.path)
        if signature is None or signature == self._seen:
            return False
        self._seen = signature
        self.changed_at = time.time()
        try:
            value = await asyncio.to_thread(self.load, self.path)
        except Exception as exc:  # noqa: BLE001 - any bad file keeps what is running
            return self._rejected(exc)
        try:
            await self.apply(value)
        except ConfigError as exc:  # valid alone, refused beside what runs (e.g. a key that is a provider's)
            return self._rejected(exc)
        self.reloads += 1
        self.last_error = None
        log.info("the %s file %s changed: applied", self.what, self.path)
        return True

    def _rejected(self, exc: Exception) -> bool:
        self.failures += 1
        text = str(exc)
        self.last_error = redact_credentials(text.splitlines()[0]) if text else type(exc).__name__
        log.error("the %s file %s changed but was not applied (what was running stays): %s",
                  self.what, self.path, self.last_error)
        return False

    def health(self) -> dict[str, Any]:
        """`/health/details`: whether the last change was applied, and why not."""
        return {"path": str(self.path), "interval_s": self.interval, "reloads": self.reloads,
                "failures": self.failures, "last_change_applied": self.last_error is None,
                "last_error": self.last_error}


def keys_file_watch(api_keys: tuple[str, ...], env: Mapping[str, str],
                    apply: Callable[[tuple[str, ...]], Awaitable[None]], *,
                    interval: float = WATCH_INTERVAL_S) -> FileWatch[tuple[str, ...]] | None:
    """A watch of `TIERGATE_API_KEYS_FILE` whose `apply` gets every inbound key: the ones configured
    elsewhere (`TIERGATE_API_KEYS`) followed by the file's. None when no such file is in use (or the
    keys were given some other way, which the file then does not change). A file left without any key
    is refused: it would turn authentication off, which an emptied or half-written file must not do."""
    name = env.get("TIERGATE_API_KEYS_FILE")
    if not name:
        return None
    path = Path(name)
    try:
        first = read_keys_file(path)
    except ConfigError:
        return None
    if not first or api_keys[len(api_keys) - len(first):] != first:
        return None
    base = api_keys[:len(api_keys) - len(first)]

    def load(path: Path) -> tuple[str, ...]:
        keys = read_keys_file(path)
        if not keys:
            raise ConfigError(f"TIERGATE_API_KEYS_FILE: {path} holds no key (authentication stays as it was)")
        return base + keys

    return FileWatch(path, load, apply, what="keys", interval=interval)


class FileWatchCollector:
    """`/metrics`: `tiergate_config_reloads_total{file, result}` (applied, rejected), computed when scraped."""

    def __init__(self, watches: Callable[[], Iterable[FileWatch[Any]]]):
        self.watches = watches

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        reloads = CounterMetricFamily("tiergate_config_reloads", "Changes of a watched file (table, keys), "
                                      "applied or rejected as invalid", labels=["file", "result"])
        bad = GaugeMetricFamily("tiergate_config_file_invalid", "1 while the watched file on disk is invalid "
                                "and the previous version is still in use", labels=["file"])
        for watch in self.watches():
            reloads.add_metric([watch.what, "applied"], watch.reloads)
            reloads.add_metric([watch.what, "rejected"], watch.failures)
            bad.add_metric([watch.what], 0 if watch.last_error is None else 1)
        yield reloads
        yield bad
