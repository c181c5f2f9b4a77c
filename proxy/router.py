"""`Router`: the engine, shared by the HTTP server and in-process callers.

It holds the current routing table (an immutable snapshot, swapped whole), the providers'
pooled sessions, their breakers and the dispatcher, and exposes the library API.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from .batching import EmbeddingBatcher
from .breaker import BreakerBoard
from .cache import CacheControl, ResponseCache, is_cacheable
from .discovery import Discovery, discover
from .dispatch import Dispatcher, Result, tried
from .health import HealthMonitor
from .providers import Provider, make_provider
from .quotas import Quotas
from .routing import RoutingTable, load_table
from .settings import RouterConfig
from .telemetry import RequestRecord, Telemetry
from .types import (
    InvalidRequestError,
    LLMResponse,
    ModelTier,
    TiergateError,
    UpstreamError,
    UseCase,
)

if TYPE_CHECKING:
    from .fleet import FleetLimits
    from .store import RouteStore


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI operation tiergate forwards."""

    name: str
    path: str
    operation: str  # the OpenTelemetry GenAI operation name
    streamable: bool


CHAT = Endpoint("chat.completions", "/chat/completions", "chat", True)
COMPLETIONS = Endpoint("completions", "/completions", "text_completion", True)
EMBEDDINGS = Endpoint("embeddings", "/embeddings", "embeddings", False)


