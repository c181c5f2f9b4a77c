"""The HTTP server: OpenAI-compatible endpoints as thin adapters over `Router`.

The app is assembled once; the router's pools live in a `cleanup_ctx`. Handlers parse the body
once, resolve and dispatch through the router, and write upstream bytes back unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..engine.dispatch import stream_error_event
from ..engine.router import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Endpoint, Router, new_request_id
from ..outcome import CLIENT_CLOSED, RequestRecord, tried
from ..settings import RouterConfig
from ..types import (
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    TiergateError,
    UpstreamError,
    UpstreamStatusError,
)
from .auth import InboundAuth
from .connections import DIRECT_ROUTES, ConnectionLimits, GuardedAppRunner, descriptor_budget
from .headers import relayed_headers, request_filter
from .openapi import openapi_json
from .passthrough import make_model_handler, make_passthrough_handler, make_stored_response_handler

log = logging.getLogger("tiergate")

GC_THRESHOLD = 10_000  # net allocations between first-generation collections (Python's default: 700)

ROUTER_KEY = web.AppKey("router", Router)
AUTH_KEY = web.AppKey("auth", InboundAuth)
INFLIGHT_KEY = web.AppKey("inflight", set)  # the handler tasks of requests in flight (drained at shutdown)
DRAIN = "tiergate is shutting down"  # the cancel message that ends a stream still open after the drain


# field -> accepted JSON types; None is accepted for every optional field
_NUMBER = (int, float)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "messages": (list,), "prompt": (str, list), "input": (str, list),
    "stream": (bool,), "stream_options": (dict,), "max_tokens": (int,),
    "max_completion_tokens": (int,), "temperature": _NUMBER, "top_p": _NUMBER, "n": (int,),
    "stop": (str, list), "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
    "logit_bias": (dict,), "logprobs": (bool, int), "top_logprobs": (int,), "user": (str,),
    "seed": (int,), "tools": (list,), "tool_choice": (str, dict), "parallel_tool_calls": (bool,),
    "response_format": (dict,), "functions": (list,), "function_call": (str, dict),
    "dimensions": (int,), "encoding_format": (str,), "metadata": (dict,), "echo": (bool,),
    "suffix": (str,), "best_of": (int,), "store": (bool,), "modalities": (list,),
    "reasoning_effort": (str,), "service_tier": (str,),
    # the Responses API's own
    "instructions": (str, list), "max_output_tokens": (int,), "previous_response_id": (str,),
    "text": (dict,), "reasoning": (dict,), "include": (list,),
}
# the exact types orjson produces for each field (None: the field is optional)
_EXACT_TYPES: dict[str, frozenset[type]] = {name: frozenset(types) | {type(None)}
                                            for name, types in FIELD_TYPES.items()}
REQUIRED: dict[str, str] = {CHAT.name: "messages", COMPLETIONS.name: "prompt", EMBEDDINGS.name: "input"}
# a Responses call may have no `input` (a stored prompt, or a conversation that continues)
_TYPE_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean",
               int: "an integer", float: "a number"}
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/health",
               "/ready", "/health/details", "/metrics", "/openapi.json"}


def validate(endpoint: Endpoint, payload: Any, max_messages: int) -> None:
    """Type-check the fields tiergate knows; anything else goes upstream untouched."""
    if type(payload) is not dict:
        raise InvalidRequestError("the request body must be a JSON object")
    required = REQUIRED.get(endpoint.name)
    if required is not None and payload.get(required) is None:
        raise InvalidRequestError(f"'{required}' is a required property", param=required)
    exact = _EXACT_TYPES
    for name, value in payload.items():
        allowed = exact.get(name)
        if allowed is not None and type(value) not in allowed:  # JSON gives exact types: no subclasses
            expected = " or ".join(_TYPE_NAMES[t] for t in FIELD_TYPES[name] if t in _TYPE_NAMES)
            raise InvalidRequestError(f"'{name}' must be {expected}", param=name)
    if endpoint is CHAT:
        messages = payload["messages"]
        if not messages:
            raise InvalidRequestError("'messages' must contain at least one message", param="messages")
        if len(messages) > max_messages:
            raise InvalidRequestError(f"'messages' has {len(messages)} messages; at most {max_messages} "
                                      "are accepted", param="messages")
        for i, message in enumerate(messages):
            if type(message) is not dict or type(message.get("role")) is not str:
                raise InvalidRequestError(f"'messages[{i}]' must be an object with a string 'role'",
                                          param=f"messages[{i}]")


def error_response(exc: TiergateError, request_id: str, extra: dict[str, str] | None = None) -> web.Response:
    """The error in OpenAI's shape. An error decided upstream carries the provider's headers
    (Retry-After, x-ratelimit-*, its x-request-id) and `x-should-retry: false`: tiergate has spent its
    attempts already, so the SDK does not multiply them."""
    upstream = getattr(exc, "headers", None)
    headers = relayed_headers(upstream, request_id) if upstream else {"x-request-id": request_id}
    if extra:
        headers.update(extra)
    if getattr(exc, "tried", False):
        headers["x-should-retry"] = "false"
    if isinstance(exc, UpstreamStatusError):
        return web.Response(body=exc.body, status=exc.status, headers=headers,
                            content_type=exc.content_type.split(";")[0])
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None and "retry-after" not in {k.lower() for k in headers}:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        headers["retry-after-ms"] = str(max(1, int(retry_after * 1000)))
    return web.Response(body=exc.to_body(), status=exc.status, headers=headers,
                        content_type="application/json")


async def read_json(request: web.Request, limit: int, timeout: float | None = None) -> Any:
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLargeError(f"request body of {length} bytes is over the limit of {limit} bytes")
    try:
        if request.content.is_eof():  # the whole body has arrived already (the usual case): no timer
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout):  # a body trickling in slower than this is cut off
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLargeError(f"request body is over the limit of {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout} seconds") from None
    except (RequestPayloadError, HttpProcessingError):  # e.g. a Content-Encoding that does not decode
        raise InvalidRequestError("the request body could not be read: its framing or Content-Encoding "
                                  "is invalid") from None
    if not raw:
        raise InvalidRequestError("the request body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None


def _timeout_header(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        raise InvalidRequestError("x-tiergate-timeout must be a number of seconds greater than 0",
                                  param="x-tiergate-timeout")
    return seconds


def _sdk_timeout(value: str) -> float | None:
    """The OpenAI SDK's own read timeout (`x-stainless-read-timeout`): waiting longer helps no one."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds < 86400 else None


