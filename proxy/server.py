"""The HTTP server: OpenAI-compatible endpoints as thin adapters over `Router`.

The app is assembled once; the router's pools live in a `cleanup_ctx`. Handlers parse the body
once, resolve and dispatch through the router, and write upstream bytes back unchanged.
"""

from __future__ import annotations

import asyncio
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

from .auth import InboundAuth
from .dispatch import tried
from .openapi import openapi_json
from .router import CHAT, COMPLETIONS, EMBEDDINGS, Endpoint, Router, new_request_id
from .settings import RouterConfig
from .telemetry import RequestRecord
from .types import (
    InvalidRequestError,
    NotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    TiergateError,
    UpstreamStatusError,
)

log = logging.getLogger("tiergate")

GC_THRESHOLD = 10_000  # net allocations between first-generation collections (Python's default: 700)

ROUTER_KEY = web.AppKey("router", Router)
AUTH_KEY = web.AppKey("auth", InboundAuth)

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
}
# the exact types orjson produces for each field (None: the field is optional)
_EXACT_TYPES: dict[str, frozenset[type]] = {name: frozenset(types) | {type(None)}
                                            for name, types in FIELD_TYPES.items()}
REQUIRED: dict[str, str] = {CHAT.name: "messages", COMPLETIONS.name: "prompt", EMBEDDINGS.name: "input"}
_TYPE_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean",
               int: "an integer", float: "a number"}
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health",
               "/ready", "/health/details", "/metrics", "/openapi.json"}


def validate(endpoint: Endpoint, payload: Any, max_messages: int) -> None:
    """Type-check the fields tiergate knows; anything else goes upstream untouched."""
    if type(payload) is not dict:
        raise InvalidRequestError("the request body must be a JSON object")
    required = REQUIRED[endpoint.name]
    if payload.get(required) is None:
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
    headers = {"x-request-id": request_id}
    if extra:
        headers.update(extra)
    if isinstance(exc, UpstreamStatusError):
        return web.Response(body=exc.body, status=exc.status, headers=headers,
                            content_type=exc.content_type.split(";")[0])
    if getattr(exc, "retry_after", None) is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))  # type: ignore[attr-defined]
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


def _upstream_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    headers = {"traceparent": incoming["traceparent"]}
    tracestate = incoming.get("tracestate")
    if tracestate:
        headers["tracestate"] = tracestate
    return headers


def _result_headers(record: RequestRecord) -> dict[str, str]:
    ref = record.ref
    headers = {
        "x-request-id": record.request_id,
        "x-tiergate-route": record.route,
        "x-tiergate-cache": record.cache,
        "x-tiergate-attempts": str(record.tries),
    }
    if ref is not None:
        headers["x-tiergate-model"] = f"{ref.provider}/{ref.model}"
        headers["x-tiergate-provider"] = ref.provider
    if record.cost_usd is not None:  # issue 6: known for non-stream responses of priced models
        headers["x-tiergate-cost-usd"] = f"{record.cost_usd:.10f}".rstrip("0").rstrip(".") or "0"
    return headers


def make_handler(endpoint: Endpoint, router: Router,
                 auth: InboundAuth) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of one endpoint, with the router, the keys and the limits bound once."""
    config = router.config
    max_body, body_timeout, max_messages = config.max_body_bytes, config.client_body_timeout, config.max_messages
    name = endpoint.name
    check_key = auth.check if auth.enabled else None

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = request.headers
        record = RequestRecord(headers.get("x-request-id") or new_request_id(), name)
        error: BaseException | None = None
        try:
            key_name = check_key(headers.get("Authorization")) if check_key is not None else None
            payload = await read_json(request, max_body, body_timeout)
            validate(endpoint, payload, max_messages)
            result = await router.dispatch(
                endpoint, payload, record,
                use_case=headers.get("x-use-case"), tier=headers.get("x-model-tier"),
                timeout=_timeout_header(headers["x-tiergate-timeout"]) if "x-tiergate-timeout" in headers else None,
                headers=_upstream_headers(headers) if "traceparent" in headers else None,
                cache_control=headers.get("cache-control"), api_key_name=key_name)
            if result.stream is None:
                return web.Response(body=result.body, headers=_result_headers(record),
                                    content_type="application/json")
            return await _relay_stream(request, result.stream, record)
        except TiergateError as exc:
            error = exc
            extra = {"x-tiergate-route": record.route} if record.route else None
            if isinstance(exc, UpstreamStatusError) and getattr(exc, "ref", None) is not None:
                record.ref = exc.ref  # type: ignore[attr-defined]
                record.attempts = exc.attempts  # type: ignore[attr-defined]
                record.tries = tried(record.attempts)
                extra = _result_headers(record)
            return error_response(exc, record.request_id, extra)
        except BaseException as exc:
            error = exc
            if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
                raise
            log.exception("unexpected error in %s (request %s)", name, record.request_id)
            return error_response(TiergateError("internal error in tiergate; see its log for "
                                                f"request {record.request_id}"), record.request_id)
        finally:
            router.finish(record, error)

    handler.__name__ = f"handle_{endpoint.operation}"
    return handler


async def _relay_stream(request: web.Request, chunks: AsyncIterator[bytes],
                        record: RequestRecord) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=_result_headers(record))
    response.content_type = "text/event-stream"
    response.headers["Cache-Control"] = "no-cache"
    try:
        await response.prepare(request)
        async for chunk in chunks:
            await response.write(chunk)
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
    return web.json_response({**request.app[ROUTER_KEY].get_health_status(), "pid": os.getpid()},
                             dumps=_dumps)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (issue 6); the whole pod's in multiprocess mode."""
    telemetry = request.app[ROUTER_KEY].telemetry
    if telemetry.metrics is None:
        return error_response(NotFoundError("metrics are off (ENABLE_MONITORING=false)"),
                              request.headers.get("x-request-id") or new_request_id())
    body, content_type = telemetry.render_metrics()
    return web.Response(body=body, headers={"Content-Type": content_type})


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
    auth = app[AUTH_KEY] = InboundAuth(router.config.api_keys)

    async def router_lifetime(app: web.Application) -> AsyncIterator[None]:
        await router.initialize()
        yield
        await router.close()

    app.cleanup_ctx.append(router_lifetime)
    # every route answers an unsupported `Expect` with an OpenAI-shaped 417 (aiohttp's default can 500)
    expect = {"expect_handler": expect_continue}
    app.router.add_post("/v1/chat/completions", make_handler(CHAT, router, auth), **expect)
    app.router.add_post("/v1/completions", make_handler(COMPLETIONS, router, auth), **expect)
    app.router.add_post("/v1/embeddings", make_handler(EMBEDDINGS, router, auth), **expect)
    app.router.add_get("/v1/models", list_models, **expect)
    app.router.add_get("/health", health, **expect)
    app.router.add_get("/ready", ready, **expect)
    app.router.add_get("/health/details", health_details, **expect)
    app.router.add_get("/metrics", metrics, **expect)
    app.router.add_get("/openapi.json", openapi_json, **expect)
    app.router.add_route("*", "/{tail:.*}", not_found, **expect)
    return app


async def serve(config: RouterConfig, *, started: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop`): then refuse new connections, mark not ready,
    let in-flight requests and streams finish up to `drain_timeout`, and close the pools."""
    router = Router(config, dynamic=bool(config.database_dsn))  # DATABASE_URL: the table lives in Postgres
    app = build_app(router)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.drain_timeout)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024,
                       reuse_port=True if config.workers > 1 else None)
    await site.start()
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
        await runner.cleanup()
        gc.set_threshold(*thresholds)
