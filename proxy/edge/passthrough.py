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
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from ..engine.redaction import Redactor
from ..fleet.affinity import Holder
from ..outcome import CLIENT_CLOSED, RequestRecord
from ..table.keys import secrets_of_credentials
from ..table.routing import RouteDecision
from ..types import InvalidRequestError, ModelRef, NotFoundError, RequestTooLargeError, UpstreamError
from .auth import AUTH_KEY, client_provider_key
from .headers import FORWARDING, HOP_BY_HOP
from .ownership import Keep, PageSource, as_is, guard
from .paths import canonical_target, is_unusual, refuse
from .pipeline import KEY_ITEM, Locate, Target

if TYPE_CHECKING:
    from ..engine.providers import Provider
    from ..engine.router import Router
    from ..table.routing import RoutingTable

log = logging.getLogger("tiergate")

# the body is re-framed (and decoded: aiohttp inflates a compressed request), the key is the provider's,
# or the client's own provider key (`pass_client_key`), never the client's Authorization or x-api-key
# (tiergate's key: auth.py)
_NOT_FORWARDED = HOP_BY_HOP | FORWARDING | {"host", "content-length", "content-encoding", "x-use-case",
                                            "x-model-tier", "expect", "cookie", "authorization", "x-api-key"}
# as on the routed paths: what belongs to the provider's own site (its cookies, HSTS, alt-svc) is not
# tiergate's to hand its clients, who would keep it for tiergate's host
_NOT_RELAYED = HOP_BY_HOP | {"content-encoding", "content-length", "server", "date", "set-cookie", "alt-svc",
                             "strict-transport-security"}
_CHUNK = 64 * 1024
STORED_CHATS = "/v1/chat/completions"  # its GET lists the chat answers kept with `store: true`: passed through


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
    connection = {t.strip().lower() for t in upstream.get("Connection", "").split(",")}
    out: dict[str, str] = {}
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in _NOT_RELAYED and lower not in connection:
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


async def forward(request: web.Request, router: Router, provider_name: str, record: RequestRecord,
                  **options: Any) -> web.StreamResponse:
    """`send_upstream` after the stored-objects check (ownership.py): another key's object is not found, and what
    the answer creates is the key's, a list only the key's."""
    keep = await guard(router.owners, record.key_name, request.method, request.path, options.get("body"))
    return await send_upstream(request, router, provider_name, record, keep=keep, **options)


async def send_upstream(request: web.Request, router: Router, provider_name: str, record: RequestRecord, *,
                        body: bytes | None = None, model: str | None = None, head: bytes = b"",
                        length_change: int = 0, keep: Keep = as_is,
                        query: Mapping[str, str] | None = None) -> web.StreamResponse:
    """Send the client's request to `provider_name` and stream the answer back. `body`: a rewritten
    JSON body; None streams the client's own body (if any) through, after `head` (the start of it,
    already read, maybe rewritten: `length_change` bytes longer than the client sent). `query`: a
    rewritten query string (else the client's, as sent)."""
    config = router.config
    provider = router.providers.get(provider_name)
    record.route = record.route or "passthrough"
    record.ref = ModelRef(provider_name, model or "-")
    if provider is None or provider.session is None:  # the table's choice (a mock), not a failing upstream
        raise NotFoundError(f"tiergate does not serve {request.method} {request.path} itself and provider "
                            f"{provider_name!r} takes no pass-through calls (it is not an HTTP provider)")
    raw_path = request.raw_path
    if not raw_path.startswith("/v1/") or (is_unusual(raw_path) and canonical_target(raw_path) is not None):
        raise refuse(raw_path, "it is not in its canonical form")  # the pipeline serves only canonical paths
    owned = provider.protected | frozenset(h.lower() for h in config.drop_headers)
    headers = forwarded_headers(request.headers, owned)
    headers, redactor = _own_credentials(request, provider, headers)
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
    url = _upstream_url(provider.base_url, raw_path, query)
    timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_read=config.timeout)
    if keep.lists:  # a list filtered to the key's objects: further pages of the provider's may fill it
        keep.pages = PageSource(provider.session, url, headers, timeout, redactor,
                                request.query if query is None else query)
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
        out = relayed_headers(redactor.headers(upstream.headers))
        out["x-tiergate-request-id"] = record.request_id
        out["x-tiergate-provider"] = provider_name
        out.setdefault("x-request-id", record.request_id)
        if model is not None:
            out["x-tiergate-model"] = f"{provider_name}/{model}"
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=keep(upstream, out))
        record.status = upstream.status
        await response.prepare(request)
        async for chunk in keep.chunks(redactor.stream(upstream.content.iter_chunked(_CHUNK))):  # masks keep length
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


