"""The attempt loop: try a plan's candidates in order until one answers.

For each candidate: skip it when the prompt is known not to fit its context window; ask the gate
(fleet block, breaker, cooldown, backoff); send one attempt (its pool slot, deadline and breaker trial
are the attempt's lifetime); a retryable failure moves on, except that a short 429 (and a lone 5xx, on a
route that sets `retry_same`) is tried once more at the same deployment first, backing off (and honouring Retry-After)
before trying again a deployment that already failed this request; a context-window 400 moves on to a
larger window; another client error (4xx) is passed back at once. The first-byte budget fits the call
(a share of its deadline while candidates remain, the deployment's recent first bytes). A non-stream
attempt is never cut before its deadline, but once its first byte is later than that budget the plan's
next candidates start alongside it (a hedge) and the first answer wins. A stream is handed back once its
first chunk has arrived, so a failure before the first byte falls back like any other; later, it
ends with the provider's final event or with an SSE error event, never with a silent cut.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from ...outcome import Result, tried
from ...planner.plan import Candidate, Plan
from ...protocol.sse import wants_usage, with_usage
from ...types import InvalidRequestError, UpstreamError, UpstreamStatusError
from ..deadlines import Deadlines
from ..health import FirstByteTimes
from .attempt import AttemptLife, QueueFull, Sender
from .call import Call
from .classify import ContextTooLong, Retryable, all_failed, worth_again
from .events import AttemptEvents
from .gate import STOP, WAIT, Gate
from .hedge import Hedge
from .tally import Tally
from .windows import ContextWindows

if TYPE_CHECKING:
    from ...adapters.base import Translation
    from ...settings import RouterConfig
    from ...types import ModelRef
    from ..breaker import BreakerBoard
    from ..providers import Provider
    from .call import StreamContinuer

_INF = float("inf")
_RETRY_SAME = 1  # a route without `retry_same`: one more try after a short 429 (a 5xx fails over at once)
_FIRST_BYTE_MULTIPLE = 4.0  # the first-byte budget: this many times the deployment's recent 99th percentile,
_FIRST_BYTE_FLOOR = 5.0     # never below this many seconds (nor above TIERGATE_FIRST_BYTE_TIMEOUT)


def _order(candidates: tuple[Candidate, ...], tally: Tally) -> Iterator[Candidate]:
    """The candidates in the plan's order, each again at once when its failure earned another try."""
    for candidate in candidates:
        yield candidate
        while tally.again:
            tally.again = 0
            yield candidate


