"""The attempt loop: try a route's candidates in order until one answers.

For each candidate (a deployment: provider + model): skip it while its breaker is open or while it
cools down after a rate limit; take a slot of its provider's pool (tiergate's own queue, bounded by
the request's deadline); send the request under its budgets; on a retryable failure (connection
error, timeout, 5xx, 408, 429, an answer that is not one) count it and move on, backing off (and
honouring Retry-After) only before trying a deployment that already failed this request. A client
error (other 4xx) is passed back at once. A non-stream attempt is never cut before its deadline, but
once its first byte is later than the first-byte budget the route's next candidates start alongside
it (a hedge) and the first answer wins. A stream is handed back once its first chunk has arrived,
so a failure before the first byte falls back like any other; later, it ends with the provider's
final event or with an SSE error event, never with a silent cut.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson

from ..outcome import SKIPPED, Attempt, Result, StreamState, tried
from ..protocol.sse import USAGE_PATHS, UsageFilter, wants_usage, with_usage
from ..settings import RouterConfig
from ..table.routing import RouteDecision
from ..types import (
    InvalidRequestError,
    ModelRef,
    RateLimitError,
    TiergateError,
    UpstreamError,
    UpstreamStatusError,
)
from .breaker import BreakerBoard
from .deadlines import Deadlines
from .providers import Provider, UpstreamResponse
from .slots import ProviderLimits, ProviderSlots

if TYPE_CHECKING:
    from ..fleet.state import FleetHealth

log = logging.getLogger("tiergate")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError, OSError)
# the list a successful answer of each endpoint must carry; anything else is not an answer
ANSWER_SHAPES = {"/chat/completions": "choices", "/completions": "choices", "/embeddings": "data",
                 "/responses": "output"}
DONE = b"data: [DONE]"  # the end of a chat/completions stream
_SSE_STARTS = (b"data:", b"event:", b":", b"id:", b"retry:")
_ERROR_EVENT = b'data: {"error"'
_INF = float("inf")


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
    done_marker: bytes | tuple[bytes, ...] = DONE  # how the adapted provider's stream ends

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


class StreamContinuer(Protocol):
    """Continues a recoverable route's stream that breaks mid-answer (recovery.py)."""

    def wrap(self, result: Result, path: str, payload: dict[str, Any], decision: RouteDecision, *,
             headers: Mapping[str, str] | None, observer: AttemptObserver | None, done_marker: bytes,
             raw_usage: bool) -> AsyncIterator[bytes]: ...


