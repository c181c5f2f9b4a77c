"""Pass-through: the OpenAI API paths tiergate does not route itself, forwarded to one provider.

`/v1/<rest>` goes to `<provider base_url>/<rest>` with the method and query string kept, the
provider's auth, the client's headers (minus hop-by-hop, Host, its Authorization, tiergate's own
and the routing headers), and both bodies streamed: an upload or a binary answer is never held
whole. Which provider: the table's `passthrough_paths` (longest prefix) or `passthrough_provider`;
a JSON body whose `model` names a route, alias or provider/model goes where that names instead,
with `model` rewritten as for chat. Stored Responses ids go to the provider that holds them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from ..fleet.affinity import Holder
from ..outcome import CLIENT_CLOSED, RequestRecord
from ..types import (
    InvalidRequestError,
    ModelRef,
    NotFoundError,
    RequestTooLargeError,
    TiergateError,
    UpstreamError,
)
from .auth import InboundAuth

if TYPE_CHECKING:
    from ..engine.router import Router

log = logging.getLogger("tiergate")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
# the body is re-framed (and decoded: aiohttp inflates a compressed request), the key is the provider's
# (the client's Authorization is dropped by the provider's protected names, unless it takes the client's
# own key: `pass_client_key`)
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "content-encoding", "x-use-case", "x-model-tier",
                               "expect", "cookie"}
_NOT_RELAYED = HOP_BY_HOP | {"content-encoding", "content-length", "server", "date"}
_CHUNK = 64 * 1024


class _UploadTooLarge(Exception):
    pass


def forwarded_headers(incoming: Mapping[str, str], provider_owned: frozenset[str]) -> dict[str, str]:
    """The client's headers that go upstream; the provider's own (its key, the table's headers) win."""
    connection = {t.strip().lower() for t in incoming.get("Connection", "").split(",")}
    out: dict[str, str] = {}
    for name, value in incoming.items():
        lower = name.lower()
        if (lower in _NOT_FORWARDED or lower in connection or lower.startswith("x-tiergate-")
                or lower in provider_owned):
            continue
        out[name] = value
    return out


def relayed_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The provider's response headers that go back to the client."""
    out: dict[str, str] = {}
    for name, value in upstream.items():
        if name.lower() not in _NOT_RELAYED:
            out[name] = value
    if "Content-Length" in upstream and "Content-Encoding" not in upstream:
        out["Content-Length"] = upstream["Content-Length"]  # the body passes unchanged: its length holds
    return out


async def _limited(content: Any, limit: int, flag: list[bool], head: bytes = b"") -> AsyncIterator[bytes]:
    """The client's body in chunks as they arrive (after `head`, what was read of it already),
    cut off past `limit` bytes."""
    seen = len(head)
    if head:
        yield head
    async for chunk in content.iter_chunked(_CHUNK):
        seen += len(chunk)
        if seen > limit:
            flag.append(True)
            raise _UploadTooLarge()
        yield chunk


async def forward(request: web.Request, router: Router, provider_name: str, record: RequestRecord, *,
                  body: bytes | None = None, model: str | None = None, head: bytes = b"",
                  length_change: int = 0) -> web.StreamResponse:
    """Send the client's request to `provider_name` and stream the answer back. `body`: a rewritten
    JSON body; None streams the client's own body (if any) through, after `head` (the start of it,
    already read, maybe rewritten: `length_change` bytes longer than the client sent)."""
    config = router.config
    provider = router.providers.get(provider_name)
    record.route = record.route or "passthrough"
    record.ref = ModelRef(provider_name, model or "-")
    if provider is None or provider.session is None:
        raise UpstreamError(f"provider {provider_name!r} cannot serve pass-through calls (it is not an HTTP "
                            "provider, or not started)", status=502, code="passthrough_unavailable")
    owned = provider.protected | frozenset(h.lower() for h in config.drop_headers)
    headers = forwarded_headers(request.headers, owned)
    too_large: list[bool] = []
    data: Any = None
    if body is not None:
        data = body
    elif request.body_exists:
        limit = config.passthrough_max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise RequestTooLargeError(f"request body of {length} bytes is over the pass-through limit of {limit} "
                                       "bytes (TIERGATE_PASSTHROUGH_MAX_BODY_BYTES)")
        if length is not None and "Content-Encoding" not in request.headers:
            headers["Content-Length"] = str(length + length_change)  # as it came: no chunked re-framing
        data = _limited(request.content, limit, too_large, head)
    url = URL(provider.base_url + request.raw_path[len("/v1"):], encoded=True)
    timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_read=config.timeout)
    try:
        upstream = await provider.session.request(request.method, url, data=data, headers=headers,
                                                  timeout=timeout, allow_redirects=False)
    except _UploadTooLarge:
        raise RequestTooLargeError(f"request body is over the pass-through limit of "
                                   f"{config.passthrough_max_body_bytes} bytes") from None
    except TimeoutError:
        raise UpstreamError(f"{provider_name} did not answer {request.method} {request.path} in time",
                            status=504, code="upstream_timeout") from None
    except (aiohttp.ClientError, OSError) as exc:
        if too_large:
            raise RequestTooLargeError(f"request body is over the pass-through limit of "
                                       f"{config.passthrough_max_body_bytes} bytes") from None
        raise UpstreamError(f"{provider_name} could not be reached for {request.method} {request.path} "
                            f"({type(exc).__name__})", status=502, code="upstream_unreachable") from None
    try:
        out = relayed_headers(upstream.headers)
        out["x-tiergate-request-id"] = record.request_id
        out["x-tiergate-provider"] = provider_name
        out.setdefault("x-request-id", record.request_id)
        if model is not None:
            out["x-tiergate-model"] = f"{provider_name}/{model}"
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=out)
        record.status = upstream.status
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response
    except ConnectionResetError:  # writing to the client failed (aiohttp's ClientConnectionResetError): it left
        record.status, record.error = 499, CLIENT_CLOSED
        return response
    except (aiohttp.ClientError, TimeoutError) as exc:  # the upstream broke off mid-body: cut the client off too
        record.status, record.error = 502, f"upstream_{type(exc).__name__}"
        log.warning("%s broke off the pass-through answer to %s %s (request %s): %s", provider_name,
                    request.method, request.path, record.request_id, type(exc).__name__)
        if request.transport is not None:
            request.transport.close()  # no end of body: the client sees an answer cut short, not a complete one
        return response
    finally:
        upstream.release()


