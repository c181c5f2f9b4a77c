"""One attempt at one candidate, as an object with a lifetime.

`async with AttemptLife(sender, provider, ref, breaker, tally) as attempt:` takes a slot of the provider's
pool (tiergate's own queue, bounded by the request's deadline), and `attempt.send(...)` sends under
the attempt's deadline (one timer for all attempts: `Deadlines`). On exit the attempt settles what it
owns according to how it ended: the slot goes back unless a stream's response holds it; the breaker
records a failure (or a cooldown, for a 429), a success, or gives back its half-open trial when the
attempt was cancelled; and the attempt is reported to the loop's subscribers and the request's observer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from ...outcome import Attempt, Result, StreamState
from ...protocol.sse import UsageFilter
from ...types import RateLimitError, UpstreamStatusError
from ..slots import ProviderLimits
from .classify import CONNECTION_ERRORS, ContextTooLong, Retryable, answer, failed, status_failure
from .events import AttemptEvents, CooldownStarted
from .relay import relay, stream_error_event

if TYPE_CHECKING:
    from ...planner.load import DeploymentStats
    from ...settings import RouterConfig
    from ...types import ModelRef
    from ..breaker import AsyncCircuitBreaker
    from ..deadlines import Deadlines
    from ..providers import Provider, UpstreamResponse
    from ..slots import ProviderSlots
    from .hedge import Hedge
    from .tally import Tally

log = logging.getLogger("tiergate")

_SSE_STARTS = (b"data:", b"event:", b":", b"id:", b"retry:")
_ERROR_EVENTS = (b'data: {"error"', b"event: error")  # OpenAI's error event, and typed streams' (Messages)
_INF = float("inf")


class QueueFull(Exception):
    """Every slot of the provider is taken and its queue is full (or the wait would outlast the deadline)."""


class Sender:
    """What every attempt shares: timeouts, the response size cap, the providers' slots, the deadlines
    timer, the cooldown settings and the loop's signals."""

    def __init__(self, config: RouterConfig, deadlines: Deadlines, events: AttemptEvents):
        self.deadlines = deadlines
        self.events = events
        self.limits = ProviderLimits(config)
        self.attempt_timeout = config.attempt_timeout or _INF
        # aiohttp bounds only the connect and, in a stream, the gap between chunks
        self.untimed = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout)
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.stream_idle_timeout)
        self.max_body = config.max_response_bytes
        self.rate_limit_cooldown = config.rate_limit_cooldown
        self.cooldown_cap = config.cooldown_cap
        # the deployments' live load (the planner's `DeploymentLoad.stats`), told of each attempt
        self.load: dict[ModelRef, DeploymentStats] | None = None
        self._logged: set[tuple[str, str]] = set()

    def log_once(self, ref: ModelRef, exc: BaseException) -> None:
        key = (ref.provider, type(exc).__name__)
        if key not in self._logged and len(self._logged) < 256:
            self._logged.add(key)
            log.error("an attempt at %s failed inside tiergate: %s (counted as a failed attempt)",
                      ref.provider, type(exc).__name__)