class Dispatcher:
    """Runs the attempt loop over pooled providers guarded by per-deployment breakers."""

    stream_recovery: StreamContinuer | None = None  # set by the router

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
        self._attempt_timeout = config.attempt_timeout or _INF
        self._first_byte = config.first_byte_timeout
        self._timeout = config.timeout
        # an attempt's deadline is kept by `deadlines` (one timer for all); aiohttp bounds only the
        # connect and, in a stream, the gap between chunks
        self.deadlines = Deadlines()
        self._untimed = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.stream_idle_timeout)
        self._max_attempts = max(1, config.max_retries)
        self._max_body = config.max_response_bytes
        self._fallback = config.enable_fallback
        self.limits = ProviderLimits(config)
        self.fleet_health: FleetHealth | None = None  # what other tiergates found failing (Redis)
        self._logged: set[tuple[str, str]] = set()

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
        done_marker: bytes | tuple[bytes, ...] = DONE,
        adapt: Adapter | None = None,
        raw_usage: bool = False,
        recover: bool = True,
        max_attempts: int | None = None,
    ) -> Result:
        """Send `payload` to the decision's candidates; raise UpstreamError when none answers.

        `timeout` is the client's deadline (else the route's, else the setting for non-stream calls;
        a stream has none by default). `headers` are the client's, to forward (lower-case names).
        `observer` (tracing) sees each attempt start and end and may replace its headers.
        `done_marker` is the bytes a complete stream of this endpoint ends with (or one of several).
        `adapt` may send a candidate a translated request (its own path and payload) and translate
        its answer back.
        A stream is asked for its usage event (providers with `stream_usage`) even when the client did
        not ask: that event is then taken out of the client's stream, unless `raw_usage` (the caller
        relays it to several clients and filters for each). A stream of a route with
        `stream_recovery: continue` is continued by the next candidate if it breaks mid-answer (not
        when `recover` is false: the continuation itself). `max_attempts` lowers TIERGATE_MAX_RETRIES (the
        rest of a request already under way)."""
        clock = time.perf_counter  # monotonic, sub-microsecond (uvloop's loop.time() ticks in ms)
        route = decision.route
        limit = route.timeout if route is not None and route.timeout else (None if stream else self._timeout)
        if limit is not None and (timeout is None or limit < timeout):  # the client may only shorten it
            timeout = limit
        deadline = clock() + timeout if timeout else _INF
        candidates = decision.candidates if self._fallback else decision.candidates[:1]
        plans = decision.plans
        max_attempts = self._max_attempts if max_attempts is None else max_attempts
        attempts: list[Attempt] = []
        failures: dict[ModelRef, int] = {}  # per deployment, this request
        retry_after: dict[ModelRef, float] = {}
        last: _Retryable | None = None  # the failure that decides the answer when none answers
        sent = 0
        client_usage = stream and wants_usage(payload)
        add_usage = stream and not client_usage and path in USAGE_PATHS

        while sent < max_attempts:
            progressed = False
            for ref in candidates:
                if sent >= max_attempts:
                    break
                provider = self.providers.get(ref.provider)
                if provider is None:
                    self._note(attempts, Attempt(ref.provider, ref.model, "unknown_provider"), observer)
                    continue
                breaker = self.breakers.of(ref)
                wait = 0.0
                if ref in failures:  # tried by this request already: its own backoff / Retry-After
                    wait = self._backoff(failures[ref], retry_after.get(ref))
                    if wait < 0:  # the provider asked for longer than is worth waiting here
                        continue
                fleet = self.fleet_health
                if fleet is not None and ref not in failures and not await self._fleet_allows(fleet, breaker.name):
                    self._note(attempts, Attempt(ref.provider, ref.model, "fleet_blocked"), observer)
                    continue
                if not breaker.clean:
                    if ref not in failures and breaker.cooling():
                        self._note(attempts, Attempt(ref.provider, ref.model, "cooldown"), observer)
                        continue
                    if not breaker.allow():
                        self._note(attempts, Attempt(ref.provider, ref.model, "breaker_open"), observer)
                        continue
                remaining = deadline - clock()
                if wait:
                    if wait >= remaining:
                        breaker.release_trial()
                        sent = max_attempts
                        break
                    await self._sleep(wait)
                    remaining = deadline - clock()
                adapted = adapt(ref, provider) if adapt is not None else None
                if adapted is None:
                    outgoing, attempt_path, marker = payload, path, done_marker
                else:
                    outgoing, attempt_path, marker = adapted.payload, adapted.path, adapted.done_marker
                plan = plans.get(ref) if plans else None
                if plan is not None:
                    outgoing = plan.apply(outgoing)
                outgoing["model"] = ref.model
                added = add_usage and provider.spec.stream_usage
                if added:
                    outgoing = with_usage(outgoing)
                try:
                    body = orjson.dumps(outgoing)
                except (orjson.JSONEncodeError, TypeError):
                    breaker.release_trial()
                    raise InvalidRequestError("the request body cannot be forwarded: it is nested too deeply "
                                              "or holds a value JSON cannot carry") from None
                attempt_started = clock()
                attempt_headers = headers
                if attempt_headers and not provider.protected.isdisjoint(attempt_headers):
                    attempt_headers = {k: v for k, v in attempt_headers.items() if k not in provider.protected}
                if observer is not None:
                    attempt_headers = observer.attempt_started(ref, attempt_headers)
                slots = provider.slots or self.limits.slots(provider)
                if slots is not None and not slots.take():
                    try:
                        await slots.acquire(None if remaining == _INF else max(0.0, remaining))
                    except (RateLimitError, TimeoutError):  # tiergate's own queue: not the provider's fault
                        breaker.release_trial()
                        self._note(attempts, Attempt(ref.provider, ref.model, "queue_full"), observer)
                        continue
                    except BaseException:
                        breaker.release_trial()
                        raise
                progressed = True
                sent += 1
                first_byte = plan.first_byte_timeout if plan is not None and plan.first_byte_timeout \
                    else self._first_byte
                # a non-stream answer's first byte is all of it: a slow one is not cut, but once its first byte
                # is late the rest of the candidates start alongside and the first answer wins
                hedge = _Hedge(self.deadlines, partial(
                    self._rest, deadline, path, payload, decision, ref, headers, observer, done_marker, adapt,
                    raw_usage, max_attempts - sent)) \
                    if not stream and len(candidates) > 1 and sent < max_attempts and ref != candidates[-1] else None
                try:
                    result = await self._attempt(provider, attempt_path, body, attempt_headers, stream,
                                                 deadline - clock(), first_byte, ref, attempts, slots,
                                                 marker, added and not raw_usage, hedge)
                except _Retryable as failure:
                    failure.attempt.latency_ms = (clock() - attempt_started) * 1000
                    self._note(attempts, failure.attempt, observer)
                    last = failure
                    if failure.attempt.status == 429:  # a rate limit: the deployment answered; cool it down
                        cooldown = min(failure.retry_after if failure.retry_after is not None
                                       else self.config.rate_limit_cooldown, self.config.cooldown_cap)
                        breaker.cool_down(cooldown)
                        if self.fleet_health is not None:
                            self.fleet_health.publish(breaker.name, "cooldown", cooldown, "429")
                    else:
                        breaker.record_failure(failure.attempt.outcome)
                    failures[ref] = failures.get(ref, 0) + 1
                    if failure.retry_after is not None:
                        retry_after[ref] = failure.retry_after
                    if hedge is not None and hedge.task is not None:  # the rest is running already: its answer
                        return await hedge.join(attempts)
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
                except BaseException:
                    breaker.release_trial()  # cancelled (client left) or a bug: not the provider's fault
                    raise
                finally:
                    if hedge is not None:  # this attempt is over: the rest, if started, is not needed
                        hedge.settle()     # (or it was joined already)
                if not stream and not breaker.clean:
                    breaker.record_success()
                self._note(attempts, Attempt(ref.provider, ref.model, "ok", 200, (clock() - attempt_started) * 1000),
                           observer)
                result.tries = 1 if len(attempts) == 1 else tried(attempts)
                result.usage_requested = client_usage or added
                if adapted is not None:
                    return adapted.apply(result)
                if stream and recover and route is not None and route.stream_recovery == "continue" \
                        and self.stream_recovery is not None:
                    result.stream = self.stream_recovery.wrap(
                        result, path, payload, decision, headers=headers, observer=observer,
                        done_marker=done_marker, raw_usage=raw_usage)
                return result
            if not progressed:
                break
        raise self._all_failed(decision, attempts, last)

    async def _rest(self, deadline: float, path: str, payload: dict[str, Any], decision: RouteDecision,
                    after: ModelRef, headers: Mapping[str, str] | None, observer: AttemptObserver | None,
                    done_marker: bytes | tuple[bytes, ...], adapt: Adapter | None, raw_usage: bool,
                    max_attempts: int) -> Result:
        """The candidates after `after` (a slow attempt's hedge), within what is left of the request's
        deadline and attempts (the upstream calls of one request stay within TIERGATE_MAX_RETRIES)."""
        candidates = decision.candidates
        rest = tuple(c for c in candidates[candidates.index(after) + 1:] if c != after)
        if not rest:
            raise UpstreamError(f"route {decision.name}: no other candidate", status=502, attempts=[])
        timeout = None if deadline == _INF else max(deadline - time.perf_counter(), 0.001)
        return await self.run(path, dict(payload), RouteDecision(decision.name, rest, decision.route, decision.plans),
                              headers=headers, timeout=timeout, observer=observer, done_marker=done_marker,
                              adapt=adapt, raw_usage=raw_usage, max_attempts=max_attempts)

    async def _fleet_allows(self, fleet: FleetHealth, deployment: str) -> bool:
        """Not blocked by the fleet (a dict lookup); when the fleet's open breaker has just run out, only
        the pod that claims the trial sends it."""
        if fleet.blocked_until(deployment) is not None:
            return False
        if fleet.trial_due(deployment):
            return await fleet.claim_trial(deployment, self._first_byte)
        return True

    def _note(self, attempts: list[Attempt], attempt: Attempt, observer: AttemptObserver | None = None) -> None:
        attempts.append(attempt)
        if self._on_attempt is not None:
            self._on_attempt(attempt)
        if observer is not None:
            observer.attempt_ended(attempt)

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter before re-trying a deployment that failed; -1 when
        its Retry-After is longer than tiergate waits within one request (the client gets the 429)."""
        if failures == 0:
            return 0.0
        if retry_after is not None:
            return retry_after if retry_after <= self.config.retry_after_cap else -1.0
        base = self.config.retry_backoff * (2 ** (failures - 1))
        return min(random.uniform(base / 2, base), self.config.retry_after_cap)

    async def _attempt(self, provider: Provider, path: str, body: bytes,
                       headers: Mapping[str, str] | None, stream: bool, budget: float, first_byte: float,
                       ref: ModelRef, attempts: list[Attempt], slots: ProviderSlots | None,
                       done_marker: bytes | tuple[bytes, ...], strip_usage: bool = False,
                       hedge: _Hedge | None = None) -> Result:
        """One try, under its deadline (the budget; until its first chunk for a stream, which is then bounded
        by the gap between chunks). A non-stream try with a `hedge` starts it if its first byte is late."""
        resp: UpstreamResponse | None = None
        task = self.deadlines.current_task()
        seconds = (budget if budget < self._attempt_timeout else self._attempt_timeout) if not stream \
            else (budget if budget < first_byte else first_byte)
        armed = self.deadlines.arm(task, seconds if seconds > 0.001 else 0.001) \
            if seconds != _INF and task is not None else None
        try:
            if not stream:
                if hedge is not None and armed is not None:
                    hedge.watch(task, armed, first_byte)  # type: ignore[arg-type]
                resp = await provider.send(path, body, headers, self._untimed)
                if hedge is not None:
                    hedge.unwatch()  # the first byte came
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) <= self._max_body:
                    data = await resp.read()  # the usual case: a body of known, acceptable length
                else:
                    data = await self._read(resp, ref)
                resp.release()
                if slots is not None:  # the body is read: the connection is back in the pool
                    slots.release()
                    slots = None
                status = resp.status
                if status != 200:
                    raise self._failure(status, data, resp, ref, provider)
                return Result(200, ref, attempts, body=data, headers=resp.headers,
                              data=self._answer(path, data, ref))
            resp = await provider.send(path, body, headers, self._stream_timeout)
            if slots is not None:
                resp = self.limits.hold(resp, slots)
                slots = None
            status = resp.status
            if status != 200:
                data = await self._read(resp, ref)
                resp.release()
                raise self._failure(status, data, resp, ref, provider)
            content_type = resp.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):  # a JSON body or a page, not a stream
                resp.close()
                raise _Retryable(Attempt(ref.provider, ref.model, "not_a_stream", status))
            first = await resp.content.readany()
            if not first:
                resp.close()
                raise _Retryable(Attempt(ref.provider, ref.model, "empty_stream", status))
            if first.startswith(_ERROR_EVENT) or not first.lstrip().startswith(_SSE_STARTS):
                resp.close()  # an error event before any content, or bytes that are not SSE: fall back
                raise _Retryable(Attempt(ref.provider, ref.model, "stream_error", status))
        except asyncio.CancelledError:
            if resp is not None:
                resp.close()
            if armed is not None and self.deadlines.expired(task):  # type: ignore[arg-type]
                raise _Retryable(Attempt(ref.provider, ref.model, "timeout")) from None
            raise
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
        except Exception as exc:  # anything else inside an attempt is that attempt's failure, never a 500
            if resp is not None:
                resp.close()
            self._log_once(ref, exc)
            raise _Retryable(Attempt(ref.provider, ref.model, "error")) from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        finally:
            if hedge is not None:
                hedge.unwatch()
            if armed is not None:
                self.deadlines.disarm(task, armed)  # type: ignore[arg-type]
            if slots is not None:  # never reached aiohttp's response: hand the slot back
                slots.release()
        state = StreamState(request_bytes=len(body))
        return Result(200, ref, attempts, stream=self._relay(resp, first, ref, state, done_marker,
                                                             UsageFilter() if strip_usage else None),
                      content_type=content_type, first_byte_at=time.perf_counter(), stream_state=state,
                      headers=resp.headers)

    async def _read(self, resp: UpstreamResponse, ref: ModelRef) -> bytes:
        """The whole body, refusing one over `max_response_bytes` (a failed attempt, not a memory blow-up)."""
        limit = self._max_body
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= limit:
            return await resp.read()
        if length is not None and length.isdigit():
            resp.close()
            raise _Retryable(Attempt(ref.provider, ref.model, "too_large"))
        parts = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                resp.close()
                raise _Retryable(Attempt(ref.provider, ref.model, "too_large"))
            parts.append(chunk)
        return b"".join(parts)

    @staticmethod
    def _answer(path: str, data: bytes, ref: ModelRef) -> Any:
        """The parsed body when it is an answer of its endpoint; else the attempt failed (a 200 that
        carries `{"error": ...}`, or is not JSON, is never passed on as a success, nor cached)."""
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise _Retryable(Attempt(ref.provider, ref.model, "invalid_response", 200)) from None
        if type(parsed) is not dict:
            raise _Retryable(Attempt(ref.provider, ref.model, "invalid_response", 200))
        key = ANSWER_SHAPES.get(path)
        if key is not None and type(parsed.get(key)) is not list:
            outcome = "error_body" if "error" in parsed else "invalid_response"
            raise _Retryable(Attempt(ref.provider, ref.model, outcome, 200), body=data)
        return parsed

    def _log_once(self, ref: ModelRef, exc: BaseException) -> None:
        key = (ref.provider, type(exc).__name__)
        if key not in self._logged and len(self._logged) < 256:
            self._logged.add(key)
            log.error("an attempt at %s failed inside tiergate: %s (counted as a failed attempt)",
                      ref.provider, type(exc).__name__)

    @staticmethod
    def _failure(status: int, data: bytes, resp: UpstreamResponse, ref: ModelRef, provider: Provider) -> Exception:
        if status in RETRYABLE_STATUS or status >= 500:
            return _Retryable(Attempt(ref.provider, ref.model, f"http_{status}", status),
                              _retry_after(resp.headers), body=provider.redact(data), headers=resp.headers)
        return UpstreamStatusError(status, provider.redact(data), resp.headers.get("Content-Type", "application/json"),
                                   headers=resp.headers)

    async def _relay(self, resp: UpstreamResponse, first: bytes, ref: ModelRef, state: StreamState,
                     done_marker: bytes | tuple[bytes, ...], usage: UsageFilter | None = None) -> AsyncIterator[bytes]:
        """Yield upstream chunks as they arrive. The stream is complete only when the provider's final
        event came; a break, an idle timeout or an end without it ends the client's stream with an SSE
        error event (the OpenAI SDK raises it), never with a clean end that looks complete.
        `usage` takes out the usage tiergate asked for (whole events pass, an event split across reads
        waits for its end)."""
        breaker = self.breakers.of(ref)
        markers = done_marker if isinstance(done_marker, tuple) else (done_marker,)
        single = markers[0] if len(markers) == 1 else None
        clean = False
        done = False
        try:
            chunk = first
            while chunk:
                state.chunks += 1
                state.bytes += len(chunk)
                state.tail = (state.tail + chunk)[-4096:]
                if not done:
                    done = single in chunk if single is not None else any(m in chunk for m in markers)
                if usage is None:
                    yield chunk
                else:
                    out = usage.feed(chunk)
                    if out:
                        yield out
                chunk = await resp.content.readany()
            if not done and not any(marker in state.tail for marker in markers):
                raise _Incomplete
            if usage is not None and usage.carry:
                yield usage.flush()
            clean = True
            state.completed = True
            breaker.record_success()
        except (TimeoutError, _Incomplete, *_CONNECTION_ERRORS) as exc:
            cause = ("timeout" if isinstance(exc, TimeoutError) else
                     "incomplete" if isinstance(exc, _Incomplete) else "connection")
            state.error = cause
            breaker.record_failure(cause)
            what = "ended before its final event" if cause == "incomplete" else f"broke off ({cause})"
            yield stream_error_event(f"the upstream stream from {ref} {what} after {state.chunks} chunks",
                                     code=f"upstream_{cause}")
        finally:
            if clean:
                resp.release()
            else:
                breaker.release_trial()
                resp.close()

    def _all_failed(self, decision: RouteDecision, attempts: list[Attempt],
                    last: _Retryable | None) -> TiergateError:
        """One error for the whole request, of the status class the deciding failure had: the last
        provider's 429 stays a 429 with its Retry-After, its 5xx that 5xx; unreachable is 502, a deadline 504."""
        sent = [a for a in attempts if a.outcome not in SKIPPED]
        reasons = "; ".join(a.describe() for a in attempts) or "no candidate"
        summary = f"route {decision.name}: every candidate failed ({reasons})"
        if not sent:
            if any(a.outcome == "queue_full" for a in attempts):
                return RateLimitError(f"route {decision.name}: every candidate is at its concurrency limit "
                                      f"({reasons}); retry shortly", retry_after=1.0)
            cooling = [self.breakers.of(ModelRef(a.provider, a.model)).cooling()
                       for a in attempts if a.outcome == "cooldown"]
            if cooling:
                return UpstreamError(f"route {decision.name}: every candidate is rate-limited ({reasons})",
                                     status=429, code="rate_limit_exceeded", error_type="rate_limit_error",
                                     attempts=attempts, retry_after=max(0.001, min(cooling)))
            return UpstreamError(summary, status=503, code="no_provider_available", attempts=attempts)
        decisive = sent[-1]
        if last is not None and last.attempt is decisive and decisive.status is not None and decisive.status != 200:
            provider_error = _error_fields(last.body)
            message = provider_error.get("message")
            return UpstreamError(
                f"{message} ({summary})" if isinstance(message, str) and message else summary,
                status=decisive.status, attempts=attempts, headers=last.headers, tried=True,
                retry_after=last.retry_after if decisive.status == 429 else None,
                code=_str_or(provider_error.get("code"), "rate_limit_exceeded" if decisive.status == 429
                             else "upstream_failed"),
                error_type=_str_or(provider_error.get("type"), "rate_limit_error" if decisive.status == 429
                                   else "upstream_error"),
                param=provider_error.get("param") if isinstance(provider_error.get("param"), str) else None)
        if decisive.outcome == "timeout":
            return UpstreamError(summary, status=504, code="upstream_timeout", attempts=attempts, tried=True)
        return UpstreamError(summary, status=502, code="upstream_failed", attempts=attempts, tried=True)