def _deadline(headers: Mapping[str, str], stream: bool) -> float | None:
    timeout = _timeout_header(headers["x-tiergate-timeout"]) if "x-tiergate-timeout" in headers else None
    if not stream and "x-stainless-read-timeout" in headers:
        sdk = _sdk_timeout(headers["x-stainless-read-timeout"])
        if sdk is not None and (timeout is None or sdk < timeout):
            timeout = sdk
    return timeout


_ATTEMPTS = tuple(map(str, range(16)))  # x-tiergate-attempts, without a str() per response


def _result_headers(record: RequestRecord, upstream: Mapping[str, str] | None = None) -> dict[str, str]:
    ref = record.ref
    headers = relayed_headers(upstream, record.request_id)
    headers["x-tiergate-route"] = record.route
    headers["x-tiergate-cache"] = record.cache
    tries = record.tries
    headers["x-tiergate-attempts"] = _ATTEMPTS[tries] if 0 <= tries < 16 else str(tries)
    if ref is not None:
        headers["x-tiergate-model"] = f"{ref.provider}/{ref.model}"
        headers["x-tiergate-provider"] = ref.provider
    if record.cost_usd is not None:  # known for non-stream responses of priced models
        headers["x-tiergate-cost-usd"] = f"{record.cost_usd:.10f}".rstrip("0").rstrip(".") or "0"
    return headers