_ID_PREFIX = "req_" + os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per process (random prefix) and across processes; no system call per request."""
    return f"{_ID_PREFIX}{next(_id_counter):010x}"


class Router:
    """Routes OpenAI-shaped requests to providers. Create, `await initialize()`, use, `await close()`."""

    def __init__(self, config: RouterConfig | None = None, *, table: RoutingTable | None = None,
                 dynamic: bool = False, breaker_clock: Callable[[], datetime] | None = None,
                 tracer_provider: Any = None):
        self.config = config or RouterConfig.load()
        self.dynamic = dynamic
        self._table = table
        self.providers: dict[str, Provider] = {}
        self._retired: set[Provider] = set()  # replaced or removed, closed after a grace period
        self.breakers = BreakerBoard(fail_max=self.config.breaker_failure_threshold,
                                     reset_timeout=self.config.breaker_recovery_timeout,
                                     clock=breaker_clock)
        self.health = HealthMonitor(self.providers, interval=self.config.health_check_interval,
                                    timeout=self.config.connect_timeout)
        self.dispatcher = Dispatcher(self.providers, self.breakers, self.config,
                                     on_attempt=self.health.observe)
        # telemetry (issue 6): `tracer_provider` joins tiergate's spans to the caller's traces
        self.telemetry = Telemetry(self.config, self, tracer_provider=tracer_provider)
        # response cache, coalescing, embedding batching (issue 5); no I/O until used
        self.cache = ResponseCache(self.config)
        self.batcher = (EmbeddingBatcher(self._send, window_s=self.config.batch_window_ms / 1000,
                                         max_inputs=self.config.batch_max_inputs)
                        if self.config.enable_batching else None)
        # rate limits and budgets: counted for the fleet in Redis when TIERGATE_REDIS_URL is set
        self.fleet: FleetLimits | None = None
        if self.config.redis_url:
            from .fleet import FleetLimits, RedisLink
            self.fleet = FleetLimits(RedisLink(self.config.redis_url, timeout=self.config.redis_timeout),
                                     self.config.cache_namespace)
        self.quotas = Quotas(self.fleet, policy=self.config.limits_on_redis_failure)
        self._limits_collected = False  # the limits' /metrics families, registered once
        self.started_at = time.time()
        self.initialized = False
        self.draining = False
        self._store: RouteStore | None = None  # the table from Postgres (dynamic routers)
        self._discovered: tuple[str, ...] = ()  # provider/model ids found by the last discovery

    # -- lifetime ---------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Load the table, start the providers' pools. Fails fast on a bad table."""
        if self.initialized:
            return
        if self._table is None:
            self._table = load_table(self.config.table_path,
                                     allow_model_override=self.config.allow_model_override)
        if self.dynamic and self.config.database_dsn:  # Postgres table; the file is the fallback
            from .store import RouteStore  # asyncpg is loaded only by routers that use the database

            self._store = RouteStore(self.config, self.apply_table)
            self._table = await self._store.load_initial(self._table)
        await self.apply_table(self._table)
        if self._store is not None:
            self._store.start()
        self.health.start()
        if self.fleet is not None:
            self.fleet.start(self._refresh_limits,
                             active=lambda: self._table is not None and self._table.limits is not None)
        if self.telemetry.metrics is not None and not self._limits_collected:
            from .quotas import LimitsCollector
            self.telemetry.metrics.add_collector(LimitsCollector(self))
            self._limits_collected = True
        self.initialized = True

    async def close(self) -> None:
        if self._store is not None:
            await self._store.stop()
            self._store = None
        await self.health.stop()
        if self.fleet is not None:
            await self.fleet.stop()
            await self.fleet.link.close()
        if self.batcher is not None:
            await self.batcher.close()
        await self.cache.close()
        await self._close_retired(list(self._retired))
        for provider in list(self.providers.values()):
            await provider.close()
        self.providers.clear()
        self.initialized = False
        self.telemetry.drain()  # telemetry (issue 6): count and log the last requests, then
        await asyncio.to_thread(self.telemetry.close)  # flush spans off the loop

    async def __aenter__(self) -> Router:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the table --------------------------------------------------------------------------

    @property
    def table(self) -> RoutingTable:
        if self._table is None:
            raise RuntimeError("the router is not initialized: await router.initialize() first")
        return self._table

    async def apply_table(self, table: RoutingTable) -> None:
        """Start any providers the new table adds or changes, then swap the snapshot in one assignment.

        A replaced or removed provider's pool is closed once requests already using it have had
        time to finish (the drain timeout plus the request timeout)."""
        started: list[Provider] = []
        for name, spec in table.providers.items():
            current = self.providers.get(name)
            if current is None or current.spec != spec:
                provider = make_provider(spec, self.config)
                await provider.start()
                started.append(provider)
        retired = [p for name, p in self.providers.items() if name not in table.providers]
        for provider in started:
            if provider.name in self.providers:
                retired.append(self.providers[provider.name])
            self.providers[provider.name] = provider
        for provider in retired:
            if self.providers.get(provider.name) is provider:
                del self.providers[provider.name]
        self.breakers.configure({name: (spec.failure_threshold, spec.recovery_timeout)
                                 for name, spec in table.providers.items()})
        self._table = table
        self.telemetry.table_changed()
        if retired:
            loop = asyncio.get_running_loop()
            self._retired.update(retired)
            loop.call_later(self.config.drain_timeout + self.config.timeout,
                            lambda: loop.create_task(self._close_retired(retired)))

    async def _close_retired(self, providers: list[Provider]) -> None:
        for provider in providers:
            if provider in self._retired:
                self._retired.discard(provider)
                await provider.close()

    # -- the one dispatch path ------------------------------------------------------------------

    async def dispatch(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        record: RequestRecord,
        *,
        use_case: str | None = None,
        tier: str | None = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        cache_control: str | None = None,
        api_key_name: str | None = None,
    ) -> Result:
        """Resolve the route, apply its defaults and forward. Raises TiergateError on failure.

        `record` is filled in; the caller hands it to `finish()` when the response has ended.
        `cache_control` is the client's Cache-Control header (no-cache, no-store).
        `api_key_name` is the name of the inbound key the request came with (limits may be scoped by it).
        """
        telemetry = self.telemetry
        trace = (telemetry.start_trace(endpoint.operation, record, payload, headers)  # issue 6
                 if telemetry.tracing is not None else None)
        table = self._table
        if table is None:
            table = self.table  # raises: not initialized
        decision = table.resolve(use_case, tier, payload.get("model"))
        if table.limits is not None:  # rate limits and budgets: charge an estimate now (may downgrade)
            decision = await self.quotas.admit(table.limits, table, decision, payload, api_key_name, record)
        record.route = decision.name
        stream = bool(payload.get("stream")) and endpoint.streamable
        record.stream = stream
        route = decision.route
        if route is not None:
            apply_route_defaults(payload, route, endpoint)
        # cache / coalescing / batching hook (issue 5); a request that cannot be cached goes straight on
        if self.cache.enabled and is_cacheable(route, payload, embeddings=endpoint is EMBEDDINGS):
            result = await self.cache.serve(
                endpoint.path, payload, decision, record, stream=stream, embeddings=endpoint is EMBEDDINGS,
                control=CacheControl.parse(cache_control),
                call=lambda: self._forward(endpoint, payload, decision, stream, headers, timeout, trace))
        elif self.batcher is not None and endpoint is EMBEDDINGS:
            result = await self._forward(endpoint, payload, decision, stream, headers, timeout, trace)
        else:
            result = await self.dispatcher.run(endpoint.path, payload, decision, stream=stream,
                                               headers=headers, timeout=timeout, observer=trace)
        record.status = result.status
        record.ref = result.ref
        record.attempts = result.attempts
        record.tries = result.tries
        record.first_byte_at = result.first_byte_at
        telemetry.on_result(record, result)  # issue 6: usage and cost before the response goes out
        return result

    async def _forward(self, endpoint: Endpoint, payload: dict[str, Any], decision: Any, stream: bool,
                       headers: Mapping[str, str] | None, timeout: float | None, trace: Any = None) -> Result:
        """Upstream: embeddings through the batcher when batching is on, the rest straight to the dispatcher."""
        if self.batcher is not None and endpoint is EMBEDDINGS:
            return await self.batcher.submit(payload, decision, headers=headers, timeout=timeout)
        return await self.dispatcher.run(endpoint.path, payload, decision, stream=stream,
                                         headers=headers, timeout=timeout, observer=trace)

    async def _send(self, payload: dict[str, Any], decision: Any, headers: Mapping[str, str] | None,
                    timeout: float | None) -> Result:
        return await self.dispatcher.run(EMBEDDINGS.path, payload, decision, headers=headers, timeout=timeout)

    def finish(self, record: RequestRecord, error: BaseException | None = None) -> None:
        if error is not None:
            if isinstance(error, TiergateError):
                record.status = error.status
                record.error = error.code or error.error_type
                record.attempts = getattr(error, "attempts", None) or record.attempts
                record.tries = tried(record.attempts)
            else:
                record.status = 499 if isinstance(error, asyncio.CancelledError) else 500
                record.error = type(error).__name__
        self.telemetry.finish(record)
        if record.quota is not None:  # limits: replace the estimate with the real usage
            self.quotas.settle(record)

    # -- library API ------------------------------------------------------------------------

    async def complete(self, messages: str | list[dict[str, Any]], use_case: UseCase | str | None = None,
                       tier: ModelTier | str | None = None, **params: Any) -> LLMResponse:
        """A chat completion. `messages` may be a plain string (one user message)."""
        payload = {"messages": _messages(messages), **params}
        payload.pop("stream", None)
        return await self._complete(CHAT, payload, use_case, tier)

    async def complete_text(self, prompt: str | list[str], use_case: UseCase | str | None = None,
                            tier: ModelTier | str | None = None, **params: Any) -> LLMResponse:
        """A legacy text completion (`/v1/completions`)."""
        payload = {"prompt": prompt, **params}
        payload.pop("stream", None)
        return await self._complete(COMPLETIONS, payload, use_case, tier)

    async def stream(self, messages: str | list[dict[str, Any]], use_case: UseCase | str | None = None,
                     tier: ModelTier | str | None = None, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """A streamed chat completion: yields each chunk as a dict, as the OpenAI API sends it."""
        payload = {"messages": _messages(messages), **params, "stream": True}
        record = RequestRecord(new_request_id(), CHAT.name)
        error: BaseException | None = None
        try:
            result = await self.dispatch(CHAT, payload, record, use_case=_value(use_case),
                                         tier=_value(tier))
            assert result.stream is not None
            async for event in iter_sse_json(result.stream):
                yield event
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(record, error)

    async def embed(self, input: str | list[str], use_case: UseCase | str | None = None,
                    tier: ModelTier | str | None = None, **params: Any) -> dict[str, Any]:
        """Embeddings; returns the OpenAI response body as a dict."""
        payload = {"input": input, **params}
        record = RequestRecord(new_request_id(), EMBEDDINGS.name)
        error: BaseException | None = None
        try:
            result = await self.dispatch(EMBEDDINGS, payload, record, use_case=_value(use_case),
                                         tier=_value(tier))
            body = orjson.loads(result.body or b"{}")
            body.setdefault("metadata", {}).update(_metadata(record))
            return body
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(record, error)

    async def _complete(self, endpoint: Endpoint, payload: dict[str, Any], use_case: Any,
                        tier: Any) -> LLMResponse:
        record = RequestRecord(new_request_id(), endpoint.name)
        error: BaseException | None = None
        try:
            result = await self.dispatch(endpoint, payload, record, use_case=_value(use_case),
                                         tier=_value(tier))
            data = orjson.loads(result.body or b"{}")
            return LLMResponse(
                id=data.get("id", ""), model=data.get("model", result.ref.model),
                choices=data.get("choices", []), usage=data.get("usage") or {},
                created=data.get("created", 0), cached=record.cache == "hit",
                latency_ms=record.latency_ms, metadata=_metadata(record))
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(record, error)

    # -- inspection -------------------------------------------------------------------------

    def list_models(self) -> list[dict[str, Any]]:
        """`GET /v1/models`: route names, aliases and concrete models."""
        table = self.table
        created = int(self.started_at)
        seen: dict[str, dict[str, Any]] = {}
        for route in table.routes.values():
            seen[route.name] = {"id": route.name, "object": "model", "created": created,
                                "owned_by": "tiergate", "tiergate": {"kind": "route", "model": str(route.model),
                                                                     "fallbacks": [str(f) for f in route.fallbacks]}}
        for alias, ref in table.aliases.items():
            seen.setdefault(alias, {"id": alias, "object": "model", "created": created,
                                    "owned_by": ref.provider, "tiergate": {"kind": "alias", "model": str(ref)}})
        for ref in table.models():
            seen.setdefault(str(ref), {"id": str(ref), "object": "model", "created": created,
                                       "owned_by": ref.provider, "tiergate": {"kind": "model"}})
        discovered = [str(r) for r in self._store.available_models] if self._store else self._discovered
        for ref in discovered:
            seen.setdefault(ref, {"id": ref, "object": "model", "created": created,
                                  "owned_by": ref.partition("/")[0], "tiergate": {"kind": "discovered"}})
        return list(seen.values())

    async def discover_available_models(self) -> Discovery:
        """Ask each provider of the table for its models (`GET /models`); a dynamic router also
        upserts them into `llm_models` and marks the ones no longer listed unavailable."""
        providers = {n: self.providers[n] for n in self.table.providers if n in self.providers}
        found = await discover(providers, self.config.timeout)
        self._discovered = tuple(m.ref for m in found.all())
        if self._store is not None:
            await self._store.record_discovery(found.models)
        return found

    def get_health_status(self) -> dict[str, Any]:
        """Overall status, providers, breakers, the routing table's source and age, uptime."""
        table = self._table
        breakers = self.breakers.snapshot()
        providers = self.health.snapshot({name: b["state"] for name, b in breakers.items()})
        unavailable = sum(1 for p in providers.values() if not p["available"])
        if table is None or (providers and unavailable == len(providers)):
            status = "unhealthy"
        elif unavailable or table.problems:
            status = "degraded"
        else:
            status = "healthy"
        database = self._store.health(table) if self._store is not None and table is not None else None
        if database is not None and database["database"]["state"] != "connected" and status == "healthy":
            status = "degraded"
        limits = self.quotas.snapshot(table.limits if table is not None else None)
        if limits["limits"] and limits["state"].startswith("unreachable") and status == "healthy":
            status = "degraded"  # limits are counted by the failure policy, not for the fleet
        health = {
            "status": status,
            "ready": self.initialized and not self.draining,
            "uptime_s": round(time.time() - self.started_at, 3),
            "providers": providers,
            "circuit_breakers": breakers,
            "routing_table": None if table is None else {
                "source": table.source, "age_s": round(table.age(), 3), "routes": len(table.routes),
                "problems": list(table.problems)},
            "cache": self.cache.stats(),
            "batching": self.batcher.stats() if self.batcher is not None else None,
            "limits": limits,
        }
        if database is not None:
            health["routing_table"].update(database)
        return health

    async def _refresh_limits(self) -> None:
        """Read every limit's use from Redis (the heartbeat's refresh): health and metrics stay
        current on a pod that sees little traffic."""
        table = self._table
        if table is not None and table.limits is not None and self.fleet is not None:
            self.quotas.observe(await self.fleet.usage(table.limits.checks), table.limits.checks)

    def get_metrics(self) -> dict[str, Any]:
        return {**self.telemetry.snapshot(), "cache": self.cache.stats()}


def apply_route_defaults(payload: dict[str, Any], route: Any, endpoint: Endpoint) -> None:
    """Fill in the route's defaults where the client sent nothing."""
    if endpoint is EMBEDDINGS:
        return
    if (route.max_tokens is not None and "max_tokens" not in payload
            and "max_completion_tokens" not in payload):
        payload["max_tokens"] = route.max_tokens
    if route.temperature is not None and "temperature" not in payload:
        payload["temperature"] = route.temperature
    if route.system_prompt and endpoint is CHAT:
        messages = payload.get("messages")
        if isinstance(messages, list) and not any(
                isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
            payload["messages"] = [{"role": "system", "content": route.system_prompt}, *messages]


async def iter_sse_json(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Parse an SSE byte stream into the JSON objects of its `data:` lines; an error event raises."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                obj = orjson.loads(data)
                if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
                    err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
                    raise UpstreamError(str(err.get("message")), code=err.get("code"))
                yield obj


def _messages(messages: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list):
        raise InvalidRequestError("messages must be a string or a list of messages", param="messages")
    return messages


def _value(x: Any) -> str | None:
    if x is None:
        return None
    return x.value if isinstance(x, (UseCase, ModelTier)) else str(x)


def _metadata(record: RequestRecord) -> dict[str, Any]:
    return {"request_id": record.request_id, "route": record.route,
            "provider": record.ref.provider if record.ref else None,
            "model": str(record.ref) if record.ref else None,
            "attempts": record.tries, "cache": record.cache}


# --- factory ---------------------------------------------------------------------------------

_shared: Router | None = None
_shared_lock: asyncio.Lock | None = None


async def create_router(config: RouterConfig | None = None, *, dynamic: bool = False,
                        table: RoutingTable | None = None) -> Router:
    """A new, initialized router (the caller closes it)."""
    router = Router(config, table=table, dynamic=dynamic)
    await router.initialize()
    return router


async def get_llm_router(dynamic: bool = False, config: RouterConfig | None = None) -> Router:
    """The process's shared router: created and initialized on the first call, the same after."""
    global _shared, _shared_lock
    if _shared is not None and _shared.initialized:
        return _shared
    if _shared_lock is None:
        _shared_lock = asyncio.Lock()
    async with _shared_lock:
        if _shared is None or not _shared.initialized:
            _shared = await create_router(config, dynamic=dynamic)
    return _shared


@asynccontextmanager
async def router_context(config: RouterConfig | None = None, *, dynamic: bool = False,
                         table: RoutingTable | None = None) -> AsyncIterator[Router]:
    """`async with router_context() as router:` a router that is closed on exit."""
    router = await create_router(config, dynamic=dynamic, table=table)
    try:
        yield router
    finally:
        await router.close()
