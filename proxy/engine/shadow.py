"""Shadow traffic: a share of a route's calls also sent to the route's shadow deployment, in the background.

The client gets only the primary's answer and never waits for the shadow: its place is taken when the
request is planned, its task starts once the primary has its answer (a stream's first chunk) or has
failed, so that the shadow's own sending never holds the loop while the primary's answer waits to be
read, and nothing on the client's path awaits it. It is sent through the attempt loop like
any call (the shadow deployment's pooled session, key and breaker) to that deployment alone: no
fallback, no second try, no cache, and nothing charged to the client key's limits or budgets. A stream
is read to its end and thrown away. Bounded: at most the route's `max_concurrency` shadows at once (and
`shadow_max_concurrency` in all), and none while the deployment's connection slots are nearly all taken;
a shadow that does not fit is dropped, and counted. What it did (latency, first byte, usage, cost,
error) and whether its answer matched the primary's are reported once both have ended. `close()`
cancels the shadows still running without waiting for their providers.

Only stateless chat calls are mirrored: a call that stores something at its provider, or continues a
stored one (Responses, Messages), is not sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ..outcome import RequestRecord, Result, ShadowRecord
from ..planner.plan import Candidate, Plan
from ..table.routing import RouteDecision
from ..types import ModelRef, TiergateError
from .costing import charge_answer, charge_stream
from .shadow_match import UNKNOWN, Answer, compare, of_body, of_stream

if TYPE_CHECKING:
    from ..fleet.affinity import ResponseAffinity
    from ..table.routing import RoutingTable
    from .dispatch import AttemptLoop, Call

log = logging.getLogger("tiergate")

_KEEP_BYTES = 1 << 20  # of a stream's chunks, what is kept to compare (the rest is relayed or read, not kept)
_SLOT_HEADROOM = 0.1  # a shadow never takes the last tenth of its deployment's connection slots


class ShadowRun:
    """One mirrored request: what its primary answered, handed over when the primary has ended."""

    __slots__ = ("request_id", "route", "ref", "stream", "ended", "launch", "_tokens", "_body", "_chunks", "_kept")

    def __init__(self, request_id: str, route: str, ref: ModelRef, stream: bool):
        self.request_id = request_id
        self.route = route
        self.ref = ref
        self.stream = stream
        # set when the primary has ended: whether it answered (a failure or a broken stream is no answer)
        self.ended: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.launch: Callable[[], None] | None = None  # starts the shadow's task (once)
        self._tokens: int | None = None
        self._body: bytes | None = None
        self._chunks: list[bytes] = []
        self._kept = 0

    def primary_answered(self, result: Result) -> None:
        """The primary's answer as the client gets it: its body kept by reference, its stream read as relayed."""
        if result.body is not None:
            self._body = result.body
        elif result.stream is not None:
            result.stream = self._tap(result.stream)
        self._launch()

    def _launch(self) -> None:
        launch, self.launch = self.launch, None
        if launch is not None:
            launch()

    async def _tap(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Every chunk passed on as it comes; the first MiB kept for the comparison."""
        try:
            async for chunk in stream:
                if self._kept < _KEEP_BYTES:
                    self._chunks.append(chunk)
                    self._kept += len(chunk)
                yield chunk
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def primary_finished(self, record: RequestRecord, error: BaseException | None) -> None:
        """The primary has ended (`Router.finish`): whether it answered, and its output tokens. Its answer
        is read later, in the shadow's task: the client's request is over, but the loop is shared."""
        self._launch()  # the primary failed before it answered: the shadow still goes
        if self.ended.done():
            return
        state = record.stream_state
        if record.usage is not None:
            self._tokens = record.usage.completion
        self.ended.set_result(error is None and 200 <= record.status < 300 and (state is None or not state.error))

    def primary_answer(self) -> Answer:
        """The primary's answer, read from what was kept."""
        if self._body is not None:
            return of_body(self._body, self._tokens)
        if self._chunks:
            return of_stream(self._chunks, self._tokens)
        return Answer(None, None, self._tokens)


class ShadowTraffic:
    """Starts, bounds, reports and cancels the shadow calls of one router."""

    def __init__(self, loop: AttemptLoop, affinity: ResponseAffinity, report: Callable[[ShadowRecord], None], *,
                 max_concurrency: int, timeout: float, enabled: bool = True, rng: random.Random | None = None):
        self._loop = loop
        self._affinity = affinity
        self._report = report
        self.max_concurrency = max(0, max_concurrency)
        self.timeout = timeout
        self.random = rng or random.Random()
        self.running: dict[str, int] = {}  # route name -> its shadows running
        self.total = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.enabled = enabled  # monitoring off: a shadow would be paid for and never seen, so none is sent

    def mirror(self, call: Call, table: RoutingTable, record: RequestRecord) -> ShadowRun | None:
        """Maybe start the shadow of a request to a route that has one (after it is planned); the run
        the router hands the primary's answer to, or None when this request is not mirrored."""
        plan, endpoint = call.plan, call.endpoint
        shadow = plan.route.shadow if plan.route is not None else None
        if shadow is None or self.closed or not self.enabled or endpoint.kind != "chat" or endpoint.stateful:
            return None
        if shadow.share < 1.0 and self.random.random() >= shadow.share:
            return None
        name, ref = plan.name, shadow.model
        if self.running.get(name, 0) >= shadow.max_concurrency or self.total >= self.max_concurrency:
            self._dropped(record.request_id, name, ref, call.stream, "dropped_cap")
            return None
        if self._busy(ref):
            self._dropped(record.request_id, name, ref, call.stream, "dropped_load")
            return None
        run = ShadowRun(record.request_id, name, ref, call.stream)
        mirrored = call.narrowed(Plan(name, plan.route, (Candidate(ref, table.plan(ref, plan.route)),)),
                                 payload=dict(call.payload), timeout=self.timeout, observer=None, raw_usage=False,
                                 recover=False, max_attempts=1)
        self.running[name] = self.running.get(name, 0) + 1  # its place is taken now, its task starts later
        self.total += 1
        run.launch = partial(self._start, run, mirrored, table)
        return run

    def _start(self, run: ShadowRun, call: Call, table: RoutingTable) -> None:
        """The shadow's task, started once the primary has its answer (or has failed): the shadow's own
        sending then never holds the loop while the primary's answer waits to be read."""
        if self.closed:
            self._release(run.route)
            self._send_report(ShadowRecord(run.request_id, run.route, run.ref, run.stream, "cancelled"))
            return
        task = asyncio.get_running_loop().create_task(self._run(run, call, table))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _busy(self, ref: ModelRef) -> bool:
        """The deployment's connection slots are nearly all taken (or callers queue for them): a shadow
        would take one a client's call needs."""
        provider = self._loop.providers.get(ref.provider)
        if provider is None:
            return False  # the loop reports the unknown provider
        slots = provider.slots or self._loop.limits.slots(provider)
        if slots is None:
            return False
        return slots.queued > 0 or slots.capacity - slots.active <= int(slots.capacity * _SLOT_HEADROOM)

    def _dropped(self, request_id: str, route: str, ref: ModelRef, stream: bool, why: str) -> None:
        self._send_report(ShadowRecord(request_id, route, ref, stream, why))

    async def _run(self, run: ShadowRun, call: Call, table: RoutingTable) -> None:
        """The shadow call, read to its end; then, once the primary has ended too, the comparison and the report."""
        if self._busy(run.ref):  # again: the load may have grown since the request was planned
            self._release(run.route)
            self._dropped(run.request_id, run.route, run.ref, run.stream, "dropped_load")
            return
        record = ShadowRecord(run.request_id, run.route, run.ref, run.stream, "ok")
        started = time.perf_counter()
        answer = None
        try:
            answer = await self._call(call, table, record, started)
        except asyncio.CancelledError:
            record.outcome = "cancelled"
            self._send_report(record)
            raise
        except TiergateError as exc:
            record.outcome, record.error = "error", exc.code or exc.error_type
        except Exception as exc:  # a shadow's failure is its own: never the client's, never unretrieved
            record.outcome, record.error = "error", type(exc).__name__
        finally:
            record.latency_ms = (time.perf_counter() - started) * 1000
            self._release(run.route)
        if answer is not None:
            try:
                record.match = await self._match(run, answer)
            except asyncio.CancelledError:  # shut down while the primary was still answering
                record.match = UNKNOWN
                self._send_report(record)
                raise
        self._send_report(record)

    async def _call(self, call: Call, table: RoutingTable, record: ShadowRecord, started: float) -> Answer | None:
        """Send the shadow, read its answer (a stream to its end), note its usage and cost."""
        if table.mixed_apis:  # its provider may speak another API than the client's: sent translated
            decision, translate = await call.endpoint.candidates(
                RouteDecision(call.plan.name, (record.ref,), call.plan.route), call.payload, table,
                self._affinity.for_key(None))
            if translate is not None and decision.candidates:
                rule = call.plan.candidates[0].rule
                call = call.narrowed(Plan(call.plan.name, call.plan.route,
                                          (Candidate(record.ref, rule, translate(record.ref)),)))
        result = await self._loop.run(call)
        usage = RequestRecord(record.request_id, call.endpoint.name)
        usage.ref = record.ref
        if result.stream is None:
            charge_answer(usage, result, table)
            record.usage, record.cost_usd = usage.usage, usage.cost_usd
            return of_body(result.body or b"", usage.usage.completion if usage.usage is not None else None)
        if result.first_byte_at is not None:
            record.first_byte_ms = (result.first_byte_at - started) * 1000
        chunks: list[bytes] = []
        kept = 0
        stream = result.stream
        try:
            async for chunk in stream:
                if kept < _KEEP_BYTES:
                    chunks.append(chunk)
                    kept += len(chunk)
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        state = result.stream_state
        if state is not None:
            charge_stream(usage, state, table)
            record.usage, record.cost_usd = usage.usage, usage.cost_usd
            if state.error is not None:
                record.outcome, record.error = "error", f"stream_{state.error}"
                return None
        return of_stream(chunks, usage.usage.completion if usage.usage is not None else None)

    async def _match(self, run: ShadowRun, answer: Answer) -> str:
        """How the shadow's answer compares with the primary's, once the primary has ended."""
        try:
            answered = await asyncio.wait_for(asyncio.shield(run.ended), self.timeout)
        except TimeoutError:
            return UNKNOWN
        return compare(run.primary_answer(), answer) if answered else UNKNOWN

    def _release(self, route: str) -> None:
        self.total -= 1
        left = self.running.get(route, 1) - 1
        if left > 0:
            self.running[route] = left
        else:
            self.running.pop(route, None)

    def _send_report(self, record: ShadowRecord) -> None:
        try:
            self._report(record)
        except Exception as exc:  # reporting must not leave a task's exception unretrieved
            log.debug("reporting a shadow call: %s", exc)

    async def close(self) -> None:
        """Cancel the shadows still running (the providers are not waited for) and let them end."""
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def settled(self) -> None:
        """Return once the shadows started so far have ended and been reported (tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {"running": self.total, "by_route": dict(self.running), "max_concurrency": self.max_concurrency}