def make_handler(endpoint: Endpoint, router: Router, auth: InboundAuth,
                 inflight: set[asyncio.Task[Any]]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of one endpoint, with the router, the keys, the limits and the app's set of
    requests in flight bound once."""
    config = router.config
    max_body, body_timeout, max_messages = config.max_body_bytes, config.client_body_timeout, config.max_messages
    name = endpoint.name
    check_key = auth.check if auth.enabled else None
    forwarded = request_filter(config.drop_headers)
    forwarded_with_key = request_filter(config.drop_headers, keep_authorization=True)  # pass_client_key

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = request.headers
        record = RequestRecord(headers.get("x-request-id") or new_request_id(), name)
        error: BaseException | None = None
        task = request.task  # the handler's own task (asyncio.current_task() costs more)
        inflight.add(task)
        try:
            key_name = check_key(headers.get("Authorization")) if check_key is not None else None
            payload = await read_json(request, max_body, body_timeout)
            validate(endpoint, payload, max_messages)
            result = await router.dispatch(
                endpoint, payload, record,
                use_case=headers.get("x-use-case"), tier=headers.get("x-model-tier"),
                timeout=_deadline(headers, payload.get("stream") is True),
                headers=(forwarded_with_key if router.byok else forwarded)(headers),
                cache_control=headers.get("cache-control"), api_key_name=key_name)
            if result.stream is None:
                return web.Response(body=result.body, headers=_result_headers(record, result.headers),
                                    content_type="application/json")
            return await _relay_stream(request, result.stream, record, result.headers)
        except TiergateError as exc:
            error = exc
            extra = {"x-tiergate-route": record.route} if record.route else None
            if extra is not None and isinstance(exc, UpstreamError):
                extra["x-tiergate-attempts"] = str(tried(exc.attempts))
            if isinstance(exc, UpstreamStatusError) and exc.ref is not None:
                record.ref = exc.ref
                record.attempts = exc.attempts
                record.tries = tried(record.attempts)
                extra = _result_headers(record)
                del extra["x-request-id"]  # the provider's, relayed by error_response
            return error_response(exc, record.request_id, extra)
        except (orjson.JSONEncodeError, RecursionError):  # e.g. a body nested deeper than JSON re-encoding allows
            error = InvalidRequestError("the request body cannot be forwarded: it is nested too deeply")
            return error_response(error, record.request_id)
        except BaseException as exc:
            error = exc
            if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
                raise
            log.exception("unexpected error in %s (request %s)", name, record.request_id)
            return error_response(TiergateError("internal error in tiergate; see its log for "
                                                f"request {record.request_id}"), record.request_id)
        finally:
            inflight.discard(task)
            router.finish(record, error)

    handler.__name__ = f"handle_{endpoint.operation}"
    return handler


async def _relay_stream(request: web.Request, chunks: AsyncIterator[bytes],
                        record: RequestRecord, upstream: Mapping[str, str] | None = None) -> web.StreamResponse:
    headers = _result_headers(record, upstream)
    headers["Content-Type"] = "text/event-stream"  # a header, not the content_type setter that parses it again
    response = web.StreamResponse(status=200, headers=headers)
    response.headers["Cache-Control"] = "no-cache"  # replaces the provider's, whatever its case
    try:
        await response.prepare(request)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        # the client left mid-stream (aiohttp raises its ClientConnectionResetError): nothing more can
        # be sent, and it is no error of tiergate's to log with a traceback; counted as a 499
        state = record.stream_state
        if state is not None:
            state.error = state.error or CLIENT_CLOSED
        else:
            record.status, record.error = 499, CLIENT_CLOSED
    except asyncio.CancelledError as exc:
        if DRAIN not in exc.args:
            raise
        # still open when the drain ran out: end it with an error event the SDK raises, not a clean end
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        if record.stream_state is not None:
            record.stream_state.error = "shutdown"
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(stream_error_event("tiergate is shutting down; the stream was cut before "
                                                    "its end", code="server_shutting_down"))
            await response.write_eof()
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    return response


async def list_models(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    try:
        request.app[AUTH_KEY].check(request.headers.get("Authorization"))
    except TiergateError as exc:
        return error_response(exc, request.headers.get("x-request-id") or new_request_id())
    return web.Response(body=orjson.dumps({"object": "list", "data": router.list_models()}),
                        content_type="application/json")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=_dumps)


async def ready(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    ok = router.initialized and not router.draining
    return web.json_response({"ready": ok, "draining": router.draining}, status=200 if ok else 503,
                             dumps=_dumps)


async def health_details(request: web.Request) -> web.Response:
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
            return error_response(exc, request.headers.get("x-request-id") or new_request_id())
        body, content_type = telemetry.render_metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics


def build_metrics_app(router: Router) -> web.Application:
    """`GET /metrics` alone, without a key, for `metrics_host:metrics_port` (Prometheus scrapes)."""
    app = web.Application()
    app.router.add_get("/metrics", make_metrics_handler(router, None))
    return app


async def not_found(request: web.Request) -> web.Response:
    rid = request.headers.get("x-request-id") or new_request_id()
    if request.path.startswith("/v1/"):
        try:
            request.app[AUTH_KEY].check(request.headers.get("Authorization"))
        except TiergateError as exc:
            return error_response(exc, rid)
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
        return error_response(exc, request.headers.get("x-request-id") or new_request_id())
    return None


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def build_app(router: Router | RouterConfig | None = None) -> web.Application:
    """Assemble the application; the router is initialized on start-up and closed on cleanup."""
    if not isinstance(router, Router):
        router = Router(router)
    app = web.Application(client_max_size=router.config.max_body_bytes + 1)
    app[ROUTER_KEY] = router
    inflight: set[asyncio.Task[Any]] = set()
    app[INFLIGHT_KEY] = inflight
    auth = app[AUTH_KEY] = InboundAuth(router.config.api_keys)

    async def router_lifetime(app: web.Application) -> AsyncIterator[None]:
        await router.initialize()
        yield
        await router.close()

    app.cleanup_ctx.append(router_lifetime)
    # every route answers an unsupported `Expect` with an OpenAI-shaped 417 (aiohttp's default can 500)
    expect = {"expect_handler": expect_continue}
    direct = app[DIRECT_ROUTES] = {}  # the server calls these past the app's router (see connections.py)
    for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES):
        path = "/v1" + endpoint.path
        direct[path] = make_handler(endpoint, router, auth, inflight)
        app.router.add_post(path, direct[path], **expect)
    app.router.add_get("/v1/models", list_models, **expect)
    app.router.add_get("/health", health, **expect)
    app.router.add_get("/ready", ready, **expect)
    app.router.add_get("/health/details", health_details, **expect)
    metrics_auth = auth if router.config.metrics_auth == "key" else None
    app.router.add_get("/metrics", make_metrics_handler(router, metrics_auth), **expect)
    app.router.add_get("/openapi.json", openapi_json, **expect)
    # everything else under /v1: stored responses to their provider, the rest to the pass-through provider
    passthrough = make_passthrough_handler(router, auth, frozenset(KNOWN_PATHS), not_found)
    stored = make_stored_response_handler(router, auth, passthrough)
    app.router.add_route("*", "/v1/responses/{id}", stored, **expect)
    app.router.add_route("*", "/v1/responses/{id}/{action}", stored, **expect)
    app.router.add_get("/v1/models/{id:.+}", make_model_handler(router, auth, passthrough), **expect)
    app.router.add_route("*", "/v1/{tail:.*}", passthrough, **expect)
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
    a stream gets an SSE error event (never a clean end that looks complete)."""
    inflight: set[asyncio.Task[Any]] = app[INFLIGHT_KEY]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while inflight and (left := deadline - loop.time()) > 0:
        await asyncio.wait(set(inflight), timeout=left)
    if inflight:
        log.warning("drain: %d requests still running after %ss; ending them", len(inflight), timeout)
        for task in list(inflight):
            task.cancel(DRAIN)
        await asyncio.wait(set(inflight), timeout=1.0)