async def _json_body(request: web.Request, limit: int, timeout: float) -> bytes | None:
    """A JSON body small enough to look at (for its `model`); None when it is not one."""
    if request.content_type != "application/json" or not request.body_exists:
        return None
    length = request.content_length
    if length is None or length > limit:
        return None
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise InvalidRequestError(f"the request body did not arrive within {timeout} seconds") from None


_MULTIPART_HEAD_LIMIT = 64 * 1024  # the form fields before the first file, where the SDKs put `model`
_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?')


async def _multipart_head(request: web.Request) -> tuple[bytes, tuple[int, int] | None]:
    """Read a multipart body up to its `model` field (the SDKs send plain fields before files) and
    return what was read and where the field's value is in it. Stops at the first file part or
    after 64 KiB: the body is otherwise not parsed, and what was read is sent on unchanged."""
    if request.content_type != "multipart/form-data" or not request.body_exists:
        return b"", None
    found = _BOUNDARY.search(request.headers.get("Content-Type", ""))
    if found is None:
        return b"", None
    delimiter = b"\r\n--" + found[1].encode("latin-1")
    field = re.compile(rb'(?:^|\r\n)--' + re.escape(found[1].encode("latin-1")) +
                       rb'\r\nContent-Disposition:[ \t]*form-data;[ \t]*name="?model"?\r\n(?:[^\r\n]+\r\n)*\r\n',
                       re.IGNORECASE)
    head = b""
    while len(head) < _MULTIPART_HEAD_LIMIT:
        chunk = await request.content.readany()
        if not chunk:
            break
        head += chunk
        match = field.search(head)
        if match is not None:
            end = head.find(delimiter, match.end())
            if end >= 0:
                return head, (match.end(), end)
            continue
        if b"filename=" in head:  # a file part came first: no `model` field to look at
            break
    return head, None


