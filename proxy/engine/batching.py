"""Embedding batching: concurrent `/v1/embeddings` requests for the same model and options, arriving
within a short window, go upstream as one request and are split back, each client getting its own
embeddings in order (indexed from 0) and its share of the usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..outcome import Result
from ..planner.plan import Plan
from ..types import UpstreamError

# (payload, plan, headers, timeout) -> the upstream result
Send = Callable[[dict[str, Any], Plan, Mapping[str, str] | None, float | None], Awaitable[Result]]


@dataclass(slots=True)
class _Member:
    future: asyncio.Future[Result]
    start: int
    count: int
    weight: int
    payload: dict[str, Any]


@dataclass(slots=True)
class _Batch:
    plan: Plan
    template: dict[str, Any]
    headers: Mapping[str, str] | None
    timeout: float | None
    inputs: list[str] = field(default_factory=list)
    members: list[_Member] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class EmbeddingBatcher:
    """Collects embedding requests per (resolved models, options) for `window_s`, or until
    `max_inputs` inputs, then sends them as one request through `send`."""

    def __init__(self, send: Send, *, window_s: float, max_inputs: int):
        self._send = send
        self.window_s = window_s
        self.max_inputs = max_inputs
        self._open: dict[tuple[Any, ...], _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.batched_requests = 0

    async def submit(self, payload: dict[str, Any], plan: Plan, *,
                     headers: Mapping[str, str] | None = None, timeout: float | None = None) -> Result:
        raw = payload.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if (not isinstance(inputs, list) or not inputs or len(inputs) > self.max_inputs
                or not all(isinstance(x, str) for x in inputs)):
            return await self._send(payload, plan, headers, timeout)  # token arrays: sent as they are
        options = {k: v for k, v in payload.items() if k != "input"}
        key = (tuple(c.ref for c in plan.candidates), orjson.dumps({k: v for k, v in options.items() if k != "model"},
                                                 option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
        batch = self._open.get(key)
        if batch is not None and len(batch.inputs) + len(inputs) > self.max_inputs:
            self._flush(key, batch)
            batch = None
        loop = asyncio.get_running_loop()
        if batch is None:
            batch = _Batch(plan, options, headers, timeout)
            self._open[key] = batch
            batch.timer = loop.call_later(self.window_s, self._flush, key, batch)
        future: asyncio.Future[Result] = loop.create_future()
        batch.members.append(_Member(future, len(batch.inputs), len(inputs),
                                     sum(len(x) for x in inputs) or 1, payload))
        batch.inputs.extend(inputs)
        if len(batch.inputs) >= self.max_inputs:
            self._flush(key, batch)
        return await future  # cancelling one waiter cancels only its own future

    def _flush(self, key: tuple[Any, ...], batch: _Batch) -> None:
        if self._open.get(key) is batch:
            del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: _Batch) -> None:
        members = batch.members
        try:
            if len(members) == 1:  # nobody joined: the request goes as it came, its answer back unchanged
                result = await self._send(members[0].payload, batch.plan, batch.headers, batch.timeout)
                _resolve(members[0].future, result)
                return
            self.batches += 1
            self.batched_requests += len(members)
            result = await self._send({**batch.template, "input": batch.inputs}, batch.plan,
                                      batch.headers, batch.timeout)
            for member, part in zip(members, split_response(result, members, len(batch.inputs)), strict=True):
                _resolve(member.future, part)
        except asyncio.CancelledError:
            for member in members:
                if not member.future.done():
                    member.future.cancel()
            raise
        except BaseException as exc:
            for member in members:
                if not member.future.done():
                    member.future.set_exception(exc)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "batched_requests": self.batched_requests, "open": len(self._open)}

    async def close(self) -> None:
        for batch in list(self._open.values()):
            if batch.timer is not None:
                batch.timer.cancel()
            for member in batch.members:
                if not member.future.done():
                    member.future.cancel()
        self._open.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def split_response(result: Result, members: list[_Member], total_inputs: int) -> list[Result]:
    """One upstream embeddings answer -> one answer per member: its slice of `data`, re-indexed,
    and usage shared out in proportion to the length of its inputs (the parts sum to the whole)."""
    body = orjson.loads(result.body or b"{}")
    data = body.get("data")
    if not isinstance(data, list) or len(data) != total_inputs:
        raise UpstreamError(f"the batched embeddings answer from {result.ref} has "
                            f"{len(data) if isinstance(data, list) else 'no'} items for {total_inputs} inputs",
                            code="invalid_response")
    data = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    weights = [m.weight for m in members]
    shares = {name: apportion(value, weights) for name, value in usage.items() if isinstance(value, int)}
    parts = []
    for n, member in enumerate(members):
        items = [{**item, "index": i} for i, item in enumerate(data[member.start:member.start + member.count])]
        own = {**body, "data": items}
        if usage:
            own["usage"] = {**usage, **{name: values[n] for name, values in shares.items()}}
        parts.append(Result(200, result.ref, result.attempts, body=orjson.dumps(own),
                            content_type=result.content_type, tries=result.tries))
    return parts


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` into whole numbers that add up to it (largest remainder)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[:total - sum(shares)]:
        shares[i] += 1
    return shares


def _resolve(future: asyncio.Future[Result], result: Result) -> None:
    if not future.done():
        future.set_result(result)
