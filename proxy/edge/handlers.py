"""The routes' own work, plugged into the pipeline: the routed endpoints (read and check the body,
`Router.dispatch`, write the answer or relay its stream) and tiergate's model list."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..engine.dispatch import stream_error_event
from ..engine.redaction import Redactor
from ..outcome import CLIENT_CLOSED, RequestRecord
from ..table.keys import secrets_of_credentials
from ..table.routing import RouteDecision
from ..types import InvalidRequestError, NotFoundError, RequestTimeoutError, RequestTooLargeError, TiergateError
from .auth import InboundAuth, client_provider_key
from .headers import request_filter
from .pipeline import DRAIN, Locate, Serve, Target
from .render import redact_error, result_headers

if TYPE_CHECKING:
    from ..adapters import Endpoint
    from ..engine.router import Router
    from ..table.keys import InboundKey

# what a call answered by tiergate itself is admitted as: no route, no provider (key-wide limits apply)
LOCAL = RouteDecision("models", ())


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


def routed_endpoint(endpoint: Endpoint, router: Router, auth: InboundAuth) -> Serve:
    """An endpoint tiergate routes: the body read once and checked by its adapter, then
    `Router.dispatch` (which admits it with the route it resolves), the answer written or relayed.
    `auth`: tiergate's inbound keys, which a client's own provider key must not be."""
    config = router.config
    max_body, body_timeout, max_messages = config.max_body_bytes, config.client_body_timeout, config.max_messages
    # `x-api-key` is the client's key (tiergate's, when it has keys: auth.py), never sent on
    forwarded = request_filter((*config.drop_headers, "x-api-key"))
    providers = router.providers  # one dict for the router's life, changed in place by a new table

    async def serve(request: web.Request, record: RequestRecord, key: InboundKey | None) -> web.StreamResponse:
        headers = request.headers
        payload = await read_json(request, max_body, body_timeout)
        query = request.query_string
        target = endpoint.at_query(query) if query else endpoint
        target.validate(payload, max_messages)
        upstream_headers = forwarded(headers)
        own_key = key_name = check_scope = credentials = None
        if key is not None:  # its name scopes limits, its scopes the route, its credentials the providers
            key_name = key.name
            if key.scope is not None:
                check_scope = key.check
            if key.credentials:
                credentials = key.credentials
        if router.byok:  # a provider takes the client's own key: as its Authorization, never tiergate's key
            own_key = client_provider_key(headers, auth)
            if own_key is not None:
                upstream_headers["authorization"] = f"Bearer {own_key}"
        try:
            result = await router.dispatch(
                target, payload, record,
                use_case=headers.get("x-use-case"), tier=headers.get("x-model-tier"),
                timeout=_deadline(headers, payload.get("stream") is True), headers=upstream_headers,
                cache_control=headers.get("cache-control"), api_key_name=key_name, check_scope=check_scope,
                credentials=credentials)
        except TiergateError as exc:
            if own_key is not None or credentials is not None:
                redact_error(exc, _own_secrets(own_key, credentials))
            raise
        if own_key is not None or credentials is not None:
            result.headers = _own_secrets(own_key, credentials).headers(result.headers or {})
        provider = providers.get(result.ref.provider)  # what tiergate sent it, kept out of the headers
        secrets = provider.redactor if provider is not None else None
        if result.stream is None:
            return web.Response(body=result.body, headers=result_headers(record, result.headers, secrets),
                                content_type="application/json")
        return await relay_stream(request, result.stream, record, result.headers, target.stream_error, secrets)

    return serve


def _own_secrets(own_key: str | None, credentials: Mapping[str, Mapping[str, str]] | None) -> Redactor:
    """What this request alone sends providers (a client's own provider key, the inbound key's
    credentials), masked in what is relayed back."""
    return Redactor((own_key, *secrets_of_credentials(credentials or {})))


async def relay_stream(request: web.Request, chunks: AsyncIterator[bytes], record: RequestRecord,
                       upstream: Mapping[str, str] | None = None,
                       error_event: Callable[..., bytes] = stream_error_event,
                       secrets: Redactor | None = None) -> web.StreamResponse:
    """The stream written to the client as it comes; one the drain cuts ends with `error_event`, the
    error event of the client's API (its endpoint's `stream_error`); `secrets` masked in its headers."""
    headers = result_headers(record, upstream, secrets)
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
            await response.write(error_event("tiergate is shutting down; the stream was cut before its end",
                                             code="server_shutting_down"))
            await response.write_eof()
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    return response


def model_list(router: Router) -> Locate:
    """`GET /v1/models`: tiergate's routes, aliases and models, answered here."""
    async def locate(request: web.Request, record: RequestRecord) -> Target:
        return Target(LOCAL, {}, lambda decision: local_answer(record, {"object": "list",
                                                                        "data": router.list_models()}))

    return locate


def model_entry(router: Router, passthrough: Locate) -> Locate:
    """`GET /v1/models/{id}`: tiergate's own ids (routes, aliases, models it routes to or discovered)
    answered here, any other passed through."""
    async def locate(request: web.Request, record: RequestRecord) -> Target:
        model_id = "/".join(request.rel_url.parts[3:])  # after /v1/models/, each segment decoded
        entry = next((e for e in router.list_models() if e["id"] == model_id), None)
        if entry is not None:
            return Target(LOCAL, {}, lambda decision: local_answer(record, entry))
        if router.table.passthrough_for(request.path) is None:
            raise NotFoundError(f"the model {model_id!r} does not exist: it is no route, alias or model of "
                                "tiergate's table, and no pass-through provider is set", param="model",
                                code="model_not_found")
        record.endpoint = "passthrough"
        return await passthrough(request, record)

    return locate


async def local_answer(record: RequestRecord, body: Any) -> web.Response:
    record.status = 200
    return web.Response(body=orjson.dumps(body), content_type="application/json")
