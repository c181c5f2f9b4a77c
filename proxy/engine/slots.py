"""Per-provider caps on concurrent upstream requests, each with a bounded wait queue.

A provider's cap is its `max_concurrency` in the table, else `max_concurrent_per_provider`, and never
more than its connection pool: a request waits for a slot here, in tiergate's own queue, not inside
aiohttp's connector, so that waiting is never mistaken for a slow provider (no breaker failure, no
connect budget spent). At most `max_queue_per_provider` callers wait, each within its own deadline;
one more is refused at once with a 429 and `Retry-After`. A slot is held until the upstream
response is released or closed (for a stream: its end).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from ..settings import RouterConfig
from ..types import RateLimitError


class Capped(Protocol):
    """What the slots need of a provider (`providers.Provider`): its name, its cap, and where to keep
    its slots. A protocol, so that this module does not import back the one that holds the slots."""

    name: str
    capacity: int
    slots: ProviderSlots | None


class Held(Protocol):
    """The upstream response a slot is held for (`providers.UpstreamResponse` is one)."""

    status: int
    headers: Mapping[str, str]
    content: Any

    async def read(self) -> bytes: ...
    def release(self) -> Any: ...
    def close(self) -> None: ...


R = TypeVar("R", bound=Held)


class ProviderSlots:
    """A counting semaphore with a bounded FIFO of waiters."""

    __slots__ = ("name", "capacity", "max_queue", "active", "_waiters")

    def __init__(self, name: str, capacity: int, max_queue: int):
        self.name = name
        self.capacity = capacity
        self.max_queue = max_queue
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def take(self) -> bool:
        """Take a free slot without waiting (the usual case, no coroutine); False when `acquire` must queue."""
        if self.active < self.capacity and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self, timeout: float | None = None) -> None:
        """Take a slot, waiting at most `timeout` seconds (TimeoutError past it)."""
        if self.take():
            return
        if len(self._waiters) >= self.max_queue:
            raise RateLimitError(
                f"provider {self.name} is at its limit of {self.capacity} concurrent requests and "
                f"{self.max_queue} queued; retry shortly", retry_after=1.0)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter  # the releaser counted us in `active` before waking us
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # woken and cancelled at once: hand the slot on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next waiter
                return
        self.active -= 1


class _SlotResponse:
    """The upstream response, releasing its slot (once) when dispatch releases or closes it."""

    __slots__ = ("_resp", "_slots", "status", "headers", "content")

    def __init__(self, resp: Held, slots: ProviderSlots):
        self._resp = resp
        self._slots: ProviderSlots | None = slots
        self.status = resp.status
        self.headers = resp.headers
        self.content = resp.content

    async def read(self) -> bytes:
        return await self._resp.read()

    def _free(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None

    def release(self) -> Any:
        self._free()
        return self._resp.release()

    def close(self) -> None:
        self._free()
        self._resp.close()

    def __del__(self) -> None:  # a response dropped without release/close must not leak the slot
        self._free()


class ProviderLimits:
    """The slots of every provider, created on first use from the provider's spec."""

    def __init__(self, config: RouterConfig):
        self._max_queue = max(0, config.max_queue_per_provider)
        self._slots: dict[str, ProviderSlots] = {}

    def slots(self, provider: Capped) -> ProviderSlots | None:
        """The provider's slots, shared with the provider it replaced while the capacity is the same;
        kept on the provider too, where the attempt loop finds them without a call."""
        cap = provider.capacity
        if cap <= 0:
            return None
        slots = self._slots.get(provider.name)
        if slots is None or slots.capacity != cap:
            slots = self._slots[provider.name] = ProviderSlots(provider.name, cap, self._max_queue)
        provider.slots = slots
        return slots

    @staticmethod
    def hold(resp: R, slots: ProviderSlots) -> R:
        """The response, releasing its slot when dispatch releases or closes it."""
        return _SlotResponse(resp, slots)  # type: ignore[return-value]

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: {"capacity": s.capacity, "active": s.active, "queued": s.queued}
                for name, s in self._slots.items()}
