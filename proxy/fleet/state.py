"""State the whole fleet of tiergates shares through Redis: limit counters and provider health.

Every Redis call tiergate makes for the fleet goes through `RedisLink`: commands issued in the
same turn of the event loop are pipelined together on one connection (one write, one round trip),
every batch is bounded by `redis_timeout`, and after a failure Redis is left alone for a second
so requests do not each wait for a timeout. A failure raises `FleetUnavailable`; what happens then
is the caller's policy. Counters are changed only by Lua scripts (atomic in Redis, sent by SHA,
re-sent in full when a restarted Redis has forgotten them), and the time they count by is Redis's
own (`TIME`), so pods with skewed clocks still share one window.

Keys live under `<namespace>:{limits}:` and `<namespace>:{health}:` (the braces keep each group in
one Redis Cluster slot, which multi-key scripts need).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..limits.counters import Admission
from ..limits.spec import Check, FleetUnavailable
from ..types import cancel_and_wait
from .connect import link_pool, redis_client, redis_target

log = logging.getLogger("tiergate.fleet")

RETRY_INTERVAL = 1.0  # seconds Redis is left alone after a failure
MAX_CONNECTIONS = 8  # batches in flight at once; more commands wait for the next batch
HEARTBEAT_S = 5.0  # how often a pod says it is alive (fleet size) and refreshes its view of the limits
POD_TTL_S = 15.0  # a pod not heard from for this long no longer counts in the fleet size
_INF = 1e300  # "no cap" in a script (Lua's tonumber does not read "inf")
_PACKED_LIMIT = 4096  # admission commands kept packed (token amounts vary: they come and go)
_ERRORS = (RedisError, OSError, TimeoutError, EOFError, ValueError)
# Admission ahead of Redis (see `FleetLimits.admit_ahead`): the share of a cap near which every
# admission waits for Redis, how old Redis's last report of a counter may be, and over how long the
# fleet's rate of adding to a counter is measured
SYNC_WITHIN = 0.1
FRESH_S = 1.0
RATE_WINDOW_S = 1.0
# the charges of requests admitted ahead are summed and sent this often (one command per set of
# counters), not one by one: a request pays no Redis work of its own, the fleet learns them within it
AHEAD_FLUSH_S = 0.005

# the UTC calendar in Lua (Howard Hinnant's civil-from-days), computed only for a budget: the day
# number, the month id (year * 12 + month - 1) and the epoch second the next month begins
_CALENDAR = """
local function calendar(sec)
  local day = math.floor(sec / 86400)
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local month = y * 12 + m - 1
  local ny = math.floor((month + 1) / 12)
  local nm = (month + 1) % 12 + 1
  local yy = nm <= 2 and ny - 1 or ny
  local era2 = math.floor(yy / 400)
  local yoe2 = yy - era2 * 400
  local mm = nm > 2 and nm - 3 or nm + 9
  local doe2 = yoe2 * 365 + math.floor(yoe2 / 4) - math.floor(yoe2 / 100) + math.floor((153 * mm + 2) / 5)
  return day, month, (era2 * 146097 + doe2 - 719468) * 86400
end
"""

# A sliding minute is a hash: one field per second holding what was charged in it, `t` their total
# and `o` the oldest second not yet dropped. Each call drops the seconds that have left the window
# (amortised: a second is dropped once), so a check reads two fields, not sixty. Every call moves
# `o` to within a minute of its own second, so the seconds held are never older than `o`.
_MINUTE = """
local function minute(key, sec, write)
  local f = redis.call('HMGET', key, 't', 'o')
  local total, oldest = tonumber(f[1] or '0'), tonumber(f[2] or sec)
  if oldest < sec - 120 then  -- quiet for over a minute: every second held is older than the window
    redis.call('DEL', key)
    return 0, sec
  end
  if oldest <= sec - 60 then
    for b = oldest, sec - 60 do
      local v = redis.call('HGET', key, b)
      if v then total = total - tonumber(v); redis.call('HDEL', key, b) end
    end
    if total < 0 then total = 0 end
    oldest = sec - 59
    if write then redis.call('HSET', key, 't', total, 'o', oldest) end
  end
  return total, oldest
