"""The attempt loop: try a route's candidates in order until one answers.

For each candidate: skip it if its provider's breaker is open; send the request through the
provider's pooled session under the per-attempt and overall deadlines; on a retryable failure
(connection error, timeout, 5xx, 408, 429) count it against the breaker and move on, backing
off (and honouring Retry-After) only before trying a provider that already failed. A client
error (other 4xx) is passed back at once. A stream is handed back once its first chunk has
arrived, so a failure before the first byte falls back like any other.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from .breaker import BreakerBoard
from .limits import ProviderLimits
from .providers import Provider, UpstreamResponse
from .routing import RouteDecision
from .settings import RouterConfig
from .types import ModelRef, RateLimitError, TiergateError, UpstreamError, UpstreamStatusError

_TIMEOUT_SLACK_S = 0.005  # a deadline this much later than exact is not worth a new timeout object
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError, OSError)


@dataclass(slots=True)
class Attempt:
    """One try at one candidate, as reported in errors, logs and traces."""

    provider: str
    model: str
    outcome: str  # ok | client_error | http_<status> | timeout | connection | invalid_response | breaker_open
    status: int | None = None
    latency_ms: float = 0.0

    def describe(self) -> str:
        return f"{self.provider}/{self.model}: {self.outcome}"


@dataclass(slots=True)
class Result:
    """What answered and how. Exactly one of `body` and `stream` is set."""

    status: int
    ref: ModelRef
    attempts: list[Attempt]
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    content_type: str = "application/json"
    first_byte_at: float | None = None
    stream_state: StreamState | None = None
    tries: int = 0  # attempts that reached a provider (see `tried`)


@dataclass(slots=True)
class StreamState:
    """Filled in while a stream is relayed; read by telemetry when it ends."""

    chunks: int = 0
    bytes: int = 0
    tail: bytes = b""
    completed: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Adaptation:
    """How one candidate is sent when it cannot take the request as the client wrote it (a Responses
    call to a provider that speaks only Chat Completions): its own path and request (sent like any
    payload: `model` set per candidate, serialised once), and what turns its answer (a body, or a
    stream's chunks) back into the client's API."""

    path: str
    payload: dict[str, Any]
    transform_body: Callable[[bytes], bytes]
    transform_stream: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]

    def apply(self, result: Result) -> Result:
        if result.body is not None:
            result.body = self.transform_body(result.body)
        if result.stream is not None:
            result.stream = self.transform_stream(result.stream)
        return result


# per candidate: None sends the request as written; an Adaptation sends it translated
Adapter = Callable[[ModelRef, Provider], Adaptation | None]


class AttemptObserver(Protocol):
    """Sees each upstream attempt (tracing): may replace its headers, e.g. with a `traceparent`."""

    def attempt_started(self, ref: ModelRef, headers: Mapping[str, str] | None) -> Mapping[str, str] | None: ...

    def attempt_ended(self, attempt: Attempt) -> None: ...


class Dispatcher:
    """Runs the attempt loop over pooled providers guarded by breakers."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        breakers: BreakerBoard,
        config: RouterConfig,
        *,
        sleep: Callable[[float], Any] = asyncio.sleep,
        on_attempt: Callable[[Attempt], None] | None = None,
    ):
        self.providers = providers
        self.breakers = breakers
        self.config = config
        self._sleep = sleep
        self._on_attempt = on_attempt
        attempt_timeout = config.attempt_timeout or config.timeout
        # a non-stream attempt with (nearly) the whole budget shares one timeout object
        self._full_timeout = aiohttp.ClientTimeout(total=attempt_timeout, connect=config.connect_timeout)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_read=attempt_timeout)
        self._attempt_timeout = attempt_timeout
        self._timeout = config.timeout
        self._max_attempts = max(1, config.max_retries)
        self._fallback = config.enable_fallback
        self.limits = ProviderLimits(config)  # issue 7: per-provider concurrency caps

    async def run(
        self,
        path: str,
        payload: dict[str, Any],
        decision: RouteDecision,
        *,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        observer: AttemptObserver | None = None,
        adapt: Adapter | None = None,
    ) -> Result:
        """Send `payload` to the decision's candidates; raise UpstreamError when none answers.

        `observer` (tracing) sees each attempt start and end and may replace its headers.
        `adapt` may send a candidate a translated request (its own path and body) and translate
        its answer back."""
        clock = time.perf_counter  # monotonic, sub-microsecond (uvloop's loop.time() ticks in ms)
        deadline = clock() + (timeout or self._timeout)
        candidates = decision.candidates if self._fallback else decision.candidates[:1]
        max_attempts = self._max_attempts
        attempts: list[Attempt] = []
        failures: dict[str, int] = {}  # per provider, this request
        retry_after: dict[str, float] = {}
        sent = 0

        while sent < max_attempts:
            progressed = False
            for ref in candidates:
                if sent >= max_attempts:
                    break
                provider = self.providers.get(ref.provider)
                if provider is None:
                    self._note(attempts, Attempt(ref.provider, ref.model, "unknown_provider"), observer)
                    continue
                breaker = self.breakers.get(ref.provider)
                if not breaker.clean and not breaker.allow():  # a clean (closed, no failures) breaker allows
                    self._note(attempts, Attempt(ref.provider, ref.model, "breaker_open"), observer)
                    continue
                wait = self._backoff(failures[ref.provider], retry_after.get(ref.provider)) \
                    if failures and ref.provider in failures else 0.0
                remaining = deadline - clock()
                if wait:
                    if wait >= remaining:
                        breaker.release_trial()
                        sent = max_attempts
                        break
                    await self._sleep(wait)
                    remaining = deadline - clock()
                progressed = True
                sent += 1
                adapted = adapt(ref, provider) if adapt is not None else None
                outgoing, attempt_path = (payload, path) if adapted is None else (adapted.payload, adapted.path)
                outgoing["model"] = ref.model
                body = orjson.dumps(outgoing)
                attempt_started = clock()
                attempt_headers = headers if observer is None else observer.attempt_started(ref, headers)
                try:
                    result = await self._attempt(provider, attempt_path, body, attempt_headers, stream,
                                                 min(remaining, self._attempt_timeout), ref, attempts)
                except _Retryable as failure:
                    failure.attempt.latency_ms = (clock() - attempt_started) * 1000
                    self._note(attempts, failure.attempt, observer)
                    breaker.record_failure(failure.attempt.outcome)
                    failures[ref.provider] = failures.get(ref.provider, 0) + 1
                    if failure.retry_after is not None:
                        retry_after[ref.provider] = failure.retry_after
                    if clock() >= deadline:
                        sent = max_attempts
                        break
                    continue
                except UpstreamStatusError as exc:
                    breaker.record_success()  # the provider answered; the request was at fault
                    self._note(attempts, Attempt(ref.provider, ref.model, "client_error", exc.status,
                                                 (clock() - attempt_started) * 1000), observer)
                    exc.attempts = attempts  # type: ignore[attr-defined]
                    exc.ref = ref  # type: ignore[attr-defined]
                    raise
                except RateLimitError:  # the provider's queue is full: not its failure; try the next
                    breaker.release_trial()
                    self._note(attempts, Attempt(ref.provider, ref.model, "queue_full"), observer)
                    continue
                except BaseException:
                    breaker.release_trial()  # cancelled (client left) or a bug: not the provider's fault
                    raise
                if not stream and not breaker.clean:
                    breaker.record_success()
                self._note(attempts, Attempt(ref.provider, ref.model, "ok", 200, (clock() - attempt_started) * 1000),
                           observer)
                result.tries = 1 if len(attempts) == 1 else tried(attempts)
                return result if adapted is None else adapted.apply(result)
            if not progressed:
                break
        raise self._all_failed(decision, attempts)

    def _note(self, attempts: list[Attempt], attempt: Attempt, observer: AttemptObserver | None = None) -> None:
        attempts.append(attempt)
        if self._on_attempt is not None:
            self._on_attempt(attempt)
        if observer is not None:
            observer.attempt_ended(attempt)

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter before re-trying a provider that failed."""
        if failures == 0:
            return 0.0
        if retry_after is not None:
            return min(retry_after, self.config.retry_after_cap)
        base = self.config.retry_backoff * (2 ** (failures - 1))
        return min(random.uniform(base / 2, base), self.config.retry_after_cap)

    async def _attempt(self, provider: Provider, path: str, body: bytes,
                       headers: Mapping[str, str] | None, stream: bool, budget: float,
                       ref: ModelRef, attempts: list[Attempt]) -> Result:
        """One try. A non-stream attempt runs under aiohttp's own total timeout (cheaper than
        asyncio.timeout); a stream is bounded until its first chunk, then by the per-chunk gap."""
        resp: UpstreamResponse | None = None
        try:
            if not stream:
                timeout = (self._full_timeout if budget >= self._full_timeout.total - _TIMEOUT_SLACK_S  # type: ignore[operator]
                           else aiohttp.ClientTimeout(total=budget, connect=self.config.connect_timeout))
                resp = await self._send(provider, path, body, headers, timeout)
                data = await resp.read()
                resp.release()
                status = resp.status
                if status != 200:
                    raise self._failure(status, data, resp, ref)
                if not _looks_like_json_object(data):
                    raise _Retryable(Attempt(ref.provider, ref.model, "invalid_response", status))
                return Result(200, ref, attempts, body=data)
            async with asyncio.timeout(budget):
                resp = await self._send(provider, path, body, headers, self._stream_timeout)
                status = resp.status
                if status != 200:
                    data = await resp.read()
                    resp.release()
                    raise self._failure(status, data, resp, ref)
                first = await resp.content.readany()
                if not first:
                    resp.close()
                    raise _Retryable(Attempt(ref.provider, ref.model, "empty_stream", status))
        except TimeoutError:
            if resp is not None:
                resp.close()
            raise _Retryable(Attempt(ref.provider, ref.model, "timeout")) from None
        except _CONNECTION_ERRORS:
            if resp is not None:
                resp.close()
            raise _Retryable(Attempt(ref.provider, ref.model, "connection")) from None
        except (_Retryable, UpstreamStatusError):
            raise
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        state = StreamState()
        return Result(200, ref, attempts, stream=self._relay(resp, first, ref, state),
                      content_type=resp.headers.get("Content-Type", "text/event-stream"),
                      first_byte_at=time.perf_counter(), stream_state=state)

    def _send(self, provider: Provider, path: str, body: bytes, headers: Mapping[str, str] | None,
              timeout: aiohttp.ClientTimeout) -> Awaitable[UpstreamResponse]:
        """The provider's send, under its concurrency cap when it has one (issue 7)."""
        if provider.capped:
            return self.limits.send(provider, path, body, headers, timeout)
        return provider.send(path, body, headers, timeout)

    @staticmethod
    def _failure(status: int, data: bytes, resp: UpstreamResponse, ref: ModelRef) -> Exception:
        if status in RETRYABLE_STATUS or status >= 500:
            return _Retryable(Attempt(ref.provider, ref.model, f"http_{status}", status),
                              _retry_after(resp.headers.get("Retry-After")))
        return UpstreamStatusError(status, data, resp.headers.get("Content-Type", "application/json"))

    async def _relay(self, resp: UpstreamResponse, first: bytes, ref: ModelRef,
                     state: StreamState) -> AsyncIterator[bytes]:
        """Yield upstream chunks as they arrive; a failure mid-stream ends it with an SSE error event."""
        breaker = self.breakers.get(ref.provider)
        clean = False
        try:
            chunk = first
            while chunk:
                state.chunks += 1
                state.bytes += len(chunk)
                state.tail = (state.tail + chunk)[-4096:]
                yield chunk
                chunk = await resp.content.readany()
            clean = True
            state.completed = True
            breaker.record_success()
        except (TimeoutError, *_CONNECTION_ERRORS) as exc:
            cause = "timeout" if isinstance(exc, TimeoutError) else "connection"
            state.error = cause
            breaker.record_failure(cause)
            yield stream_error_event(
                f"the upstream stream from {ref} broke off ({cause}) after {state.chunks} chunks",
                code=f"upstream_{cause}")
        finally:
            if clean:
                resp.release()
            else:
                breaker.release_trial()
                resp.close()

    def _all_failed(self, decision: RouteDecision, attempts: list[Attempt]) -> TiergateError:
        sent = [a for a in attempts if a.outcome not in _SKIPPED]
        reasons = "; ".join(a.describe() for a in attempts) or "no candidate"
        if not sent and any(a.outcome == "queue_full" for a in attempts):
            return RateLimitError(f"route {decision.name}: every candidate is at its concurrency limit "
                                  f"({reasons}); retry shortly", retry_after=1.0)
        if not sent:
            status, code = 503, "no_provider_available"
        elif all(a.outcome == "timeout" for a in sent):
            status, code = 504, "upstream_timeout"
        else:
            status, code = 502, "upstream_failed"
        return UpstreamError(
            f"route {decision.name}: every candidate failed ({reasons})",
            status=status, code=code, attempts=attempts)


