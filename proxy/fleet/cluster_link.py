"""The fleet's link to a Redis Cluster, and `open_link`: the link for what `TIERGATE_REDIS_URL` names.

`ClusterLink` has `RedisLink`'s surface (commands sent with the next batch, each batch bounded by
`redis_timeout`, Redis left alone for a second after a failure, `FleetUnavailable` on failure) but
sends through redis-py's `RedisCluster`: a batch is one cluster pipeline, which groups the commands
by the node holding their slot and follows MOVED/ASK redirections and failovers. A slot whose master
has failed is, until its replica is promoted, an outage like a single Redis's: the caller's policy
(the limits' fail_open / fail_closed) decides. The scripts' keys share a slot by their hash tags.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..limits.spec import FleetUnavailable
from ..types import cancel_and_wait
from .connect import redis_client, redis_target
from .state import MAX_CONNECTIONS, RETRY_INTERVAL, SCRIPTS, LinkState, RedisLink

log = logging.getLogger("tiergate.fleet")

TOPOLOGY_TIMEOUT_S = 5.0
_ERRORS = (RedisError, OSError, TimeoutError, EOFError, ValueError)
_Command = tuple[tuple[Any, ...], "asyncio.Future[Any] | None"]


def open_link(url: str, *, timeout: float) -> RedisLink | ClusterLink:
    """The fleet's link for `url`: `ClusterLink` for `redis+cluster://`, else `RedisLink` (one server,
    or the primary a Sentinel names)."""
    if redis_target(url).kind == "cluster":
        return ClusterLink(url, timeout=timeout)
    return RedisLink(url, timeout=timeout)


class ClusterLink(LinkState):
    """Batched, deadline-bounded commands on a Redis Cluster (see the module's docstring)."""

    label = "redis cluster"

    def __init__(self, url: str, *, timeout: float, retry_interval: float = RETRY_INTERVAL,
                 max_batches: int = MAX_CONNECTIONS, clock: Callable[[], float] = time.monotonic):
        super().__init__(url, timeout=timeout, retry_interval=retry_interval, clock=clock)
        self._cluster = redis_client(url, timeout=timeout, socket_timeout=None)
        self._max = max_batches
        self._ready = False  # the cluster's topology has been read once
        self._inflight = 0
        self._pending: list[_Command] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def client(self) -> RedisCluster:
        """A client of its own (pub/sub, admin commands): not for the request path."""
        client = redis_client(self.url, timeout=self.timeout, socket_timeout=None)
        assert isinstance(client, RedisCluster)
        return client

    # -- commands (RedisLink's surface; a "packed" command is its arguments) ---------------------------

    def pack(self, *args: Any) -> tuple[Any, ...]:
        return args

    async def call(self, *args: Any) -> Any:
        return await self.call_packed(args)

    async def call_packed(self, packed: tuple[Any, ...]) -> Any:
        future = self.submit(packed)
        if future is None:
            raise FleetUnavailable(self.last_error or "redis unavailable")
        return await future

    def submit(self, packed: tuple[Any, ...]) -> asyncio.Future[Any] | None:
        if self.clock() < self.down_until:
            return None
        future = asyncio.get_running_loop().create_future()
        self._enqueue(packed, future)
        return future

    def send(self, *args: Any) -> None:
        if self.clock() >= self.down_until:
            self._enqueue(args, None)

    def _enqueue(self, packed: tuple[Any, ...], future: asyncio.Future[Any] | None) -> None:
        self._pending.append((packed, future))
        if not self._scheduled and self._inflight < self._max:
            self._kick()

    async def _run(self) -> None:
        """Runs after the rest of this turn of the event loop: takes every command queued meanwhile."""
        self._scheduled = False
        batch, self._pending = self._pending, []
        try:
            if batch and self.clock() < self.down_until:
                self._fail(batch, FleetUnavailable(self.last_error or "redis unavailable"))
            elif batch:
                await self._send_batch(batch)
        finally:
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._kick()

    def _kick(self) -> None:
        self._scheduled = True
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_batch(self, batch: list[_Command]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            if not self._ready:
                # the first topology (slots, nodes, commands' metadata) takes longer than a batch's deadline
                # on a busy machine; later refreshes after a failover run within the batches' own
                async with asyncio.timeout(max(self.timeout, TOPOLOGY_TIMEOUT_S)):
                    await self._cluster.initialize()
                self._ready = True
            async with asyncio.timeout(self.timeout):
                replies = await self._exchange([packed for packed, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                if future is not None and not future.done():
                    future.cancel()
            raise
        except _ERRORS as exc:
            self._failed(exc)
            self._fail(batch, FleetUnavailable(self.last_error or "redis failed"))
            return
        self._deliver(batch, replies)

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One cluster pipeline; a script a node has not seen yet (a new or promoted master) is sent
        again in full with EVAL, which also caches it there."""
        replies = await self._pipeline(commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            again = [("EVAL", SCRIPTS[commands[i][1]], *commands[i][2:]) for i in missing]
            for i, reply in zip(missing, await self._pipeline(again), strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self._cluster.pipeline()
        for args in commands:
            pipe.execute_command(*args)
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies:  # a node unreachable: an outage, not one command's error
            if isinstance(reply, BaseException) and not isinstance(reply, ResponseError):
                raise reply
        return list(replies)

    async def close(self) -> None:
        for task in list(self._tasks):
            await cancel_and_wait(task)
        await self._cluster.aclose()
