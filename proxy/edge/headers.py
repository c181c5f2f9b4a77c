"""Which headers cross tiergate, each way.

The client's request headers go upstream as sent (a provider acts on `OpenAI-Organization`,
`OpenAI-Project`, `OpenAI-Beta`, `Idempotency-Key`, vendors' headers) except those that are
tiergate's or the connection's; the provider's response headers come back (`x-ratelimit-*`, its
`x-request-id`, `openai-processing-ms`) except hop-by-hop ones and the framing of a body tiergate
re-frames. Both run on every request: the names a client or provider sends repeat from one request
to the next, so which of them pass is worked out once per set of names, and the copy only visits
the headers that pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..outcome import new_request_id

if TYPE_CHECKING:
    from ..engine.redaction import Redactor

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade"})

# What the client says about the hops before tiergate: never forwarded. A provider is no party to the
# client's network, a client can write anything there, and tiergate adds none of its own (it is the
# provider's client); a deployment that wants the address kept has its ingress log it.
FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                        "x-forwarded-port", "x-real-ip", "via", "true-client-ip", "cf-connecting-ip"})

# Client headers that never go upstream: hop-by-hop ones, the framing of a body tiergate re-encodes,
# the routing headers, and the client's Authorization (replaced by the provider's key unless the
# provider takes the client's own: `pass_client_key`). `x-tiergate-*` never go either.
NOT_FORWARDED = HOP_BY_HOP | FORWARDING | frozenset({
    "host", "content-length", "content-type", "content-encoding", "accept-encoding", "expect", "cookie",
    "x-use-case", "x-model-tier", "authorization"})

# The provider's response headers a client must not get from tiergate's answer: hop-by-hop ones, the
# framing and encoding of a body tiergate re-frames (aiohttp has decoded it), and what belongs to the
# provider's own site (cookies, HSTS, alt-svc).
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | frozenset({
    "content-length", "content-encoding", "content-type", "date", "server", "set-cookie", "alt-svc",
    "strict-transport-security"})

_PLAIN_CONNECTION = frozenset({"", "keep-alive", "close"})  # what SDKs send: names no other header
_PLANS_MAX = 512  # distinct sets of header names remembered (clients and providers repeat theirs)
# (name in the copy, position in the headers) of each header that passes; and the position of a
# `Connection` header (-1: none), whose value names more hop-by-hop headers
_Plan = tuple[tuple[tuple[str, int], ...], int]


class HeaderFilter:
    """Copies the headers of a mapping that are not in `drop` (lower-case names; a prefix too)."""

    __slots__ = ("drop", "prefix", "lower", "_plans")

    def __init__(self, drop: frozenset[str], *, prefix: str | None = None, lower: bool = False):
        self.drop = drop
        self.prefix = prefix
        self.lower = lower  # give the copy lower-case names
        self._plans: dict[tuple[str, ...], _Plan] = {}

    def __call__(self, headers: Mapping[str, str]) -> dict[str, str]:
        names = tuple(headers)  # a mapping iterates its names (a multidict's each time they occur)
        found = self._plans.get(names)
        if found is None:
            found = self._plan(names)
        plan, connection = found
        copy: dict[str, str] = {}
        if plan:  # often none passes (a provider's answer with only framing headers)
            values = tuple(headers.values())
            # a loop over the passing headers: `dict(zip(names, map(values.__getitem__, ...)))` costs
            # 1.6-2 times as much (each `__getitem__` through its method wrapper builds an argument tuple)
            for name, i in plan:
                copy[name] = values[i]
            if connection >= 0:
                self._drop_connection_tokens(copy, values[connection])
        return copy

    def _drop_connection_tokens(self, copy: dict[str, str], connection: str) -> None:
        """RFC 9110 7.6.1: the headers a `Connection` header names are this hop's, never forwarded."""
        tokens = {token.strip().lower() for token in connection.split(",")} - _PLAIN_CONNECTION
        if tokens:
            for name in [n for n in copy if n.lower() in tokens]:
                del copy[name]

    def _plan(self, names: tuple[str, ...]) -> _Plan:
        passing = []
        connection = -1
        for i, name in enumerate(names):
            lower = name.lower()
            if lower == "connection":
                connection = i
            if lower in self.drop or (self.prefix is not None and lower.startswith(self.prefix)):
                continue
            passing.append((lower if self.lower else name, i))
        plan = (tuple(passing), connection)
        if len(self._plans) < _PLANS_MAX:
            self._plans[names] = plan
        return plan


def request_filter(extra_drop: tuple[str, ...] = (), *, keep_authorization: bool = False) -> HeaderFilter:
    """The filter of client headers forwarded upstream (names lower-cased)."""
    drop = NOT_FORWARDED | frozenset(h.lower() for h in extra_drop)
    if keep_authorization:
        drop -= {"authorization"}
    return HeaderFilter(drop, prefix="x-tiergate-", lower=True)


# names lower-cased (case carries no meaning in HTTP): the copy is then asked about a name as a plain dict
RESPONSE_FILTER = HeaderFilter(DROPPED_RESPONSE_HEADERS, lower=True)


def relayed_headers(upstream: Mapping[str, str] | None, request_id: str,
                    secrets: Redactor | None = None) -> dict[str, str]:
    """The provider's response headers a client would have had from it, and the request ids: the
    provider's `x-request-id` stays (the SDK reports it), tiergate's goes in `x-tiergate-request-id`.
    `secrets`: what tiergate sent the provider, masked in the headers that cross back (only those: the
    framing and the provider's own site headers are dropped first, so most answers have little to look at)."""
    if upstream:
        headers = RESPONSE_FILTER(upstream)
        if headers and secrets is not None:
            secrets.screen(headers)
        if "x-request-id" not in headers:
            headers["x-request-id"] = request_id
    else:
        headers = {"x-request-id": request_id}
    headers["x-tiergate-request-id"] = request_id
    return headers


# A client's `x-request-id` becomes tiergate's id for the request (so both sides' logs join), and is
# written to the request log, spans and answers: one longer than this is not taken (a new id is made).
REQUEST_ID_MAX = 128


def request_id(headers: Mapping[str, str]) -> str:
    """The client's `x-request-id` when it is one of a sane length, else a new id."""
    given = headers.get("x-request-id")
    return given if given and len(given) <= REQUEST_ID_MAX else new_request_id()