def _upstream_url(base_url: str, raw_path: str, query: Mapping[str, str] | None) -> URL:
    """`base_url` + the path under /v1, with the client's query string as sent, or `query` in its place."""
    url = URL(base_url + raw_path[len("/v1"):], encoded=True)
    return url if query is None else url.with_query(query)


def _own_credentials(request: web.Request, provider: Provider, headers: dict[str, str]
                     ) -> tuple[dict[str, str], Redactor]:
    """The headers with what this request's caller sends the provider in place of tiergate's, and the
    redactor that masks it (with the provider's own secrets) in the answer: a bring-your-own-key
    client's provider key, the inbound key's own project or provider key."""
    redactor = provider.redactor
    if provider.spec.pass_client_key:  # bring-your-own-key: the client's own provider key, never tiergate's
        own_key = client_provider_key(request.headers, request.app[AUTH_KEY])
        if own_key is not None:
            headers.update(provider.client_key_headers(own_key))
            redactor = redactor.with_secret(own_key)
    key = request.get(KEY_ITEM)
    if key is not None and provider.name in key.credentials:  # the inbound key's own project / provider key
        own = key.credentials[provider.name]
        headers = {name: value for name, value in headers.items() if name.lower() not in own}
        headers.update(own)
        redactor = Redactor((*redactor.secrets, *secrets_of_credentials({provider.name: own})))
    return headers, redactor


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


def passthrough(router: Router, local_paths: frozenset[str]) -> Locate:
    """Every `/v1/*` path tiergate does not serve itself: to the provider a JSON body's or a form's `model`
    names (a route, alias or provider/model), else to the table's pass-through provider for the path."""
    config = router.config

    async def locate(request: web.Request, record: RequestRecord) -> Target:
        if request.path in local_paths and not (request.method == "GET" and request.path == STORED_CHATS):
            # tiergate's own path, another method (a GET of the chat path lists the answers kept with `store`)
            error = InvalidRequestError(f"{request.method} is not allowed on {request.path}",
                                        code="method_not_allowed")
            error.status = 405
            raise error
        table = router.table
        if request.method == "GET" and request.path == STORED_CHATS and "model" in request.query:
            listed = _stored_chats_target(request, router, record)
            if listed is not None:
                return listed
        raw = await _json_body(request, config.max_body_bytes, config.client_body_timeout)
        if raw is not None:
            return _json_target(request, router, record, raw)
        head, span = await _multipart_head(request)
        if span is not None:
            decision = table.known_model(head[span[0]:span[1]].decode("utf-8", "replace"))
            if decision is not None:  # the form's `model` names a route or alias: rewritten, nothing else
                return Target(decision, {}, lambda admitted: _send_form(request, router, record, admitted,
                                                                        head, span))
        provider = _provider(table, request)
        return Target(_passed(provider, None), {}, lambda admitted: forward(request, router, provider, record,
                                                                           head=head))

    return locate


def _stored_chats_target(request: web.Request, router: Router, record: RequestRecord) -> Target | None:
    """The stored chat answers listed `model=` a route, alias or provider/model: at the provider its first
    candidate names, filtered by that model's id (as a chat call naming it was sent); None for any other."""
    decision = router.table.known_model(request.query["model"])  # an over-long model or a CR/LF: a 400
    if decision is None:
        return None

    async def send(admitted: RouteDecision) -> web.StreamResponse:
        ref = admitted.candidates[0]
        record.route = admitted.name
        return await forward(request, router, ref.provider, record, model=ref.model,
                             query={**request.query, "model": ref.model})

    return Target(decision, {}, send)