def tried(attempts: list[Attempt]) -> int:
    """How many attempts really went to a provider (skips for open breakers do not count)."""
    if len(attempts) == 1:  # the usual case
        return 0 if attempts[0].outcome in _SKIPPED else 1
    return sum(1 for a in attempts if a.outcome not in _SKIPPED)


_SKIPPED = frozenset({"breaker_open", "unknown_provider", "queue_full"})


class _Retryable(Exception):
    def __init__(self, attempt: Attempt, retry_after: float | None = None):
        self.attempt = attempt
        self.retry_after = retry_after


def stream_error_event(message: str, *, code: str, error_type: str = "upstream_error") -> bytes:
    return b"data: " + orjson.dumps({"error": {"message": message, "type": error_type,
                                               "param": None, "code": code}}) + b"\n\n"


def _looks_like_json_object(data: bytes) -> bool:
    """A cheap check, not a parse (and no copy): a whole JSON object starts with { and ends with }."""
    if data[:1] == b"{" and data[-1:] == b"}":  # the usual, compact case
        return True
    start = 0
    end = len(data) - 1
    while start <= end and data[start] in _WHITESPACE:
        start += 1
    while end > start and data[end] in _WHITESPACE:
        end -= 1
    return start < end and data[start] == 0x7B and data[end] == 0x7D


_WHITESPACE = frozenset(b" \t\r\n")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