class AttemptLoop:
    """Runs calls over pooled providers guarded by per-deployment breakers. `events` are its signals."""

    def __init__(self, providers: Mapping[str, Provider], breakers: BreakerBoard, config: RouterConfig, *,
                 sleep: Callable[[float], Any] = asyncio.sleep):
        self.providers = providers
        self.breakers = breakers
        self.events = AttemptEvents()
        self.deadlines = Deadlines()  # every attempt's deadline, kept by one timer
        self.sender = Sender(config, self.deadlines, self.events)
        self.limits = self.sender.limits  # the providers' connection slots
        self.gate = Gate(providers, breakers, config, sleep)
        self.continuer: StreamContinuer | None = None  # stream recovery (recovery.py), set by the router
        self._first_byte_cap = config.first_byte_timeout
        # a deployment that usually answers fast is not waited on for the whole cap (unless the cap is lower)
        self._first_byte_floor = min(_FIRST_BYTE_FLOOR, config.first_byte_timeout)
        self.first_bytes = FirstByteTimes()  # what each deployment's first bytes took lately
        self.events.on_attempt_end.append(self.first_bytes.observe)
        self.windows = ContextWindows()  # context windows providers named in their 400s
        self._timeout = config.timeout
        self._max_attempts = max(1, config.max_retries)

    async def run(self, call: Call) -> Result:
        """Send the call to its plan's candidates; raise UpstreamError when none answers."""
        candidates = call.plan.candidates
        tally = Tally(self._deadline(call), self._max_attempts if call.max_attempts is None else call.max_attempts,
                      self.events, call.observer)
        hedgeable = not call.stream and len(candidates) > 1  # a late first byte may start the rest
        windows = self.windows
        while tally.sent < tally.max_attempts:
            progressed = False
            for candidate in _order(candidates, tally):
                if tally.sent >= tally.max_attempts:
                    break
                if (candidate.rule is not None or windows.learned) and windows.too_small(candidate, call, tally):
                    continue
                passed = self.gate.admit(candidate.ref, tally)
                if passed is WAIT:
                    passed = await self.gate.admit_after_wait(candidate.ref, tally)
                if not isinstance(passed, tuple):  # skipped, or no attempt fits in the deadline any more
                    if passed is STOP:
                        tally.sent = tally.max_attempts
                        break
                    continue
                provider, breaker = passed
                body, usage_added = self._body(call, candidate, provider, breaker)
                headers = call.headers  # minus the provider's own (its key, the table's headers), plus the trace's
                if headers and not provider.protected.isdisjoint(headers):
                    headers = provider.screen(headers)
                if call.credentials is not None and provider.name in call.credentials:  # the key's own
                    headers = {**(headers or {}), **call.credentials[provider.name]}
                if call.observer is not None:
                    headers = call.observer.attempt_started(candidate.ref, headers)
                hedge = None
                try:
                    async with AttemptLife(self.sender, provider, candidate.ref, breaker, tally) as attempt:
                        progressed = True
                        tally.sent += 1
                        if hedgeable:
                            hedge = self._hedge(call, candidate, tally)
                        target = call.endpoint if candidate.translation is None else candidate.translation.endpoint
                        result = await attempt.send(
                            target.path, body, headers, call.stream, tally.deadline - time.perf_counter(),
                            self.first_byte(candidate, candidates, tally), target.answer_key, target.done,
                            usage_added and not call.raw_usage, hedge, target.stream_error)
                except QueueFull:
                    continue
                except Retryable as failure:
                    tally.failed(candidate.ref, failure)
                    if hedge is not None and hedge.task is not None:  # the rest is running already: its answer
                        return await hedge.join(tally.attempts)
                    if time.perf_counter() >= tally.deadline:
                        tally.sent = tally.max_attempts
                        break
                    self._after(call, candidate, failure, tally)
                    continue
                except UpstreamStatusError as exc:
                    exc.attempts = tally.attempts
                    exc.ref = candidate.ref
                    raise
                finally:
                    if hedge is not None:  # this attempt is over: the rest, if started, is not needed
                        hedge.settle()     # (or it was joined already)
                attempts = tally.attempts
                result.tries = 1 if len(attempts) == 1 else tried(attempts)
                if call.stream:
                    result.usage_requested = usage_added or wants_usage(call.payload)
                return self._answered(call, candidate, result) if call.stream or candidate.translation else result
            if not progressed:
                break
        raise all_failed(call.plan.name, tally.attempts, tally.last, self.breakers)

    def _after(self, call: Call, candidate: Candidate, failure: Retryable, tally: Tally) -> None:
        """What a failed attempt means for the rest of the run: a prompt too long for the deployment
        rules it out (and every window no larger); a short 429 (and, when the route sets `retry_same`,
        a 500/502/503) earns it another try at once, when the wait leaves a fallback time."""
        if isinstance(failure, ContextTooLong):
            self.windows.refused(candidate, failure, call, tally)
            return
        route = call.plan.route
        chosen = route is not None and route.retry_same is not None  # the route's own: 5xx too
        retries = route.retry_same if chosen else _RETRY_SAME  # type: ignore[union-attr]
        if tally.failures[candidate.ref] > retries or not worth_again(failure, chosen):
            return
        wait = failure.retry_after or 0.0
        if wait and tally.deadline != _INF and wait * 2 >= tally.deadline - time.perf_counter():
            return
        tally.again = 1

    def first_byte(self, candidate: Candidate, candidates: tuple[Candidate, ...], tally: Tally) -> float:
        """How long this attempt may wait for its first byte (a stream's first chunk; when a non-stream
        call's hedge starts): the table's budget for the model (a reasoning model thinks long), else a
        multiple of the deployment's recent high percentile within [floor, TIERGATE_FIRST_BYTE_TIMEOUT];
        never more than half of what is left of the request's deadline while candidates remain, so a
        fallback still has time."""
        rule = candidate.rule
        if rule is not None and rule.first_byte_timeout:
            budget = rule.first_byte_timeout
        else:
            budget = self._first_byte_cap
            high = self.first_bytes.high(candidate.ref)
            if high is not None:
                wanted = high * _FIRST_BYTE_MULTIPLE
                budget = min(budget, wanted if wanted > self._first_byte_floor else self._first_byte_floor)
        if tally.deadline != _INF and candidate is not candidates[-1]:
            share = (tally.deadline - time.perf_counter()) / 2
            if share < budget:
                budget = share if share > 0.001 else 0.001
        return budget

    def _deadline(self, call: Call) -> float:
        """The client may only shorten the route's timeout (a stream has none unless the route sets one)."""
        route = call.plan.route
        timeout = call.timeout
        limit = route.timeout if route is not None and route.timeout else (None if call.stream else self._timeout)
        if limit is not None and (timeout is None or limit < timeout):
            timeout = limit
        return time.perf_counter() + timeout if timeout else _INF

    def _body(self, call: Call, candidate: Candidate, provider: Provider, breaker: Any) -> tuple[bytes, bool]:
        """The request as this candidate takes it, serialised once; and whether tiergate asked its
        stream for the usage event the client did not ask for (it is then taken out again)."""
        translation = candidate.translation
        outgoing = call.payload if translation is None else translation.payload
        if candidate.rule is not None:
            outgoing = candidate.rule.apply(outgoing)
        outgoing["model"] = candidate.ref.model
        added = call.stream and call.endpoint.usage_option and provider.spec.stream_usage \
            and not wants_usage(call.payload)
        if added:
            outgoing = with_usage(outgoing)
        try:
            return orjson.dumps(outgoing), added
        except (orjson.JSONEncodeError, TypeError):
            breaker.release_trial()
            raise InvalidRequestError("the request body cannot be forwarded: it is nested too deeply "
                                      "or holds a value JSON cannot carry") from None

    def _hedge(self, call: Call, candidate: Candidate, tally: Tally) -> Hedge | None:
        """A non-stream call with candidates left and attempts to spare may hedge a late first byte."""
        if tally.sent >= tally.max_attempts or candidate.ref == call.plan.candidates[-1].ref:
            return None
        return Hedge(self.deadlines, partial(self._rest, call, candidate.ref, tally.deadline,
                                             tally.max_attempts - tally.sent))

    def _answered(self, call: Call, candidate: Candidate, result: Result) -> Result:
        """A stream's recovery wrap, and the translation back into the client's API."""
        translation = candidate.translation
        route = call.plan.route
        continuer = self.continuer
        if (call.stream and call.recover and continuer is not None and route is not None
                and route.stream_recovery == "continue" and candidate is not call.plan.candidates[-1]
                and (call.endpoint if translation is None else translation.endpoint).continuable):
            # a translated stream is continued in its provider's API, then translated back as one stream
            result.stream = continuer.wrap(result, call if translation is None else _provider_call(call, translation))
        return result if translation is None else translation.apply(result)

    async def _rest(self, call: Call, after: ModelRef, deadline: float, max_attempts: int) -> Result:
        """The candidates after `after` (a slow attempt's hedge), within what is left of the request's
        deadline and attempts (the upstream calls of one request stay within TIERGATE_MAX_RETRIES)."""
        rest = call.plan.after(after)
        if not rest.candidates:
            raise UpstreamError(f"route {call.plan.name}: no other candidate", status=502, attempts=[])
        timeout = None if deadline == _INF else max(deadline - time.perf_counter(), 0.001)
        return await self.run(call.narrowed(rest, payload=dict(call.payload), timeout=timeout,
                                            max_attempts=max_attempts))


def _provider_call(call: Call, translation: Translation) -> Call:
    """A translated stream's call as its provider saw it (its API, its request), to the candidates that
    take the same translation: what a recovery continues before the answer is translated back."""
    plan = call.plan
    same = tuple(Candidate(c.ref, c.rule) for c in plan.candidates if c.translation is not None)
    return Call(translation.endpoint, translation.payload, Plan(plan.name, plan.route, same), stream=True,
                headers=call.headers, observer=call.observer, raw_usage=call.raw_usage)
