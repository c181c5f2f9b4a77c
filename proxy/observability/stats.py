"""In-process request statistics for `Router.get_metrics()`: counts, rates, latency percentiles.

Latencies are kept in a fixed-size ring buffer per model (and overall), so memory stays bounded
however long the process runs; percentiles are computed only when asked for.
"""

from __future__ import annotations

from array import array
from typing import Any

RESERVOIR_SIZE = 2048
MAX_MODELS = 256
OTHER_MODEL = "other"


class LatencyRing:
    """The last `size` latencies (ms)."""

    __slots__ = ("_values", "_next", "_count", "_size")

    def __init__(self, size: int = RESERVOIR_SIZE):
        self._values = array("d", bytes(8 * size))
        self._size = size
        self._next = 0
        self._count = 0

    def add(self, value: float) -> None:
        self._values[self._next] = value
        self._next = (self._next + 1) % self._size
        if self._count < self._size:
            self._count += 1

    def extend(self, values: list[float]) -> None:
        """Add many at once (two slice copies, however many values)."""
        size = self._size
        if len(values) > size:
            values = values[-size:]
        n, at = len(values), self._next
        head = min(n, size - at)
        self._values[at:at + head] = array("d", values[:head])
        if head < n:
            self._values[:n - head] = array("d", values[head:])
        self._next = (at + n) % size
        self._count = min(size, self._count + n)

    def percentiles(self, *qs: float) -> list[float | None]:
        """Nearest-rank percentiles (q in 0..100) of the values held."""
        if not self._count:
            return [None for _ in qs]
        ordered = sorted(self._values[: self._count])
        n = len(ordered)
        return [round(ordered[min(n - 1, max(0, int(-(-q * n // 100)) - 1))], 3) for q in qs]


class Tally:
    """Counts for one model (or all of them)."""

    __slots__ = ("requests", "succeeded", "prompt_tokens", "completion_tokens", "cached_prompt_tokens",
                 "reasoning_tokens", "cost_usd", "latency")

    def __init__(self, reservoir: int = RESERVOIR_SIZE):
        self.requests = 0
        self.succeeded = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_prompt_tokens = 0  # part of prompt_tokens: served from the provider's prompt cache
        self.reasoning_tokens = 0  # part of completion_tokens
        self.cost_usd = 0.0
        self.latency = LatencyRing(reservoir)

    def add(self, ok: bool, latency_ms: float, prompt: int, completion: int, cost: float | None) -> None:
        self.requests += 1
        if ok:
            self.succeeded += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        if cost:
            self.cost_usd += cost
        ring = self.latency  # LatencyRing.add, inline: this runs twice per request
        ring._values[ring._next] = latency_ms
        ring._next = (ring._next + 1) % ring._size
        if ring._count < ring._size:
            ring._count += 1

    def add_many(self, succeeded: int, latencies_ms: list[float], prompt: int, completion: int,
                 cost: float, cached_prompt: int = 0, reasoning: int = 0) -> None:
        self.requests += len(latencies_ms)
        self.succeeded += succeeded
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cached_prompt_tokens += cached_prompt
        self.reasoning_tokens += reasoning
        self.cost_usd += cost
        self.latency.extend(latencies_ms)

    def view(self) -> dict[str, Any]:
        p50, p95, p99 = self.latency.percentiles(50, 95, 99)
        return {
            "requests": self.requests,
            "success_rate": round(self.succeeded / self.requests, 6) if self.requests else 1.0,
            "latency_p50_ms": p50, "latency_p95_ms": p95, "latency_p99_ms": p99,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                       "total": self.prompt_tokens + self.completion_tokens,
                       "cached_prompt": self.cached_prompt_tokens, "reasoning": self.reasoning_tokens},
            "cost_usd": round(self.cost_usd, 9),
        }


class RequestStats:
    """Everything `get_metrics()` reports, updated per batch of finished requests."""

    def __init__(self, reservoir: int = RESERVOIR_SIZE, max_models: int = MAX_MODELS):
        self.overall = Tally(reservoir)
        self.models: dict[str, Tally] = {}
        self.cache: dict[str, int] = {"hit": 0, "miss": 0, "coalesced": 0, "bypass": 0}
        self.fallbacks = 0
        self._reservoir = min(reservoir, 512)
        self._max_models = max_models

    def model_label(self, model: str) -> str:
        """`model`, or `other` once `max_models` distinct models have been seen (bounds memory and
        Prometheus label cardinality when clients may name any model)."""
        if model in self.models or len(self.models) < self._max_models:
            return model
        return OTHER_MODEL

    def add(self, model: str, ok: bool, latency_ms: float, cache: str, prompt: int, completion: int,
            cost: float | None, fallback: bool) -> None:
        """One request."""
        self.add_group(model, ok, [latency_ms], cache, prompt, completion, cost or 0.0, int(fallback))

    def add_group(self, model: str, ok: bool, latencies_ms: list[float], cache: str, prompt: int,
                  completion: int, cost: float, fallbacks: int, cached_prompt: int = 0, reasoning: int = 0) -> None:
        """Requests that share model, outcome and cache result: their latencies, summed tokens and cost."""
        succeeded = len(latencies_ms) if ok else 0
        self.overall.add_many(succeeded, latencies_ms, prompt, completion, cost, cached_prompt, reasoning)
        if model:
            tally = self.models.get(model)
            if tally is None:
                tally = self.models[model] = Tally(self._reservoir)
            tally.add_many(succeeded, latencies_ms, prompt, completion, cost, cached_prompt, reasoning)
        self.cache[cache] = self.cache.get(cache, 0) + len(latencies_ms)
        self.fallbacks += fallbacks

    def snapshot(self) -> dict[str, Any]:
        out = self.overall.view()
        lookups = self.cache.get("hit", 0) + self.cache.get("miss", 0) + self.cache.get("coalesced", 0)
        out["cache_hit_rate"] = round(self.cache.get("hit", 0) / lookups, 6) if lookups else 0.0
        out["cache"] = dict(self.cache)
        out["fallbacks"] = self.fallbacks
        out["models"] = {name: tally.view() for name, tally in self.models.items()}
        return out