class AttemptLife:
    """One attempt's lifetime: its pool slot, its deadline, its breaker trial, its report."""

    __slots__ = ("sender", "provider", "ref", "breaker", "tally", "slots", "started", "stream", "load")

    def __init__(self, sender: Sender, provider: Provider, ref: ModelRef, breaker: AsyncCircuitBreaker,
                 tally: Tally):
        self.sender = sender
        self.provider = provider
        self.ref = ref
        self.breaker = breaker
        self.tally = tally
        self.slots: ProviderSlots | None = None
        self.started = time.perf_counter()
        self.stream = False

    async def __aenter__(self) -> AttemptLife:
        """Take a slot of the provider's pool: at once when one is free, else wait in its queue."""
        provider = self.provider
        slots = provider.slots or self.sender.limits.slots(provider)
        if slots is not None and not slots.take():
            budget = self.tally.deadline - time.perf_counter()
            try:
                await slots.acquire(None if budget == _INF else max(0.0, budget))
            except (RateLimitError, TimeoutError):  # tiergate's own queue: not the provider's fault
                self.breaker.release_trial()
                self.tally.skip(self.ref, "queue_full")
                raise QueueFull from None
            except BaseException:
                self.breaker.release_trial()
                raise
        self.slots = slots
        load = self.sender.load
        stats = self.load = load.get(self.ref) if load is not None else None
        if stats is not None:
            stats.outstanding += 1
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Settle the slot, the breaker and the report by how the attempt ended."""
        if self.slots is not None:  # never reached aiohttp's response (or its body is read): hand it back
            self.slots.release()
            self.slots = None
        ref, breaker = self.ref, self.breaker
        now = time.perf_counter()
        latency_ms = (now - self.started) * 1000
        stats = self.load
        if stats is not None:  # a cancelled attempt (the client left, a hedge lost) measured nothing
            stats.ended(latency_ms if exc is None or isinstance(exc, (Retryable, UpstreamStatusError)) else None,
                        exc is None, now)
        if exc is None:
            if not self.stream and not breaker.clean:
                breaker.record_success()  # a stream's relay settles the breaker at its end
            self.tally.note(Attempt(ref.provider, ref.model, "ok", 200, latency_ms))
        elif isinstance(exc, Retryable):
            exc.attempt.latency_ms = latency_ms
            self.tally.note(exc.attempt)
            if exc.attempt.status == 429:  # a rate limit: the deployment answered; cool it down
                sender = self.sender
                cooldown = min(exc.retry_after if exc.retry_after is not None else sender.rate_limit_cooldown,
                               sender.cooldown_cap)
                breaker.cool_down(cooldown)
                sender.events.cooldown_started(CooldownStarted(breaker.name, cooldown, "429"))
            elif isinstance(exc, ContextTooLong):
                breaker.record_success()  # it answered: the prompt was too long for it, not its failure
            else:
                breaker.record_failure(exc.attempt.outcome)
        elif isinstance(exc, UpstreamStatusError):
            breaker.record_success()  # the provider answered; the request was at fault
            self.tally.note(Attempt(ref.provider, ref.model, "client_error", exc.status, latency_ms))
        else:
            breaker.release_trial()  # cancelled (client left) or a bug: not the provider's fault

    async def send(self, path: str, body: bytes, headers: Mapping[str, str] | None, stream: bool,
                   budget: float, first_byte: float, answer_key: str | None = None,
                   done: tuple[bytes, ...] = (), strip_usage: bool = False, hedge: Hedge | None = None,
                   error_event: Callable[..., bytes] = stream_error_event) -> Result:
        """One try under its deadline: the budget for a non-stream call (which a `hedge` watches for a
        late first byte); a stream's until its first chunk, then the gap between chunks bounds it (a
        break ends it with `error_event`, its API's own)."""
        sender = self.sender
        deadlines = sender.deadlines
        task = deadlines.current_task()
        seconds = (budget if budget < sender.attempt_timeout else sender.attempt_timeout) if not stream \
            else (budget if budget < first_byte else first_byte)
        armed = deadlines.arm(task, seconds if seconds > 0.001 else 0.001) \
            if seconds != _INF and task is not None else None
        self.stream = stream
        resp: UpstreamResponse | None = None
        try:
            if not stream:  # a non-stream answer: its first byte is all of it
                if hedge is not None and armed is not None:
                    hedge.watch(task, armed, first_byte)  # type: ignore[arg-type]
                resp = await self.provider.send(path, body, headers, sender.untimed)
                if hedge is not None:
                    hedge.unwatch()  # the first byte came
                try:
                    length = resp.headers.get("Content-Length")
                    if length is not None and length.isdigit() and int(length) <= sender.max_body:
                        data = await resp.read()  # the usual case: a body of known, acceptable length
                    else:
                        data = await self._read(resp)
                except BaseException:
                    resp.close()
                    raise
                return self._whole(resp, data, answer_key)
            resp = await self.provider.send(path, body, headers, sender.stream_timeout)
            return await self._opened(resp, body, done, strip_usage, error_event)
        except asyncio.CancelledError:
            if armed is not None and deadlines.expired(task):  # type: ignore[arg-type]
                raise failed(self.ref, "timeout") from None
            raise
        except TimeoutError:
            raise failed(self.ref, "timeout") from None
        except CONNECTION_ERRORS:
            raise failed(self.ref, "connection") from None
        except (Retryable, UpstreamStatusError):
            raise
        except Exception as exc:  # anything else inside an attempt is that attempt's failure, never a 500
            sender.log_once(self.ref, exc)
            raise failed(self.ref, "error") from None
        finally:
            if hedge is not None:
                hedge.unwatch()
            if armed is not None:
                deadlines.disarm(task, armed)  # type: ignore[arg-type]

    def _whole(self, resp: UpstreamResponse, data: bytes, answer_key: str | None) -> Result:
        """A non-stream answer, read: the connection back in the pool, and the answer or the failure."""
        resp.release()
        if self.slots is not None:  # the body is read: the connection is back in the pool
            self.slots.release()
            self.slots = None
        status, ref = resp.status, self.ref
        if status != 200:
            raise status_failure(status, data, resp, ref, self.provider)
        return Result(200, ref, self.tally.attempts, body=data, headers=resp.headers,
                      data=answer(data, answer_key, ref))

    async def _opened(self, resp: UpstreamResponse, body: bytes, done: tuple[bytes, ...],
                      strip_usage: bool, error_event: Callable[..., bytes]) -> Result:
        """A stream: handed back once its first chunk has arrived, so a failure before it falls back."""
        ref = self.ref
        if self.slots is not None:
            resp = self.sender.limits.hold(resp, self.slots)  # the slot is the response's until its end
            self.slots = None
        try:
            status = resp.status
            if status != 200:
                data = await self._read(resp)
                resp.release()
                raise status_failure(status, data, resp, ref, self.provider)
            content_type = resp.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):  # a JSON body or a page, not a stream
                raise failed(ref, "not_a_stream", status)
            first = await resp.content.readany()
            if not first:
                raise failed(ref, "empty_stream", status)
            if first.startswith(_ERROR_EVENTS) or not first.lstrip().startswith(_SSE_STARTS):
                # an error event before any content, or bytes that are not SSE: fall back
                raise failed(ref, "stream_error", status)
        except BaseException:
            resp.close()
            raise
        state = StreamState(request_bytes=len(body), head=first)
        return Result(200, ref, self.tally.attempts,
                      stream=relay(resp, first, ref, self.breaker, state, done, UsageFilter() if strip_usage else None,
                                   error_event),
                      content_type=content_type, first_byte_at=time.perf_counter(), stream_state=state,
                      headers=resp.headers)

    async def _read(self, resp: UpstreamResponse) -> bytes:
        """The whole body, refusing one over `max_response_bytes` (a failed attempt, not a memory blow-up)."""
        limit = self.sender.max_body
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= limit:
            return await resp.read()
        if length is not None and length.isdigit():
            resp.close()
            raise failed(self.ref, "too_large")
        parts = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                resp.close()
                raise failed(self.ref, "too_large")
            parts.append(chunk)
        return b"".join(parts)
