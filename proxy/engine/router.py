"""`Router`: the engine, shared by the HTTP server and in-process callers.

It holds the current routing table (an immutable snapshot, swapped whole), the providers'
pooled sessions, their breakers and the dispatcher, and exposes the library API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import EMBEDDINGS, Endpoint
from ..adapters.references import stored_answer_id, stored_references
from ..fleet.affinity import Holder, ResponseAffinity
from ..fleet.owners import ObjectOwners
from ..limits.admission import Quotas
from ..observability.health_report import health_report
from ..observability.telemetry import GaugeSources, Telemetry
from ..outcome import CLIENT_CLOSED, RequestRecord, Result, tried
from ..planner import Planner
from ..planner.plan import Plan
from ..settings import RouterConfig, check_service_urls
from ..table.discovery import Discovery, discover
from ..table.groups import deployment_weights
from ..table.routing import RouteDecision, RoutingTable, load_table
from ..table.watch import FileWatch, FileWatchCollector, keys_file_watch
from ..types import (
    RouterClosedError,
    TiergateError,
)
from .batching import EmbeddingBatcher
from .breaker import BreakerBoard
from .cache import CacheControl, ResponseCache, cache_scope
from .costing import charge_answer, charge_stream
from .dispatch import AttemptLoop, Call, CooldownStarted
from .health import HealthMonitor
from .key_overlap import check_keys_apart, check_stored_keys_apart
from .library import LibraryAPI
from .providers import Provider, make_provider
from .recovery import StreamRecovery
from .shadow import ShadowTraffic

if TYPE_CHECKING:
    from ..fleet.state import FleetHealth, FleetLimits
    from ..table.store import RouteStore
    from ..types import ModelRef

log = logging.getLogger("tiergate")


# how a stream that broke is counted: the provider's silence a 504, the client leaving a 499 (as
# nginx counts it), anything else the provider did a 502
_STREAM_ERROR_STATUS = {"timeout": 504, CLIENT_CLOSED: 499}


class Router(LibraryAPI):
    """Routes OpenAI-shaped requests to providers. Create, `await initialize()`, use, `await close()`."""

    def __init__(self, config: RouterConfig | None = None, *, table: RoutingTable | None = None,
                 dynamic: bool = False, breaker_clock: Callable[[], datetime] | None = None,
                 tracer_provider: Any = None):
        self.config = config or RouterConfig.load()
        self.dynamic = dynamic
        self._table = table
        self._given_table = table  # what initialize() starts from again after a close()
        self.providers: dict[str, Provider] = {}
        self._retired: set[Provider] = set()  # replaced or removed, closed after a grace period
        self.breakers = BreakerBoard(fail_max=self.config.breaker_failure_threshold,
                                     reset_timeout=self.config.breaker_recovery_timeout,
                                     clock=breaker_clock)
        self.health = HealthMonitor(self.providers, interval=self.config.health_check_interval,
                                    timeout=self.config.connect_timeout)
        self.loop = AttemptLoop(self.providers, self.breakers, self.config)
        self.loop.events.on_attempt_end.append(self.health.observe)
        self.recovery = self.loop.continuer = StreamRecovery(self.loop)
        # telemetry: `tracer_provider` joins tiergate's spans to the caller's traces
        self.telemetry = Telemetry(self.config, tracer_provider=tracer_provider)
        # response cache, coalescing, embedding batching; no I/O until used
        self.cache = ResponseCache(self.config)
        self.affinity = ResponseAffinity(self.config)  # which provider holds each stored response id
        self.owners = ObjectOwners(self.config)  # which inbound key created each stored object (files, ...)
        self.batcher = (EmbeddingBatcher(self._send, window_s=self.config.batch_window_ms / 1000,
                                         max_inputs=self.config.batch_max_inputs)
                        if self.config.enable_batching else None)
        # rate limits and budgets: counted for the fleet in Redis when TIERGATE_REDIS_URL is set
        self.fleet: FleetLimits | None = None
        # and deployments some tiergate found failing (open breakers, rate-limit cooldowns), shared too
        self.fleet_health: FleetHealth | None = None
        if self.config.redis_url:
            from ..fleet.cluster_link import open_link  # one server, a cluster or a Sentinel's primary
            from ..fleet.state import FleetHealth, FleetLimits
            self.fleet = FleetLimits(open_link(self.config.redis_url, timeout=self.config.redis_timeout),
                                     self.config.cache_namespace, sync_within=self.config.limits_sync_within)
            self.fleet_health = FleetHealth(self.fleet.link, self.config.cache_namespace)
            self.breakers.on_state_change = self._share_breaker_state
            self.loop.gate.fleet_health = self.fleet_health
            self.loop.events.on_cooldown_start.append(self._share_cooldown)
        self.quotas = Quotas(self.fleet, policy=self.config.limits_on_redis_failure)
        self.planner = Planner(self.quotas, self.affinity, fallback=self.config.enable_fallback)
        # a share of some routes' calls mirrored to their shadow deployment, in the background
        self.shadows = ShadowTraffic(self.loop, self.affinity, self.telemetry.shadow,
                                     max_concurrency=self.config.shadow_max_concurrency, timeout=self.config.timeout,
                                     enabled=self.telemetry.enabled)
        # least_latency skips what is out; the attempt loop tells the load of each attempt (set per table)
        self.planner.load.unavailable = self._deployment_out
        self._limits_collected = False  # the limits' /metrics families, registered once
        self.started_at = time.time()
        self.initialized = False
        self.closed = False  # close() was called: requests get RouterClosedError, not a routing error
        self._closed_event = asyncio.Event()
        self.draining = False
        self._store: RouteStore | None = None  # the table from Postgres (dynamic routers)
        self._watch: FileWatch[RoutingTable] | None = None  # or from the table file, watched
        self._keys_watch: FileWatch[tuple[str, ...]] | None = None  # TIERGATE_API_KEYS_FILE, watched
        self._watch_collected = False
        # the inbound keys as they are now (a watched keys file changes them); the edge listens
        self.inbound_keys = self.config.api_keys
        self.on_keys_changed: list[Callable[[tuple[str, ...]], None]] = []
        # and the keys stored in Postgres (TIERGATE_DATABASE_KEYS), by their secrets' digests
        self.on_stored_keys_changed: list[Callable[[Mapping[bytes, Any]], None]] = []
        self._stored_keys: Mapping[bytes, Any] = {}  # the last ones applied, kept apart from provider keys
        self._discovered: tuple[str, ...] = ()  # provider/model ids found by the last discovery
        self._byok = False

    # -- lifetime ---------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Load the table, start the providers' pools. Fails fast on a bad table."""
        if self.initialized:
            return
        self._table = self._given_table
        if self._table is None:
            self._table = load_table(self.config.table_path,
                                     allow_model_override=self.config.allow_model_override)
        if self.dynamic and not self.config.database_dsn:
            log.warning("a dynamic router follows the database, but DATABASE_URL is not set: "
                        "routing from %s", self._table.source)
        if self.dynamic and self.config.database_dsn:  # Postgres table; the file is the fallback
            from ..table.store import RouteStore  # asyncpg is loaded only by routers that use the database

            check_service_urls(self.config)  # a malformed DATABASE_URL: ConfigError, not asyncpg's ValueError

            self._store = RouteStore(self.config, self.apply_table,
                                     keys=self._apply_stored_keys if self.config.database_keys else None)
            self._table = await self._store.load_initial(self._table)
        await self.apply_table(self._table)
        if self._store is not None:
            self._store.start()
        elif self._given_table is None and self.config.table_watch_interval > 0 and self.config.table_path.is_file():
            # the file is live: a change is applied, a bad one reported
            self._watch = FileWatch(self.config.table_path, self._load_file_table, self.apply_table,
                                    interval=self.config.table_watch_interval)
            self._watch.start()
        if self.config.table_watch_interval > 0 and self._keys_watch is None:
            self._keys_watch = keys_file_watch(self.config.api_keys, self.config.env, self._apply_keys,
                                               interval=self.config.table_watch_interval)
            if self._keys_watch is not None:
                self._keys_watch.start()
        if self.telemetry.metrics is not None and (self._watch or self._keys_watch) and not self._watch_collected:
            self.telemetry.metrics.add_collector(FileWatchCollector(
                lambda: [w for w in (self._watch, self._keys_watch) if w is not None]))
            self._watch_collected = True
        self.health.start()
        if self.fleet_health is not None:
            self.fleet_health.start()
        if self.fleet is not None:
            self.fleet.start(self._refresh_limits,
                             active=lambda: self._table is not None and self._table.limits is not None)
        if self.telemetry.metrics is not None and not self._limits_collected:
            from ..observability.limits_metrics import LimitsCollector
            self.telemetry.metrics.add_collector(LimitsCollector(
                self.quotas, lambda: self._table.limits if self._table is not None else None))
            self._limits_collected = True
        self.initialized = True
        self.closed = False
        self.shadows.closed = False
        self._closed_event.clear()
        for warning in self.key_warnings():  # once per provider, at start-up
            log.warning("%s: its calls will fail upstream", warning)

    async def close(self) -> None:
        """Stop the background tasks and close every pool. Calling it again does nothing."""
        if self.closed:
            return
        self.closed = True
        self.initialized = False
        self._table = None  # a call after close() raises RouterClosedError (see `table`)
        try:
            await self.shadows.close()  # cancelled, not waited for: a shadow never delays a shutdown
            if self._store is not None:
                await self._store.stop()
                self._store = None
            for watch in (self._watch, self._keys_watch):
                if watch is not None:
                    await watch.stop()
            self._watch = self._keys_watch = None
            await self.health.stop()
            if self.fleet_health is not None:
                await self.fleet_health.stop()
            if self.fleet is not None:
                await self.fleet.stop()
                await self.fleet.link.close()
            if self.batcher is not None:
                await self.batcher.close()
            await self.cache.close()
            await self.affinity.close()
            await self.owners.close()
        finally:  # the pools are closed even when stopping something above failed
            await self._close_retired(list(self._retired))
            for provider in list(self.providers.values()):
                await provider.close()
            self.providers.clear()
            self.loop.deadlines.close()
            self._closed_event.set()
        self.telemetry.drain()  # count and log the last requests, then
        await asyncio.to_thread(self.telemetry.close)  # flush spans off the loop

    async def __aenter__(self) -> Router:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the table --------------------------------------------------------------------------

    async def wait_closed(self) -> None:
        """Return once `close()` has run."""
        await self._closed_event.wait()

    @property
    def table(self) -> RoutingTable:
        if self._table is None:
            if self.closed:
                raise RouterClosedError("the router is closed: make a new one (get_llm_router() or "
                                        "create_router()) instead of using it after close()")
            raise RuntimeError("the router is not initialized: await router.initialize() first")
        return self._table

    def _load_file_table(self, path: Path) -> RoutingTable:
        return load_table(path, allow_model_override=self.config.allow_model_override)

    async def _apply_keys(self, keys: tuple[str, ...]) -> None:
        if self._table is not None:
            check_keys_apart(keys, self._table.providers, self.config)  # raises: the keys running stay
        self.inbound_keys = keys
        for listener in self.on_keys_changed:
            listener(keys)

    def _apply_stored_keys(self, ring: Any) -> None:
        if self._table is not None:  # raises: the keys running stay
            check_stored_keys_apart(ring.by_digest, self._table.providers, self.config)
        self._stored_keys = ring.by_digest
        for listener in self.on_stored_keys_changed:
            listener(ring.by_digest)

    async def apply_table(self, table: RoutingTable) -> None:
        """Start any providers the new table adds or changes, then swap the snapshot in one assignment.

        A replaced or removed provider's pool is closed once requests already using it have had
        time to finish (the drain timeout plus the request timeout). A table whose provider credential
        is an inbound key is refused (ConfigError) before anything starts: the running table stays."""
        check_keys_apart(self.inbound_keys, table.providers, self.config)
        check_stored_keys_apart(self._stored_keys, table.providers, self.config)
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
        for ref in table.models():  # every deployment of the table shows in health from the start
            self.breakers.of(ref)
        # the deployments' live load, kept when some route chooses per request
        self.planner.load.track(table.models() if table.chooses else ())
        self.loop.sender.load = self.planner.load.stats if table.chooses else None
        self._table = table
        self._byok = any(spec.pass_client_key for spec in table.providers.values())
        self.telemetry.table_changed(table, GaugeSources(  # what the state gauges read when /metrics is scraped
            self.breakers.items, self.cache.stats, lambda: None if self._store is None else (
                self._store.state == "connected", self._store.last_refresh_age())))
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

    def _share_breaker_state(self, name: str, old: str, new: str) -> None:
        """A deployment's breaker opened or closed here: tell the fleet, which skips it too."""
        if self.fleet_health is None or "/" not in name:
            return
        if new == "open":
            self.fleet_health.publish(name, "open", self.breakers.get(name).open_for, "breaker")
        elif new == "closed" and old != "closed":
            self.fleet_health.publish(name, "closed", 0)

    def _deployment_out(self, ref: ModelRef) -> bool:
        """Is the deployment out for now (its breaker open, a rate-limit cooldown, the fleet's block)?"""
        breaker = self.breakers.of(ref)
        if not breaker.clean and (breaker.state == "open" or breaker.cooling() > 0):
            return True
        fleet = self.fleet_health
        return fleet is not None and fleet.blocked_until(breaker.name) is not None

    def _share_cooldown(self, event: CooldownStarted) -> None:
        """A deployment answered 429 here: the fleet skips it for as long."""
        if self.fleet_health is not None:
            self.fleet_health.publish(event.deployment, "cooldown", event.seconds, event.reason)

    @property
    def byok(self) -> bool:
        """Does a provider of the table take the client's own key (`pass_client_key`)?"""
        return self._byok

    # -- the one dispatch path ------------------------------------------------------------------

    async def _kept(self, result: Result, endpoint: Endpoint, table: RoutingTable, key: str | None) -> None:
        """An answer the provider keeps (`store: true`): its id is the key's, and a chat answer's provider is
        noted so that reading it back (`/v1/chat/completions/{id}`) goes there (a Responses id is its
        endpoint's to note); not one answered through translation or by a mock, which keep nothing."""
        stored = stored_answer_id(result)
        if stored is None:
            return
        if key is not None:
            await self.owners.remember(stored, key)
        ref = result.ref
        spec = table.providers.get(ref.provider) if ref is not None else None
        if not endpoint.stateful and spec is not None and spec.kind == "openai" and "chat" in spec.apis:
            await self.affinity.for_key(key).remember(stored, Holder(ref.provider, ref.model, False))

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
        check_scope: Callable[[RouteDecision], None] | None = None,
        credentials: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Result:
        """Resolve the route, apply its defaults and forward. Raises TiergateError on failure.

        `record` is filled in; the caller hands it to `finish()` when the response has ended.
        `cache_control` is the client's Cache-Control header (no-cache, no-store).
        `api_key_name` is the name of the inbound key the request came with (limits may be scoped by it);
        `check_scope` raises when the route resolved is outside that key's scopes (before anything is
        sent); `credentials` are the key's own headers per provider name (OpenAI-Project, its own key).
        """
        telemetry = self.telemetry
        trace = (telemetry.start_trace(endpoint.operation, record, payload, headers)
                 if telemetry.tracing is not None else None)
        table = self._table
        if table is None:
            table = self.table  # raises: not initialized
        if api_key_name is not None:  # a stored object the body names must be this key's (404 before any call)
            named = stored_references(payload)
            if named:
                await self.owners.require(named, api_key_name)
        decision = table.resolve(use_case, tier, payload.get("model"), endpoint.kind)
        if check_scope is not None:
            check_scope(decision)
        if table.limits is None and not endpoint.stateful and not table.mixed_apis:  # nothing to wait for
            plan = self.planner.plan_now(decision, endpoint, payload, record)
        else:
            plan = await self.planner.plan(decision, table, endpoint, payload, record, api_key_name)
        stream = bool(payload.get("stream")) and endpoint.streamable
        record.stream = stream
        call = Call(endpoint, payload, plan, stream, headers, timeout, trace)
        if credentials is not None:  # a keyword to the class would cost every call a dict
            call = call._replace(credentials=credentials)
        shadow = None
        if plan.route is not None and plan.route.shadow is not None:  # a share mirrored to the route's shadow
            shadow = record.shadow = self.shadows.mirror(call, table, record)
        # cache / coalescing / batching; a request that cannot be cached goes straight on
        if self.cache.enabled and endpoint.cacheable(plan.route, payload, stream):
            result = await self.cache.serve(
                endpoint.path, payload, plan, record, stream=stream, control=CacheControl.parse(cache_control),
                call=lambda raw_usage=False: self._forward(call.narrowed(plan, raw_usage=raw_usage)),
                scope=cache_scope(plan, api_key_name, headers if self._byok else None, table.providers)
                + endpoint.cache_variant(headers))
        elif self.batcher is None or not endpoint.batchable:
            result = await self.loop.run(call)
        else:
            result = await self._forward(call)
        if endpoint.stateful:
            result = await endpoint.answered(result, payload, table, self.affinity.for_key(api_key_name))
        if payload.get("store") is True:  # the provider keeps the answer: the key's, read back where it is
            await self._kept(result, endpoint, table, api_key_name)
        if shadow is not None:
            shadow.primary_answered(result)
        record.status = result.status
        record.ref = result.ref
        record.attempts = result.attempts
        record.tries = result.tries
        record.first_byte_at = result.first_byte_at
        if telemetry.enabled:  # usage and cost before the response goes out (x-tiergate-cost-usd)
            if result.stream_state is not None:
                record.stream_state = result.stream_state  # a stream's are read from its tail in finish()
            else:
                charge_answer(record, result, table)
            if trace is not None:  # the answer's model and finish reasons, for its span
                telemetry.on_result(record, result)
        return result

    async def _forward(self, call: Call) -> Result:
        """Upstream: embeddings through the batcher when batching is on, the rest straight to the loop."""
        if self.batcher is not None and call.endpoint.batchable and call.credentials is None:  # one key's own
            return await self.batcher.submit(call.payload, call.plan, headers=call.headers, timeout=call.timeout)
        return await self.loop.run(call)

    async def _send(self, payload: dict[str, Any], plan: Plan, headers: Mapping[str, str] | None,
                    timeout: float | None) -> Result:
        return await self.loop.run(Call(EMBEDDINGS, payload, plan, headers=headers, timeout=timeout))

    def finish(self, record: RequestRecord, error: BaseException | None = None) -> None:
        if error is not None:
            if isinstance(error, TiergateError):
                record.status = error.status
                record.error = error.code or error.error_type
                record.attempts = error.attempts or record.attempts
                record.tries = tried(record.attempts)
            else:
                record.status = 499 if isinstance(error, asyncio.CancelledError) else 500
                record.error = type(error).__name__
        else:
            state = record.stream_state
            if state is not None and state.error is not None:  # a stream that broke counts as what it was
                record.error = f"stream_{state.error}"
                record.status = _STREAM_ERROR_STATUS.get(state.error, 502)
        state = record.stream_state
        if state is not None and record.usage is None:  # a stream's usage and cost, from its last event
            charge_stream(record, state, self._table)
        if record.shadow is not None:  # the primary has ended: its shadow may compare the answers now
            record.shadow.primary_finished(record, error)
        self.telemetry.finish(record)
        if record.quota is not None:  # limits: replace the estimate with the real usage
            self.quotas.settle(record)

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
        upserts them into `llm_models` and marks the ones no longer listed unavailable.

        Returns the models found, a list of `DiscoveredModel` (provider, id, prices, context window);
        its `errors` maps each provider that could not be asked to the reason."""
        providers = {n: self.providers[n] for n in self.table.providers if n in self.providers}
        found = await discover(providers, self.config.timeout)
        self._discovered = tuple(m.ref for m in found.all())
        if self._store is not None:
            await self._store.record_discovery(found.models)
        return found

    def key_warnings(self) -> list[str]:
        """One line per provider of the table that has no API key to send."""
        out = []
        for name, provider in self.providers.items():
            if not provider.has_key:
                spec = provider.spec
                where = f"{spec.api_key_env} is unset" if spec.api_key_env else "none in the table"
                out.append(f"provider {name} has no API key ({where})")
        return out

    async def get_health_status(self) -> dict[str, Any]:
        """Overall status, providers, circuit breakers, the routing table's source and age, uptime,
        cache, and warnings (providers without a key). A coroutine, as the migration guides await it."""
        table = self._table
        report = health_report(
            table, ready=self.initialized and not self.draining, uptime_s=time.time() - self.started_at,
            breakers=self.breakers.snapshot(), providers=self.health.snapshot(self.breakers.provider_states()),
            database=self._store.health(table) if self._store is not None and table is not None else None,
            limits=self.quotas.snapshot(table.limits if table is not None else None),
            cache=self.cache.stats(), batching=self.batcher.stats() if self.batcher is not None else None,
            warnings=self.key_warnings(),
            fleet_health=self.fleet_health.snapshot() if self.fleet_health is not None else None)
        if table is not None and table.chooses:  # each deployment's moving latency, outstanding calls, weights
            named = {**{r.name: r for r in table.routes.values()},
                     **{f"alias:{a}": r for a, r in table.alias_routes.items()}}
            report["deployments"] = self.planner.load.snapshot(deployment_weights(table.groups, named))
        if self._watch is not None and report.get("routing_table") is not None:
            report["routing_table"]["file_watch"] = self._watch.health()
        if self._keys_watch is not None:
            report["keys_file_watch"] = self._keys_watch.health()
        if report["status"] == "healthy" and any(w is not None and w.last_error is not None
                                                 for w in (self._watch, self._keys_watch)):
            report["status"] = "degraded"  # serving the previous version: the file on disk is bad
        return report

    async def _refresh_limits(self) -> None:
        """Read every limit's use from Redis (the heartbeat's refresh): health and metrics stay
        current on a pod that sees little traffic."""
        table = self._table
        if table is not None and table.limits is not None and self.fleet is not None:
            self.quotas.observe(await self.fleet.usage(table.limits.checks), table.limits.checks)

    def get_metrics(self) -> dict[str, Any]:
        return {**self.telemetry.snapshot(), "cache": self.cache.stats(),
                "stream_recoveries": self.recovery.stats()}