end
"""

# KEYS: the counters. ARGV[1]: 'a' (admit: check every counter, charge all or none), 'c' (charge
# without a check: a request this pod admitted ahead, far from every cap) or 'r' (read).
# Then per counter: window (w: sliding minute, d: UTC day, m: UTC month), cap, amount. A per-minute
# counter admits what fits under its cap; a budget admits while it is not used up. Returns
# "failed-index-or-0 retry-after-ms second day month used...", one string: a client parses one
# bulk reply much faster than an array of them.
ADMIT = _CALENDAR + _MINUTE + """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec + tonumber(t[2]) / 1000000
local mode = ARGV[1]
local day, month, next_month = 0, 0, 0
local n = #KEYS
local used, oldest = {}, {}
for i = 1, n do
  local w, cap, amount = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local u, retry = 0, 1
  if w == 'w' then
    u, oldest[i] = minute(KEYS[i], sec, true)
  else
    if day == 0 then day, month, next_month = calendar(sec) end
    if w == 'd' then
      u = tonumber(redis.call('GET', KEYS[i] .. ':d' .. day) or '0')
      retry = (day + 1) * 86400 - now
    else
      u = tonumber(redis.call('GET', KEYS[i] .. ':m' .. month) or '0')
      retry = next_month - now
    end
  end
  if mode == 'a' and (u >= cap or (w == 'w' and u + amount > cap)) then
    if w == 'w' then  -- when enough of the minute will have aged out
      local excess, freed = u + amount - cap, 0
      retry = 60
      for b = oldest[i], sec do
        freed = freed + tonumber(redis.call('HGET', KEYS[i], b) or '0')
        if freed >= excess then retry = b + 60 - now; break end
      end
    end
    local out = {i, math.ceil(retry * 1000), sec, day, month}
    for j = 1, #used do out[#out + 1] = used[j] end
    out[#out + 1] = tostring(u)
    return table.concat(out, ' ')
  end
  used[i] = tostring(mode == 'r' and u or u + amount)
end
if mode ~= 'r' then
  for i = 1, n do
    local w, amount = ARGV[3 * i - 1], ARGV[3 * i + 1]
    if w == 'w' then
      redis.call('HINCRBYFLOAT', KEYS[i], sec, amount)
      redis.call('HINCRBYFLOAT', KEYS[i], 't', amount)
      redis.call('HSETNX', KEYS[i], 'o', oldest[i])
      redis.call('EXPIRE', KEYS[i], 61)
    elseif w == 'd' then
      local k = KEYS[i] .. ':d' .. day
      redis.call('INCRBYFLOAT', k, amount)
      redis.call('EXPIRE', k, 2 * 86400)
    else
      local k = KEYS[i] .. ':m' .. month
      redis.call('INCRBYFLOAT', k, amount)
      redis.call('EXPIREAT', k, next_month + 86400)
    end
  end
end
local out = {0, 0, sec, day, month}
for j = 1, n do out[#out + 1] = used[j] end
return table.concat(out, ' ')
"""

# KEYS: counters charged by one admission. ARGV: its second, day, month, then per counter window
# and the correction (real use minus estimate). A second or period that has gone is left gone.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1])
local sec, day, month = ARGV[1], ARGV[2], ARGV[3]
for i = 1, #KEYS do
  local w, delta = ARGV[2 * i + 2], ARGV[2 * i + 3]
  if w == 'w' then
    if tonumber(sec) > now - 60 and redis.call('HEXISTS', KEYS[i], sec) == 1 then
      redis.call('HINCRBYFLOAT', KEYS[i], sec, delta)
      redis.call('HINCRBYFLOAT', KEYS[i], 't', delta)
    end
  else
    local k = KEYS[i] .. (w == 'd' and ':d' .. day or ':m' .. month)
    if redis.call('EXISTS', k) == 1 then redis.call('INCRBYFLOAT', k, delta) end
  end
end
return 0
"""

# KEYS[1]: the sorted set of pods. ARGV[1]: this pod's id, ARGV[2]: seconds a pod counts after
# its last heartbeat. Returns how many pods count.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 4))
return redis.call('ZCARD', KEYS[1])
"""


def _sha(script: str) -> str:
    import hashlib

    return hashlib.sha1(script.encode()).hexdigest()


SCRIPTS = {_sha(s): s for s in (ADMIT, SETTLE, HEARTBEAT, )}
ADMIT_SHA, SETTLE_SHA, HEARTBEAT_SHA = _sha(ADMIT), _sha(SETTLE), _sha(HEARTBEAT)


_Command = tuple[list[bytes], "asyncio.Future[Any] | None"]  # a packed command, and who waits for its reply


class LinkState:
    """What a link to the fleet's Redis (`RedisLink`, or `ClusterLink` on a Redis Cluster) knows of its
    health: when it failed, why, and how much it sent; `available` again once its retry interval has passed."""

    label = "redis"  # how messages name what the link talks to

    def __init__(self, url: str, *, timeout: float, retry_interval: float, clock: Callable[[], float]):
        self.target = redis_target(url)  # one server, the primary a Sentinel names, or a cluster's seed nodes
        self.url = url
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.clock = clock
        self.down_until = 0.0
        self.errors = 0
        self.last_error: str | None = None
        self.calls = 0
        self.batches = 0

    @property
    def available(self) -> bool:
        return self.clock() >= self.down_until

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        self.last_error = f"{reason} ({self.label} at {self.where()})"
        if self.clock() >= self.down_until:
            log.warning("%s at %s failed (%s); trying again in %ss", self.label, self.where(), reason,
                        self.retry_interval)
        self.down_until = self.clock() + self.retry_interval

    def _answered(self) -> None:
        if self.down_until:
            log.info("%s at %s is reachable again: limits are counted for the fleet", self.label, self.where())
            self.down_until = 0.0

    @staticmethod
    def _fail(batch: list[_Command], error: FleetUnavailable) -> None:
        """Every caller waiting on a batch that did not get through hears why."""
        for _, future in batch:
            if future is not None and not future.done():
                future.set_exception(error)

    def _deliver(self, batch: list[_Command], replies: list[Any]) -> None:
        """A batch's replies to their callers; an error reply fails its own command only."""
        self._answered()
        for (_, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                self.errors += 1
                self.last_error = f"redis error: {reply}"
                if future is None or future.done():
                    log.warning("redis command failed: %s", reply)
                else:
                    future.set_exception(FleetUnavailable(self.last_error))
            elif future is not None and not future.done():
                future.set_result(reply)

    def where(self) -> str:
        """host:port/db (or the sentinels and service, or the seed nodes) for messages: never a password."""
        return self.target.where()

    def stats(self) -> dict[str, Any]:
        return {"configured": True, "available": self.available, "where": self.where(), "errors": self.errors,
                "last_error": self.last_error, "calls": self.calls, "batches": self.batches}


class RedisLink(LinkState):
    """Pipelined, deadline-bounded Redis commands on a few connections of our own."""

    def __init__(self, url: str, *, timeout: float, retry_interval: float = RETRY_INTERVAL,
                 max_connections: int = MAX_CONNECTIONS, clock: Callable[[], float] = time.monotonic):
        super().__init__(url, timeout=timeout, retry_interval=retry_interval, clock=clock)
        # redis-py makes the connections (a Sentinel's asks for the primary at each connect, so a
        # connection dropped after a failover reconnects to the new one); its pool's own
        # acquire/release (locks, health checks) is left out: batches take a connection directly
        self._pool = link_pool(self.target, timeout=timeout)
        self._packer = self._pool.make_connection()  # packs commands; never connected
        self._idle: list[AbstractConnection] = []
        self._open = 0
        self._inflight = 0  # exchanges under way
        self._max = max_connections
        self._pending: list[_Command] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def client(self) -> Redis | RedisCluster:
        """A redis-py client on the same URL (pub/sub, admin commands): not for the request path."""
        return redis_client(self.url, timeout=self.timeout, socket_timeout=None)

    # -- commands -----------------------------------------------------------------------------------

    def pack(self, *args: Any) -> list[bytes]:
        """A command in Redis's protocol (to send, or to keep and send again: see `call_packed`)."""
        return self._packer.pack_command(*args)

    async def call(self, *args: Any) -> Any:
        """Send one command with the next batch and wait for its reply (FleetUnavailable on failure)."""
        return await self.call_packed(self._packer.pack_command(*args))

    async def call_packed(self, packed: list[bytes]) -> Any:
        if self.clock() < self.down_until:
            raise FleetUnavailable(self.last_error or "redis unavailable")
        if not self._inflight and not self._pending and self._idle:
            return await self._call_now(packed)  # nothing else under way: no batch to wait for
        future = asyncio.get_running_loop().create_future()
        self._enqueue(packed, future)
        return await future

    async def _call_now(self, packed: list[bytes]) -> Any:
        """One command on an idle connection, in the caller's own task (a quiet sidecar's path: no
        task and no extra turn of the loop). Commands issued meanwhile gather into a batch."""
        conn = self._idle.pop()
        self._inflight += 1
        self.batches += 1
        self.calls += 1
        try:
            async with asyncio.timeout(self.timeout):
                (reply,) = await self._exchange_all(conn, [packed])
        except asyncio.CancelledError:
            await conn.disconnect(nowait=True)
            raise
        except _ERRORS as exc:
            await conn.disconnect(nowait=True)  # the reply may still be on its way: never reuse it
            self._failed(exc)
            raise FleetUnavailable(self.last_error or "redis failed") from None
        finally:
            self._inflight -= 1
            self._idle.append(conn)
            if self._pending and not self._scheduled:
                self._kick()
        self._answered()
        if isinstance(reply, ResponseError):
            self.errors += 1
            self.last_error = f"redis error: {reply}"
            raise FleetUnavailable(self.last_error)
        return reply

    def submit(self, packed: list[bytes]) -> asyncio.Future[Any] | None:
        """Send one command with the next batch without waiting: its reply, or FleetUnavailable, comes
        in the future returned (None while Redis is being left alone after a failure)."""
        if self.clock() < self.down_until:
            return None
        future = asyncio.get_running_loop().create_future()
        self._enqueue(packed, future)
        return future

    def send(self, *args: Any) -> None:
        """Send one command with the next batch; nobody waits for the reply (settling charges)."""
        if self.clock() >= self.down_until:
            self._enqueue(self._packer.pack_command(*args), None)

    def _enqueue(self, packed: list[bytes], future: asyncio.Future[Any] | None) -> None:
        self._pending.append((packed, future))
        if not self._scheduled:
            self._kick()

    def _kick(self) -> None:
        """Start a batch on a free connection. The task first runs after the rest of this turn of the
        event loop, so it takes every command the turn's requests have added meanwhile."""
        if self._idle:
            conn = self._idle.pop()
        elif self._open < self._max:
            conn = self._pool.make_connection()
            self._open += 1
        else:
            return  # every connection is busy: the first to finish sends what has gathered
        self._scheduled = True
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._run(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: AbstractConnection) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        try:
            if batch and self.clock() < self.down_until:  # queued before Redis failed: do not wait again
                error = FleetUnavailable(self.last_error or "redis unavailable")
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(error)
                batch = []
            if batch:
                await self._send_batch(conn, batch)
        finally:
            self._inflight -= 1
            self._idle.append(conn)
            if self._pending and not self._scheduled:
                self._kick()

    async def _send_batch(self, conn: AbstractConnection, batch: list[_Command]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self._exchange_all(conn, [packed for packed, _ in batch])
        except asyncio.CancelledError:
            await conn.disconnect(nowait=True)
            for _, future in batch:
                if future is not None and not future.done():
                    future.cancel()
            raise
        except _ERRORS as exc:
            await conn.disconnect(nowait=True)  # replies may still be on their way: never reuse it
            self._failed(exc)
            self._fail(batch, FleetUnavailable(self.last_error or "redis failed"))
            return
        self._deliver(batch, replies)

    async def _exchange_all(self, conn: AbstractConnection, commands: list[list[bytes]]) -> list[Any]:
        """Send `commands`, read their replies; a restarted Redis that forgot the scripts gets them
        loaded and those commands sent again."""
        replies = await self._exchange(conn, commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self._exchange(conn, [self._packer.pack_command("SCRIPT", "LOAD", script)
                                        for script in SCRIPTS.values()])
            again = await self._exchange(conn, [commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    @staticmethod
    async def _exchange(conn: AbstractConnection, commands: list[list[bytes]]) -> list[Any]:
        if not conn.is_connected:
            await conn.connect()
        # one buffer, one write: a list would be written piece by piece (a system call each on uvloop)
        await conn.send_packed_command(b"".join([chunk for packed in commands for chunk in packed]),
                                       check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # an error reply, read whole: the connection stays in step
                replies.append(exc)
        return replies

    async def close(self) -> None:
        for task in list(self._tasks):
            await cancel_and_wait(task)
        for conn in self._idle:
            await conn.disconnect(nowait=True)
        self._idle.clear()
        self._open = 0
        await self._pool.disconnect()


class _View:
    """A counter as Redis last reported it, what this pod has charged to it since without waiting,
    and how fast the fleet has been adding to it."""

    __slots__ = ("used", "at", "pending", "rate", "_mark", "_mark_at")

    def __init__(self, now: float, used: float):
        self.used = used
        self.at = now
        self.pending = 0.0
        self.rate: float | None = None  # per second; unknown until a whole window has been seen
        self._mark = used
        self._mark_at = now

    def saw(self, used: float, now: float) -> None:
        self.used = used
        self.at = now
        if now - self._mark_at >= RATE_WINDOW_S:
            # net of what aged out of a sliding minute: an underestimate, which the cap's share covers
            self.rate = max(0.0, used - self._mark) / (now - self._mark_at)
            self._mark, self._mark_at = used, now

    def room(self, amount: float, cap: float, now: float, within: float, pods: int) -> float | None:
        """The use after this request if it may be admitted without waiting for Redis, else None.

        Set aside `within` of the cap and twice what the fleet could have added at its recent rate
        since Redis's report; what is left is shared among the pods, which may all be admitting
        ahead at once. What this pod has admitted ahead and Redis has not yet confirmed must stay
        within its share, so the pods together never charge past the cap without Redis's check."""
        age = now - self.at
        if self.rate is None or age > FRESH_S:
            return None
        pending = self.pending + amount
        if pending > (cap * (1.0 - within) - self.used - 2.0 * self.rate * age) / pods:
            return None
        return self.used + pending


class _Charge:
    """The summed charges of requests admitted ahead, sent together; `answer` gets where they went."""

    __slots__ = ("amounts", "answer")

    def __init__(self, amounts: list[float], answer: asyncio.Future[Any]):
        self.amounts = amounts
        self.answer = answer


class FleetLimits:
    """The limit counters in Redis (a `limits.counters.Backend`), and the fleet's size for the fail_open share."""

    def __init__(self, link: RedisLink, namespace: str, *, pod_id: str | None = None,
                 sync_within: float = SYNC_WITHIN):
        self.link = link
        self.prefix = f"{namespace}:{{limits}}:"
        self.pods_key = self.prefix + "pods"
        self.pod_id = pod_id or f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self.fleet_size = 1
        self.sync_within = sync_within
        self.ahead = 0  # requests admitted ahead of Redis's answer
        self._views: dict[str, _View] = {}
        self._batches: dict[tuple[Check, ...], _Charge] = {}  # charges admitted ahead, not yet sent
        self._flush_at: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._packed: dict[tuple[Any, ...], list[bytes]] = {}

    @property
    def available(self) -> bool:
        return self.link.available

    def admit_ahead(self, checks: tuple[Check, ...], amounts: list[float], caps: list[float]) -> Admission | None:
        """Admit without waiting for Redis when every counter is far from its cap, and charge Redis
        in the background; None when the request must wait for Redis's atomic check instead.

        Redis's last report of every counter must be under a second old and leave room (see
        `_View.room`): near a cap, or without a recent report, every admission is Redis's atomic
        check, which is where exactness matters. The charge still reaches Redis within
        `AHEAD_FLUSH_S`, summed with the others admitted meanwhile, so the counters stay true for
        the fleet; only the wait is skipped. The admission's token is a future of where it went."""
        if self.sync_within >= 1.0:
            return None
        now = self.link.clock()
        views = self._views
        pods = self.fleet_size
        estimate = []
        for check, amount, cap in zip(checks, amounts, caps, strict=True):
            view = views.get(check.key)
            if view is None:
                return None
            used = view.room(amount, cap, now, self.sync_within, pods)
            if used is None:
                return None
            estimate.append(used)
        if not self.link.available:
            return None  # Redis is being left alone after a failure: the caller's policy decides
        batch = self._batches.get(checks)
        if batch is None:
            batch = self._batches[checks] = _Charge([0.0] * len(checks), asyncio.get_running_loop().create_future())
            if self._flush_at is None:
                self._flush_at = asyncio.get_running_loop().call_later(AHEAD_FLUSH_S, self.flush)
        sums = batch.amounts
        for i, (check, amount) in enumerate(zip(checks, amounts, strict=True)):
            views[check.key].pending += amount
            sums[i] += amount
        self.ahead += 1
        return Admission(-1, 0.0, tuple(estimate), batch.answer)

    def flush(self) -> list[asyncio.Future[Any]]:
        """Send the summed charges of the requests admitted ahead since the last flush."""
        self._flush_at = None
        batches, self._batches = self._batches, {}
        sent = []
        for checks, batch in batches.items():
            future = self.link.submit(self._command("c", checks, batch.amounts, [0.0] * len(checks), memo=False))
            if future is None:
                self._charged(None, checks, batch)
            else:
                future.add_done_callback(lambda done, checks=checks, batch=batch: self._charged(done, checks, batch))
                sent.append(future)
        return sent

    def _charged(self, done: asyncio.Future[Any] | None, checks: tuple[Check, ...], batch: _Charge) -> None:
        views = self._views
        for check, amount in zip(checks, batch.amounts, strict=True):
            view = views.get(check.key)
            if view is not None:
                view.pending -= amount
        answer = batch.answer
        if done is None or done.cancelled() or done.exception() is not None:
            # never reached Redis: the link has logged why and admissions wait for it again
            answer.set_exception(FleetUnavailable(self.link.last_error or "redis unavailable"))
            answer.exception()  # nobody need look: settling skips a charge that never landed
            return
        try:
            admission = self._parse(done.result())
        except FleetUnavailable as exc:
            answer.set_exception(exc)
            answer.exception()
            return
        answer.set_result(admission.token)
        self._saw(checks, admission.used)

    async def admit(self, checks: tuple[Check, ...], amounts: list[float], caps: list[float]) -> Admission:
        admission = self._parse(await self.link.call_packed(self._command("a", checks, amounts, caps)))
        self._saw(checks, admission.used)
        return admission

    def _command(self, mode: str, checks: tuple[Check, ...], amounts: list[float], caps: list[float], *,
                 memo: bool = True) -> list[bytes]:
        memo_key = (mode, checks, *caps, *amounts)  # a request limit's command is the same every time
        packed = self._packed.get(memo_key) if memo else None
        if packed is None:
            args: list[Any] = ["EVALSHA", ADMIT_SHA, len(checks)]
            args += [self.prefix + c.key for c in checks]
            args.append(mode)
            for check, cap, amount in zip(checks, caps, amounts, strict=True):
                args += (check.window, cap if math.isfinite(cap) else _INF, amount)
            packed = self.link.pack(*args)
            if memo:
                if len(self._packed) >= _PACKED_LIMIT:
                    self._packed.clear()
                self._packed[memo_key] = packed
        return packed

    def _parse(self, reply: Any) -> Admission:
        try:
            fields = reply.split()
            failed, retry_ms, sec, day, month = map(int, fields[:5])
            return Admission(failed - 1, retry_ms / 1000, tuple(map(float, fields[5:])), (sec, day, month))
        except (AttributeError, TypeError, ValueError):  # not our script's answer: as if Redis failed
            raise FleetUnavailable(f"unexpected reply from redis at {self.link.where()}") from None

    def _saw(self, checks: tuple[Check, ...], used: tuple[float, ...]) -> None:
        now = self.link.clock()
        views = self._views
        for check, value in zip(checks, used, strict=False):  # a refusal reports up to the full counter
            view = views.get(check.key)
            if view is None:
                if len(views) >= _PACKED_LIMIT:
                    views.clear()
                view = views[check.key] = _View(now, value)
            view.saw(value, now)

    def settle(self, checks: tuple[Check, ...], deltas: list[float], token: Any) -> None:
        if isinstance(token, asyncio.Future):  # admitted ahead: the charge's own answer has where it went
            if not token.done():
                token.add_done_callback(lambda done: self.settle(checks, deltas, done))
                return
            if token.cancelled() or token.exception() is not None:
                return  # the charge never reached Redis: there is nothing to correct
            token = token.result()
        sec, day, month = token
        args: list[Any] = ["EVALSHA", SETTLE_SHA, len(checks)]
        args += [self.prefix + c.key for c in checks]
        args += (sec, day, month)
        for check, delta in zip(checks, deltas, strict=True):
            args += (check.window, delta)
        self.link.send(*args)

    async def usage(self, checks: Iterable[Check]) -> dict[str, float]:
        """Each counter's current use (no charge)."""
        checks = tuple(checks)
        if not checks:
            return {}
        args: list[Any] = ["EVALSHA", ADMIT_SHA, len(checks)]
        args += [self.prefix + c.key for c in checks]
        args.append("r")
        for check in checks:
            args += (check.window, 0, 0)
        reply = (await self.link.call(*args)).split()
        return {c.key: float(x) for c, x in zip(checks, reply[5:], strict=True)}

    async def heartbeat(self) -> int:
        size = int(await self.link.call("EVALSHA", HEARTBEAT_SHA, 1, self.pods_key, self.pod_id, POD_TTL_S))
        self.fleet_size = max(1, size)
        return self.fleet_size

    def start(self, refresh: Callable[[], Any] | None = None, interval: float = HEARTBEAT_S,
              active: Callable[[], bool] = lambda: True) -> None:
        """In the background, while `active()` (the table has limits): say this pod is alive (fleet
        size) and call `refresh` every `interval`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._beat(refresh, interval, active),
                                                                name="tiergate-fleet-heartbeat")

    async def _beat(self, refresh: Callable[[], Any] | None, interval: float, active: Callable[[], bool]) -> None:
        while True:
            try:
                if active():
                    await self.heartbeat()
                    if refresh is not None:
                        await refresh()
            except FleetUnavailable:
                pass  # the link logged it; the next beat tries again
            except Exception:  # a bug must not end the heartbeat for the life of the process
                log.exception("fleet heartbeat failed")
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        if self._flush_at is not None:  # charges admitted ahead reach Redis before the pod leaves
            self._flush_at.cancel()
            await asyncio.gather(*self.flush(), return_exceptions=True)  # each bounded by the link's timeout
        await cancel_and_wait(self._task)
        self._task = None
        if self.link.available and self.link.calls:
            try:
                await self.link.call("ZREM", self.pods_key, self.pod_id)
            except FleetUnavailable:
                pass

    def stats(self) -> dict[str, Any]:
        return {**self.link.stats(), "fleet_size": self.fleet_size, "admitted_ahead": self.ahead}


# --- provider health shared by the fleet -----------------------------------------------------------

# KEYS[1]: the deployment's key, KEYS[2]: the index of deployments. ARGV: deployment, state, ms it
# lasts, reason, pod, channel. The key expires when the state ends; every pod hears it at once.
PUBLISH_HEALTH = """
local ms = tonumber(ARGV[3])
local payload = cjson.encode({deployment = ARGV[1], state = ARGV[2], ttl_ms = ms, reason = ARGV[4], by = ARGV[5]})
if ARGV[2] == 'closed' or ms <= 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
else
  redis.call('SET', KEYS[1], payload, 'PX', ms)
  redis.call('SADD', KEYS[2], ARGV[1])
end
redis.call('PUBLISH', ARGV[6], payload)
return 1
"""

# KEYS[1]: the index. ARGV[1]: the key prefix. Returns {value, ms left, ...} of every deployment
# still open or cooling down (and forgets the ones whose key has expired).
SYNC_HEALTH = """
local out = {}
for _, d in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local k = ARGV[1] .. d
  local v = redis.call('GET', k)
  if v then
    out[#out + 1] = v
    out[#out + 1] = redis.call('PTTL', k)
  else
    redis.call('SREM', KEYS[1], d)
  end
end
return out
"""

SCRIPTS.update({_sha(PUBLISH_HEALTH): PUBLISH_HEALTH, _sha(SYNC_HEALTH): SYNC_HEALTH})
PUBLISH_HEALTH_SHA, SYNC_HEALTH_SHA = _sha(PUBLISH_HEALTH), _sha(SYNC_HEALTH)
HEALTH_RESYNC_S = 5.0  # a full read of the shared state this often, besides every (re)subscription


class FleetHealth:
    """Deployments (`provider/model`) that some tiergate found failing: open breakers and rate-limit
    cooldowns, shared through Redis so the whole fleet skips them.

    `publish` writes a key that expires when the state ends and announces it on a channel; every
    pod keeps what it heard in a dict, so `blocked_until` (the breaker's hot-path question) makes no
    network call. A pod that (re)subscribes reads the whole state first, so nothing missed while
    disconnected is lost, and again every `resync` seconds. `claim_trial` lets exactly one pod make
    a half-open trial. Times travel as milliseconds left, not as clock readings: pods' clocks
    may disagree. Redis down: publishing is skipped, what was heard stays until it expires.
    """

    def __init__(self, link: RedisLink, namespace: str, *, pod_id: str | None = None,
                 resync: float = HEALTH_RESYNC_S, clock: Callable[[], float] = time.monotonic):
        self.link = link
        self.prefix = f"{namespace}:{{health}}:"
        self.index_key = self.prefix + "index"
        self.channel = f"{namespace}:health"
        self.pod_id = pod_id or f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self.resync = resync
        self.clock = clock
        self._blocked: dict[str, tuple[str, float, str]] = {}  # deployment -> (state, until, by)
        self._trial_due: set[str] = set()  # blocked by the fleet until now: one pod should try it first
        self._task: asyncio.Task[None] | None = None
        self.subscribed = False
        self.heard = 0

    # -- the hot path ------------------------------------------------------------------------------

    def blocked_until(self, deployment: str) -> float | None:
        """When (on `clock`) the fleet's open breaker or cooldown of `deployment` ends; None: not blocked."""
        entry = self._blocked.get(deployment)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            del self._blocked[deployment]
            if entry[0] == "open":
                self._trial_due.add(deployment)
            return None
        return entry[1]

    def trial_due(self, deployment: str) -> bool:
        """The fleet's open breaker of `deployment` has just run out: before sending to it, `claim_trial`
        (so one pod makes the half-open trial, not all). No network call."""
        return deployment in self._trial_due

    def state(self, deployment: str) -> str | None:
        """`open` or `cooldown` while blocked (as published), else None."""
        return self._blocked[deployment][0] if self.blocked_until(deployment) is not None else None

    # -- telling the fleet ---------------------------------------------------------------------------

    def publish(self, deployment: str, state: str, seconds: float, reason: str = "") -> None:
        """This pod opened `deployment`'s breaker (`open`) or got a 429 (`cooldown`) for `seconds`;
        `closed` (or 0 s) clears it. Sent with the next batch; nobody waits."""
        ms = max(0, int(seconds * 1000))
        self._heard(deployment, state, ms, self.pod_id)  # this pod knows at once
        self.link.send("EVALSHA", PUBLISH_HEALTH_SHA, 2, self.prefix + deployment, self.index_key,
                       deployment, state, ms, reason, self.pod_id, self.channel)

    async def claim_trial(self, deployment: str, seconds: float) -> bool:
        """True for exactly one pod of the fleet per `seconds`: that pod makes the half-open trial and
        publishes its outcome (`closed`, or `open` again). The others hold the deployment blocked
        (state `trial`) for `seconds` or until they hear the outcome. Redis unreachable: True (each
        pod decides alone, as without Redis)."""
        self._trial_due.discard(deployment)
        ms = max(1, int(seconds * 1000))
        try:
            reply = await self.link.call("SET", self.prefix + "trial:" + deployment, self.pod_id, "NX", "PX", ms)
        except FleetUnavailable:
            return True
        if reply is None:
            self._heard(deployment, "trial", ms, "")
            return False
        return True

    # -- hearing the fleet ---------------------------------------------------------------------------

    def _heard(self, deployment: str, state: str, ms: int, by: str) -> None:
        if state == "closed" or ms <= 0:
            self._blocked.pop(deployment, None)
            self._trial_due.discard(deployment)
        else:
            self._blocked[deployment] = (state, self.clock() + ms / 1000, by)

    def _on_message(self, data: bytes | str) -> None:
        try:
            message = orjson.loads(data)
            self._heard(str(message["deployment"]), str(message["state"]), int(message["ttl_ms"]),
                        str(message.get("by") or ""))
            self.heard += 1
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("fleet health: ignoring a malformed message on %s", self.channel)

    async def sync(self) -> None:
        """Replace what this pod knows with the fleet's current state (FleetUnavailable on failure)."""
        reply = await self.link.call("EVALSHA", SYNC_HEALTH_SHA, 1, self.index_key, self.prefix)
        fresh: dict[str, tuple[str, float, str]] = {}
        now = self.clock()
        for value, ms in zip(reply[::2], reply[1::2], strict=True):
            message = orjson.loads(value)
            if int(ms) > 0:
                fresh[message["deployment"]] = (message["state"], now + int(ms) / 1000, message.get("by") or "")
        self._blocked = fresh

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="tiergate-fleet-health")

    async def _listen(self) -> None:
        backoff = 0.05
        while True:
            client = self.link.client()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(max(self.link.timeout, 1.0)):
                    await pubsub.subscribe(self.channel)
                await self.sync()  # after subscribing: nothing published in between is missed
                self.subscribed = True
                backoff = 0.05
                synced = self.clock()
                while True:
                    message = await pubsub.get_message(timeout=min(1.0, self.resync))
                    if message is not None and message.get("type") == "message":
                        self._on_message(message["data"])
                    if self.clock() - synced >= self.resync:
                        await self.sync()
                        synced = self.clock()
            except asyncio.CancelledError:
                raise
            except (*_ERRORS, FleetUnavailable) as exc:
                if self.subscribed:
                    log.warning("fleet health: lost redis at %s (%s); breakers count for this pod alone "
                                "meanwhile", self.link.where(), type(exc).__name__)
                self.subscribed = False
            finally:
                self.subscribed = False
                with contextlib.suppress(*_ERRORS):
                    await pubsub.aclose()
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def snapshot(self) -> dict[str, Any]:
        """`/health/details`: what the fleet has blocked, as this pod knows it."""
        now = self.clock()
        return {"subscribed": self.subscribed, "heard": self.heard,
                "blocked": {d: {"state": s, "remaining_s": round(u - now, 3), "by": b}
                            for d, (s, u, b) in list(self._blocked.items()) if u > now}}
