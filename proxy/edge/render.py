"""What the edge writes back besides the provider's bytes: the `x-tiergate-*` headers of an answer, and
an error in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the headers a
client needs to act on it (the provider's, `x-should-retry`, Retry-After)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import orjson
from aiohttp import web

from ..engine.redaction import Redactor
from ..outcome import RequestRecord, tried
from ..types import InvalidRequestError, TiergateError, UpstreamError, UpstreamStatusError
from .headers import relayed_headers

log = logging.getLogger("tiergate")

_ATTEMPTS = tuple(map(str, range(16)))  # x-tiergate-attempts, without a str() per response

# an API family's own error body (the Endpoint's `error_body`; None: OpenAI's shape)
ErrorShape = Callable[[TiergateError], "bytes | None"]


def result_headers(record: RequestRecord, upstream: Mapping[str, str] | None = None,
                   secrets: Redactor | None = None) -> dict[str, str]:
    """The provider's headers that cross back (`secrets` masked in them), then tiergate's own: route,
    cache, attempts, model, cost."""
    ref = record.ref
    headers = relayed_headers(upstream, record.request_id, secrets)
    headers["x-tiergate-route"] = record.route
    headers["x-tiergate-cache"] = record.cache
    tries = record.tries
    headers["x-tiergate-attempts"] = _ATTEMPTS[tries] if 0 <= tries < 16 else str(tries)
    if ref is not None:
        headers["x-tiergate-model"] = f"{ref.provider}/{ref.model}"
        headers["x-tiergate-provider"] = ref.provider
    if record.strategy:  # a route that chose per request says how
        headers["x-tiergate-strategy"] = record.strategy
    if record.cost_usd is not None:  # known for non-stream responses of priced models
        headers["x-tiergate-cost-usd"] = f"{record.cost_usd:.10f}".rstrip("0").rstrip(".") or "0"
    return headers


def redact_error(exc: TiergateError, redactor: Redactor) -> None:
    """Mask `redactor`'s secrets in what `exc` relays of a provider's answer: its body, message, headers
    (for a secret only this request carried, a client's own provider key)."""
    exc.message = redactor.redact_text(exc.message)
    if isinstance(exc, UpstreamStatusError):
        exc.body = redactor.redact(exc.body)
    headers = getattr(exc, "headers", None)
    if headers:
        exc.headers = redactor.headers(headers)  # type: ignore[attr-defined]


def error_response(exc: TiergateError, request_id: str, extra: dict[str, str] | None = None,
                   shape: ErrorShape | None = None) -> web.Response:
    """The error in OpenAI's shape, or the shape of the client's API family (`shape`). An error
    decided upstream carries the provider's headers
    (Retry-After, x-ratelimit-*, its x-request-id) and `x-should-retry: false`: tiergate has spent its
    attempts already, so the SDK does not multiply them."""
    upstream = getattr(exc, "headers", None)  # only the errors decided upstream have them
    headers = relayed_headers(upstream, request_id) if upstream else {"x-request-id": request_id}
    if extra:
        headers.update(extra)
    if getattr(exc, "tried", False):
        headers["x-should-retry"] = "false"
    body = shape(exc) if shape is not None else None
    if isinstance(exc, UpstreamStatusError) and body is None:
        return web.Response(body=exc.body, status=exc.status, headers=headers,
                            content_type=exc.content_type.split(";")[0])
    retry_after = getattr(exc, "retry_after", None)  # tiergate's limits and the upstream's 429s
    if retry_after is not None and "retry-after" not in {k.lower() for k in headers}:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        headers["retry-after-ms"] = str(max(1, int(retry_after * 1000)))
    return web.Response(body=exc.to_body() if body is None else body, status=exc.status,
                        headers=headers, content_type="application/json")


def request_error(exc: TiergateError, record: RequestRecord, shape: ErrorShape | None = None) -> web.Response:
    """A request's error, with what is known of where it went: its route and attempts, and the
    model whose answer decided it when a provider's own error is passed through."""
    extra = {"x-tiergate-route": record.route} if record.route else None
    if extra is not None and isinstance(exc, UpstreamError):
        extra["x-tiergate-attempts"] = str(tried(exc.attempts))
    if isinstance(exc, UpstreamStatusError) and exc.ref is not None:
        record.ref = exc.ref
        record.attempts = exc.attempts
        record.tries = tried(record.attempts)
        extra = result_headers(record)
        del extra["x-request-id"]  # the provider's, relayed by error_response
    return error_response(exc, record.request_id, extra, shape)


def failure(exc: BaseException, record: RequestRecord, shape: ErrorShape | None = None
            ) -> tuple[BaseException, web.Response]:
    """The answer to a request that raised `exc` (anything but a cancellation or the client leaving:
    those have no one to answer), and the error its record is finished with; `shape`: the client's API
    family's error body, when it is not OpenAI's."""
    if isinstance(exc, TiergateError):
        return exc, request_error(exc, record, shape)
    if isinstance(exc, (orjson.JSONEncodeError, RecursionError)):  # a body nested deeper than re-encoding allows
        error = InvalidRequestError("the request body cannot be forwarded: it is nested too deeply")
        return error, request_error(error, record, shape)
    log.exception("unexpected error in %s (request %s)", record.endpoint, record.request_id)
    return exc, error_response(TiergateError("internal error in tiergate; see its log for request "
                                             f"{record.request_id}"), record.request_id, shape=shape)
