"""The HTTP server: OpenAI-compatible endpoints as thin adapters over `Router`.

The app is assembled once; the router's pools live in a `cleanup_ctx`. Every `/v1` route takes the
one request pipeline (pipeline.py); the routes' own work is in handlers.py and passthrough.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import HttpVersion11, web

from ..adapters import ROUTED
from ..engine.router import Router
from ..settings import RouterConfig
from ..types import ConfigError, InvalidRequestError, NotFoundError, TiergateError
from .auth import AUTH_KEY, InboundAuth
from .connections import DIRECT_ROUTES, ConnectionLimits, GuardedAppRunner, descriptor_budget
from .handlers import model_entry, model_list, routed_endpoint
from .headers import request_id
from .openapi import openapi_json
from .passthrough import passthrough, stored_chat, stored_response
from .paths import canonical_target
from .pipeline import DRAIN, Pipeline, refused, reroute
from .render import error_response

log = logging.getLogger("tiergate")

GC_THRESHOLD = 10_000  # net allocations between first-generation collections (Python's default: 700)

ROUTER_KEY = web.AppKey("router", Router)


class InFlight(set):  # type: ignore[type-arg]
    """The handler tasks of requests in flight (drained at shutdown). A handler's task is its
    connection's and outlives the request on a kept-alive connection, so the drain waits for this set
    to empty, not for the tasks to end: `emptied` is set when the last request leaves it."""

    __slots__ = ("emptied",)

    def __init__(self) -> None:
        super().__init__()
        self.emptied = asyncio.Event()

    def discard(self, task: Any) -> None:
        super().discard(task)
        if not self:
            self.emptied.set()

    def add(self, task: Any) -> None:
        super().add(task)
        if self.emptied.is_set():
            self.emptied.clear()


INFLIGHT_KEY = web.AppKey("inflight", InFlight)


KNOWN_PATHS = frozenset({"/v1" + endpoint.path for endpoint in ROUTED} | {
    "/v1/models", "/health", "/ready", "/health/details", "/metrics", "/openapi.json"})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=_dumps)


async def ready(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    ok = router.initialized and not router.draining
    return web.json_response({"ready": ok, "draining": router.draining}, status=200 if ok else 503,
                             dumps=_dumps)


async def health_details(request: web.Request) -> web.Response:
    """Providers, breakers, limits and key names: behind a key when keys are set (`/health` and
    `/ready` stay open for probes)."""
    auth = request.app[AUTH_KEY]
    if auth.enabled:
        try:
            auth.check(request.headers.get("Authorization"))
        except TiergateError as exc:
            return error_response(exc, request_id(request.headers))
    return web.json_response({**await request.app[ROUTER_KEY].get_health_status(), "pid": os.getpid()},
                             dumps=_dumps)


def make_metrics_handler(router: Router,
                         auth: InboundAuth | None) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Prometheus exposition; the whole pod's in multiprocess mode. With `auth`, it needs a key
    (the counts reveal traffic: models, routes, volumes), like `/v1/*`."""
    telemetry = router.telemetry
    check_key = auth.check if auth is not None and auth.enabled else None

    async def metrics(request: web.Request) -> web.Response:
        try:
            if check_key is not None:
                check_key(request.headers.get("Authorization"))
            if telemetry.metrics is None:
                raise NotFoundError("metrics are off (ENABLE_MONITORING=false)")
        except TiergateError as exc:
            return error_response(exc, request_id(request.headers))
        body, content_type = await telemetry.scrape()  # rendered off the loop
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics


def build_metrics_app(router: Router) -> web.Application:
    """`GET /metrics` alone, without a key, for `metrics_host:metrics_port` (Prometheus scrapes)."""
    app = web.Application()
    app.router.add_get("/metrics", make_metrics_handler(router, None))
    return app