class _Retryable(Exception):
    """A failed attempt that moves on to the next candidate; keeps what the provider said (its error
    body, redacted, and headers) in case this failure decides the answer."""

    def __init__(self, attempt: Attempt, retry_after: float | None = None, *, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None):
        self.attempt = attempt
        self.retry_after = retry_after
        self.body = body
        self.headers = headers


class _Hedge:
    """The rest of a non-stream request's candidates, started when an attempt's first byte (its
    response headers) is later than its first-byte budget. The slow attempt is not cut: whichever
    answers first is the answer. If the rest answers first, the slow attempt's deadline is brought
    forward to now; if the slow attempt fails, the rest decides; if it answers, the rest is cancelled."""

    __slots__ = ("_deadlines", "_start", "task", "_primary", "_watch")

    def __init__(self, deadlines: Deadlines, start: Callable[[], Awaitable[Result]]):
        self._deadlines = deadlines
        self._start = start
        self.task: asyncio.Task[Result] | None = None
        self._primary: tuple[asyncio.Task[object], int] | None = None  # the slow attempt's task and deadline
        self._watch: int | None = None

    def watch(self, task: asyncio.Task[object], armed: int, first_byte: float) -> None:
        self._primary = (task, armed)
        self._watch = self._deadlines.call_at(self, first_byte, self._begin)

    def unwatch(self) -> None:
        if self._watch is not None:
            self._deadlines.disarm(self, self._watch)
            self._watch = None

    def _begin(self) -> None:
        self._watch = None
        if self.task is None and self._primary is not None:
            self.task = self._primary[0].get_loop().create_task(self._run())

    async def _run(self) -> Result:
        result = await self._start()
        primary = self._primary
        if primary is not None:  # still waiting: it gives way
            self._deadlines.expire_now(*primary)
        return result

    def settle(self) -> None:
        """The slow attempt ended (answered, or the request is over): the rest is not needed."""
        self._primary = None
        self.unwatch()
        task = self.task
        if task is not None:
            if task.done():
                if not task.cancelled():
                    task.exception()  # seen: a failure of the rest is no "never retrieved" warning
            else:
                task.cancel()

    async def join(self, attempts: list[Attempt]) -> Result:
        """The slow attempt failed or gave way: the answer (or the error) is the rest's."""
        self._primary = None
        assert self.task is not None
        try:
            result = await self.task
        except BaseException as exc:
            self.settle()  # cancelled while waiting: the rest goes too
            earlier = getattr(exc, "attempts", None)
            if isinstance(earlier, list):
                exc.attempts = attempts + earlier  # type: ignore[attr-defined]
            raise
        result.attempts = attempts + result.attempts
        result.tries = tried(result.attempts)
        return result


class _Incomplete(Exception):
    """The upstream stream ended cleanly but without its final event."""


def stream_error_event(message: str, *, code: str, error_type: str = "upstream_error") -> bytes:
    return b"data: " + orjson.dumps({"error": {"message": message, "type": error_type,
                                               "param": None, "code": code}}) + b"\n\n"


def _error_fields(body: bytes | None) -> dict[str, Any]:
    """The provider's `{"error": {...}}` fields, when its error body has them."""
    if not body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    return {}


def _str_or(value: Any, default: str) -> str:
    return value if isinstance(value, str) and value else default


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI's, more precise) or `Retry-After` (seconds or a date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
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