def make_passthrough_handler(router: Router, auth: InboundAuth, local_paths: frozenset[str],
                             not_found: Handler) -> Handler:
    """The handler of every `/v1/*` path tiergate does not serve itself."""
    config = router.config

    async def passthrough(request: web.Request) -> web.StreamResponse:
        if request.path in local_paths:  # tiergate's own path, another method: its 405
            return await not_found(request)
        record = RequestRecord(_request_id(request), "passthrough")
        error: BaseException | None = None
        try:
            auth.check(request.headers.get("Authorization"))
            table = router.table
            raw = await _json_body(request, config.max_body_bytes, config.client_body_timeout)
            payload: Any = None
            if raw is not None:
                try:
                    payload = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    payload = None
                decision = table.known_model(payload.get("model")) if isinstance(payload, dict) else None
                if decision is not None:  # a route or alias: where it points, with its model id
                    ref = decision.candidates[0]
                    payload["model"] = ref.model
                    record.route = decision.name
                    return await forward(request, router, ref.provider, record, body=orjson.dumps(payload),
                                         model=ref.model)
            head, span = (await _multipart_head(request)) if raw is None else (b"", None)
            if span is not None:
                decision = table.known_model(head[span[0]:span[1]].decode("utf-8", "replace"))
                if decision is not None:  # the form's `model` names a route or alias: rewritten, nothing else
                    ref = decision.candidates[0]
                    new = ref.model.encode()
                    record.route = decision.name
                    return await forward(request, router, ref.provider, record, model=ref.model,
                                         head=head[:span[0]] + new + head[span[1]:],
                                         length_change=len(new) - (span[1] - span[0]))
            provider = table.passthrough_for(request.path)
            if provider is None:
                raise NotFoundError(
                    f"tiergate does not serve {request.method} {request.path} itself and the routing table names "
                    "no pass-through provider for it: set `passthrough_provider` (or `passthrough_paths`) in the "
                    "routing table")
            model = payload.get("model") if isinstance(payload, dict) else None
            return await forward(request, router, provider, record, body=raw, head=head,
                                 model=model if isinstance(model, str) else None)
        except BaseException as exc:
            error = exc
            return _error_or_raise(exc, record)
        finally:
            router.finish(record, error)

    return passthrough


def make_stored_response_handler(router: Router, auth: InboundAuth, passthrough: Handler) -> Handler:
    """`/v1/responses/{id}[/...]`: to the provider that holds the id, never elsewhere."""

    async def stored_response(request: web.Request) -> web.StreamResponse:
        response_id = request.match_info["id"]
        holder = await router.affinity.lookup(response_id)
        if holder is None and request.method == "POST" and "action" not in request.match_info:
            return await passthrough(request)  # e.g. /v1/responses/input_tokens: not an id
        record = RequestRecord(_request_id(request), "responses")
        record.route = "stored_response"
        error: BaseException | None = None
        try:
            auth.check(request.headers.get("Authorization"))
            provider = _holder(holder, response_id)
            response = await forward(request, router, provider.provider, record, model=provider.model)
            if request.method == "DELETE" and response.status == 200:
                await router.affinity.forget(response_id)
            return response
        except BaseException as exc:
            error = exc
            return _error_or_raise(exc, record)
        finally:
            router.finish(record, error)

    return stored_response


def _holder(holder: Holder | None, response_id: str) -> Holder:
    if holder is None:
        raise NotFoundError(f"response {response_id!r} is unknown to tiergate: it was not created through it, "
                            "or its record has expired (set TIERGATE_REDIS_URL so that a fleet shares them)",
                            param="response_id", code="response_not_found")
    if holder.translated:
        raise NotFoundError(f"response {response_id!r} was answered by provider {holder.provider!r}, which serves "
                            "only Chat Completions (tiergate translated the call): it is not stored anywhere",
                            param="response_id", code="response_not_stored")
    return holder


def make_model_handler(router: Router, auth: InboundAuth, passthrough: Handler) -> Handler:
    """`GET /v1/models/{id}`: tiergate's own ids (routes, aliases, models it routes to or discovered)
    answered here, any other passed through."""

    async def retrieve_model(request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["id"]
        try:
            auth.check(request.headers.get("Authorization"))
        except TiergateError as exc:
            return _error_response(exc, _request_id(request))
        for entry in router.list_models():
            if entry["id"] == model_id:
                return web.Response(body=orjson.dumps(entry), content_type="application/json")
        if router.table.passthrough_for(request.path) is None:
            return _error_response(NotFoundError(f"the model {model_id!r} does not exist: it is no route, alias or "
                                                 "model of tiergate's table, and no pass-through provider is set",
                                                 param="model", code="model_not_found"), _request_id(request))
        return await passthrough(request)

    return retrieve_model


def _request_id(request: web.Request) -> str:
    from ..engine.router import new_request_id

    return request.headers.get("x-request-id") or new_request_id()


def _error_or_raise(exc: BaseException, record: RequestRecord) -> web.StreamResponse:
    if isinstance(exc, TiergateError):
        return _error_response(exc, record.request_id)
    if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
        raise exc
    log.exception("unexpected error in pass-through (request %s)", record.request_id)
    return _error_response(TiergateError("internal error in tiergate; see its log for request "
                                         f"{record.request_id}"), record.request_id)


def _error_response(exc: TiergateError, request_id: str) -> web.Response:
    headers = {"x-request-id": request_id}
    return web.Response(body=exc.to_body(), status=exc.status, headers=headers, content_type="application/json")