async def not_found(request: web.Request) -> web.StreamResponse:
    """Anything outside `/v1/` that no route serves (a 405 on tiergate's own paths); a path that is
    not canonical (`//v1/models`) is served as its canonical form first."""
    try:
        canonical = canonical_target(request.raw_path)
    except InvalidRequestError as exc:
        return refused(None, request, "not_found", exc)
    if canonical is not None:
        return await reroute(request, canonical)
    rid = request_id(request.headers)
    if request.path in KNOWN_PATHS:
        exc: TiergateError = InvalidRequestError(f"{request.method} is not allowed on {request.path}",
                                                 code="method_not_allowed")
        exc.status = 405
    else:
        exc = NotFoundError(f"no such endpoint: {request.method} {request.path}")
    return error_response(exc, rid)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` as aiohttp does it; any other expectation is an OpenAI-shaped 417
    (aiohttp's own 417 fails with a 500 on header bytes that are not UTF-8)."""
    if request.version == HttpVersion11:
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # type: ignore[attr-defined]
            return None
        exc = InvalidRequestError("unsupported Expect header; only 100-continue is", code="expectation_failed")
        exc.status = 417
        return error_response(exc, request_id(request.headers))
    return None


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def build_app(router: Router | RouterConfig | None = None) -> web.Application:
    """Assemble the application; the router is initialized on start-up and closed on cleanup."""
    if not isinstance(router, Router):
        router = Router(router)
    app = web.Application(client_max_size=router.config.max_body_bytes + 1)
    app[ROUTER_KEY] = router
    inflight = app[INFLIGHT_KEY] = InFlight()
    auth = app[AUTH_KEY] = InboundAuth(router.config.api_keys, required=router.config.database_keys)
    router.on_keys_changed.append(auth.replace)  # a watched keys file changes them live
    router.on_stored_keys_changed.append(auth.replace_stored)  # and so does Postgres (`tiergate keys`)

    async def router_lifetime(app: web.Application) -> AsyncIterator[None]:
        await router.initialize()
        yield
        await router.close()

    app.cleanup_ctx.append(router_lifetime)
    # every route answers an unsupported `Expect` with an OpenAI-shaped 417 (aiohttp's default can 500)
    expect = {"expect_handler": expect_continue}
    # every /v1 route takes the one pipeline: path, key, record, limits, errors, finish
    pipeline = Pipeline(router, auth, inflight)
    direct = app[DIRECT_ROUTES] = {}  # the server calls these past the app's router (see connections.py)
    for endpoint in ROUTED:
        path = "/v1" + endpoint.path
        serve = routed_endpoint(endpoint, router, auth)
        shape = endpoint.error_body
        direct[path] = pipeline.routed(endpoint.name, serve, canonical=True, shape=shape)  # its exact path only
        app.router.add_post(path, pipeline.routed(endpoint.name, serve, shape=shape), **expect)
    # everything else under /v1: stored responses to their provider, the rest to the pass-through provider
    forwarded = passthrough(router, KNOWN_PATHS)
    app.router.add_get("/v1/models", pipeline.located("models", model_list(router)), **expect)
    stored = pipeline.located("responses", stored_response(router, forwarded))
    app.router.add_route("*", "/v1/responses/{id}", stored, **expect)
    app.router.add_route("*", "/v1/responses/{id}/{action}", stored, **expect)
    kept = pipeline.located("passthrough", stored_chat(router, forwarded))  # chat answers kept with `store`
    app.router.add_route("*", "/v1/chat/completions/{id}", kept, **expect)
    app.router.add_route("*", "/v1/chat/completions/{id}/messages", kept, **expect)
    app.router.add_get("/v1/models/{id:.+}", pipeline.located("models", model_entry(router, forwarded)), **expect)
    app.router.add_route("*", "/v1/{tail:.*}", pipeline.located("passthrough", forwarded), **expect)
    app.router.add_get("/health", health, **expect)
    app.router.add_get("/ready", ready, **expect)
    app.router.add_get("/health/details", health_details, **expect)
    metrics_auth = auth if router.config.metrics_auth == "key" else None
    app.router.add_get("/metrics", make_metrics_handler(router, metrics_auth), **expect)
    app.router.add_get("/openapi.json", openapi_json, **expect)
    app.router.add_route("*", "/{tail:.*}", not_found, **expect)
    return app


async def serve(config: RouterConfig, *, started: Any = None, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop`): then refuse new connections, mark not ready,
    let in-flight requests and streams finish up to `drain_timeout`, and close the pools.
    `started` (anything with `set()`, e.g. a multiprocessing Event) is set once listening."""
    router = Router(config, dynamic=bool(config.database_dsn))  # DATABASE_URL: the table lives in Postgres
    app = build_app(router)
    limits = ConnectionLimits(config.header_timeout, config.keepalive_timeout,
                              descriptor_budget(config.max_connections))
    # tiergate drains itself (see `drain`); aiohttp's own shutdown then only closes what is left
    runner = GuardedAppRunner(app, limits=limits, handler_cancellation=True, access_log=None,
                              shutdown_timeout=0.5)
    await runner.setup()
    reuse_port = True if config.workers > 1 else None
    metrics_runner = None
    try:
        where = f"{config.host}:{config.port}"
        site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_port=reuse_port)
        await site.start()
        if config.metrics_port:  # stopped after the main site's drain: scrapes see the end
            where = f"{config.metrics_host}:{config.metrics_port} (metrics_port)"
            # a scraper needs a connection or two: a small cap keeps a flood there from costing descriptors
            metrics_runner = GuardedAppRunner(build_metrics_app(router), access_log=None, shutdown_timeout=1.0,
                                              limits=ConnectionLimits(config.header_timeout,
                                                                      config.keepalive_timeout, 32))
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, config.metrics_host, config.metrics_port, reuse_port=reuse_port).start()
    except OSError as exc:  # a port in use, an address not on this host: one line, not a traceback
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    log.info("tiergate listening on http://%s:%s (routes from %s)", config.host, config.port,
             router.table.source)
    gc.freeze()  # start-up objects (imports, tables, pools) leave the collector's view: shorter GC pauses
    # A first-generation collection traverses every young object, and under load those are mostly the
    # in-flight requests' (aiohttp's requests, responses, buffers, tasks) and finished requests waiting
    # for their telemetry batch: with Python's default threshold (700 net allocations) that meant
    # several collections a second costing ~8% of the CPU at concurrency 64. Collect less often.
    thresholds = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *thresholds[1:])
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        router.draining = True
        log.info("draining: waiting up to %ss for in-flight requests", config.drain_timeout)
        await site.stop()  # no new connections
        await drain(app, config.drain_timeout)
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        gc.set_threshold(*thresholds)


async def drain(app: web.Application, timeout: float) -> None:
    """Let requests in flight finish for up to `timeout` seconds, then end the ones still running:
    a stream gets an SSE error event (never a clean end that looks complete). Returns as soon as the
    last request has ended, so the process exits within moments of `timeout`."""
    inflight = app[INFLIGHT_KEY]
    if await _emptied(inflight, timeout):
        return
    log.warning("drain: %d requests still running after %ss; ending them", len(inflight), timeout)
    for task in list(inflight):
        task.cancel(DRAIN)
    await _emptied(inflight, 1.0)  # each writes its error event and ends: moments, unless a write blocks


async def _emptied(inflight: InFlight, timeout: float) -> bool:
    """Wait up to `timeout` seconds for no request to be in flight; whether none is."""
    if inflight:
        inflight.emptied.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inflight.emptied.wait(), timeout)
    return not inflight