def _json_target(request: web.Request, router: Router, record: RequestRecord, raw: bytes) -> Target:
    """A JSON body: its `model` says where it goes, and its fields are what limits estimate from."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        provider = _provider(router.table, request)
        return Target(_passed(provider, None), {}, lambda admitted: forward(request, router, provider, record,
                                                                           body=raw))
    model = payload.get("model")
    decision = router.table.known_model(model)  # an over-long model, or one with a CR/LF, is a 400 here
    if decision is None:
        provider = _provider(router.table, request)
        model = payload.get("model")
        model = model if isinstance(model, str) else None
        return Target(_passed(provider, model), payload,
                      lambda admitted: forward(request, router, provider, record, body=raw, model=model))

    async def send(admitted: RouteDecision) -> web.StreamResponse:  # a route or alias: where it points
        ref = admitted.candidates[0]
        payload["model"] = ref.model
        record.route = admitted.name
        return await forward(request, router, ref.provider, record, body=orjson.dumps(payload), model=ref.model)

    return Target(decision, payload, send)


async def _send_form(request: web.Request, router: Router, record: RequestRecord, admitted: RouteDecision,
                     head: bytes, span: tuple[int, int]) -> web.StreamResponse:
    """A multipart body whose `model` names a route or alias: that field rewritten, the rest streamed."""
    ref = admitted.candidates[0]
    new = ref.model.encode()
    record.route = admitted.name
    return await forward(request, router, ref.provider, record, model=ref.model,
                         head=head[:span[0]] + new + head[span[1]:], length_change=len(new) - (span[1] - span[0]))


def _provider(table: RoutingTable, request: web.Request) -> str:
    provider = table.passthrough_for(request.path)
    if provider is None:
        raise NotFoundError(
            f"tiergate does not serve {request.method} {request.path} itself and the routing table names "
            "no pass-through provider for it: set `passthrough_provider` (or `passthrough_paths`) in the "
            "routing table")
    return provider


def _passed(provider: str, model: str | None) -> RouteDecision:
    """What a call passed through to `provider` is admitted as (key- and model-scoped limits apply)."""
    return RouteDecision("passthrough", (ModelRef(provider, model or "-"),))


def stored_chat(router: Router, passthrough: Locate) -> Locate:
    """`/v1/chat/completions/{id}[/messages]`: a chat answer kept with `store: true`, at the provider that
    gave it; one tiergate did not see kept goes where any other path goes (the pass-through provider)."""

    async def locate(request: web.Request, record: RequestRecord) -> Target:
        stored_id = request.match_info["id"]
        holder = await router.affinity.lookup(stored_id)
        if holder is None:
            return await passthrough(request, record)
        record.route = "stored_chat"
        return Target(_passed(holder.provider, holder.model), {},  # the key that made it, inside its scopes then
                      lambda admitted: _send_kept(request, router, record, holder, stored_id), scoped=False)

    return locate


async def _send_kept(request: web.Request, router: Router, record: RequestRecord, holder: Holder,
                     stored_id: str) -> web.StreamResponse:
    response = await forward(request, router, holder.provider, record)  # another key's: not found (ownership.py)
    if request.method == "DELETE" and response.status == 200 and len(request.rel_url.parts) == 5:
        await router.affinity.forget(stored_id)
    return response


def stored_response(router: Router, passthrough: Locate) -> Locate:
    """`/v1/responses/{id}[/{action}]`: to the provider that holds the id, never elsewhere."""

    async def locate(request: web.Request, record: RequestRecord) -> Target:
        parts = request.rel_url.parts  # ("/", "v1", "responses", id[, action])
        response_id = parts[3]
        holder = await router.affinity.lookup(response_id)
        if holder is None and request.method == "POST" and len(parts) == 4:
            record.endpoint = "passthrough"  # e.g. /v1/responses/input_tokens: not an id
            return await passthrough(request, record)
        record.route = "stored_response"
        held = _holder(holder, response_id)
        return Target(_passed(held.provider, held.model), {},  # the key that made it, inside its scopes then
                      lambda admitted: _send_stored(request, router, record, held, response_id), scoped=False)

    return locate


async def _send_stored(request: web.Request, router: Router, record: RequestRecord, holder: Holder,
                       response_id: str) -> web.StreamResponse:
    if record.key_name is not None and holder.owner != record.key_name:  # another key's: not found (once admitted)
        _holder(None, response_id)
    response = await forward(request, router, holder.provider, record, model=holder.model)
    if request.method == "DELETE" and response.status == 200:
        await router.affinity.forget(response_id)
    return response


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
