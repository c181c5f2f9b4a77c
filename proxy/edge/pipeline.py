"""The one pipeline every `/v1` request takes, its steps written once: normalise the path, authenticate
(the key's name), open the request record, admit against limits and budgets, run the route's own
work, render an error in OpenAI's shape, finish (settle the limits, log, count).

A route plugs in one of two ways. The routed endpoints (chat, completions, embeddings, Responses)
are `routed`: the router resolves their route and admits them with it (`api_key_name`). Every other
route is `located`: its `Locate` reads what it can of the request (a JSON body's `model`, a stored
response's holder) and says what the call goes to; the pipeline admits that, then the route sends it.
The pipeline is a plain closure around the route's coroutine, not an aiohttp middleware, so that the
server's direct routes (see connections.py) take it too at the cost of one call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from yarl import URL

from ..outcome import RequestRecord, new_request_id
from ..table.keys import InboundKey
from ..types import InvalidRequestError
from .auth import InboundAuth, presented_key
from .headers import REQUEST_ID_MAX, request_id
from .paths import canonical_target, is_unusual
from .render import ErrorShape, failure

if TYPE_CHECKING:
    from ..engine.router import Router
    from ..table.routing import RouteDecision

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# a route's own work, once the key is known: (request, its record, the key) -> the answer
Serve = Callable[[web.Request, RequestRecord, "InboundKey | None"], Awaitable[web.StreamResponse]]
# where a pass-through finds the key of a request whose key sends a provider its own credentials
KEY_ITEM = web.RequestKey("tiergate_inbound_key", InboundKey)

DRAIN = "tiergate is shutting down"  # the cancel message that ends a request still running after the drain


@dataclass(slots=True)
class Target:
    """What a call that tiergate does not route goes to, read before it is admitted: the decision limits
    are checked against (a route or alias the body names, else the provider it is passed to), the body
    an estimate is read from, and how it is sent once admitted (with the decision admission returned,
    a cheaper route's when a budget says to downgrade)."""

    decision: RouteDecision
    payload: Mapping[str, Any]
    send: Callable[[RouteDecision], Awaitable[web.StreamResponse]]
    # whether the key's scopes apply: not to a stored object, which only the key that made it (inside
    # its scopes) can reach
    scoped: bool = True


Locate = Callable[[web.Request, RequestRecord], Awaitable[Target]]

async def reroute(request: web.Request, target: str) -> web.StreamResponse:
    """Serve `request` as sent to `target`, its canonical form: by the route that path names, every
    step of that route's pipeline included (and only once: this request opened no record)."""
    clone = request.clone(rel_url=URL(target, encoded=True))
    match = await request.app.router.resolve(clone)
    return await match.handler(clone)


def refused(router: Router | None, request: web.Request, name: str, exc: InvalidRequestError) -> web.StreamResponse:
    """A request whose path is refused: answered in OpenAI's shape, and recorded (logged, counted) like
    any other when it came to a `/v1` route."""
    record = RequestRecord(request_id(request.headers), name)
    error, response = failure(exc, record)
    if router is not None:
        router.finish(record, error)
    return response


class Pipeline:
    """Wraps each route's work in the steps every `/v1` request takes. `inflight` is the app's set of
    handler tasks running, which the shutdown drains."""

    def __init__(self, router: Router, auth: InboundAuth, inflight: set[asyncio.Task[Any]]):
        self.router = router
        self.auth = auth
        self.inflight = inflight

    def routed(self, name: str, serve: Serve, *, canonical: bool = False, shape: ErrorShape | None = None) -> Handler:
        """A routed endpoint's handler: `serve` hands the key's name to `Router.dispatch`, which admits
        the request with the route it resolves. `canonical`: the server calls it only for its exact,
        canonical path (see connections.py), so its path needs no look. `shape`: its API family's
        error body (None: OpenAI's)."""
        return self._handler(name, serve, canonical, shape)

    def located(self, name: str, locate: Locate) -> Handler:
        """The handler of a call tiergate does not route: admitted here against what `locate` found."""
        router = self.router

        async def admit_and_send(request: web.Request, record: RequestRecord, key: InboundKey | None
                                 ) -> web.StreamResponse:
            key_name = record.key_name  # stored objects are the key's
            target = await locate(request, record)
            decision = target.decision
            if key is not None:
                if target.scoped:
                    key.check(decision)  # outside the key's scopes: a 403 before anything is counted or sent
                if key.credentials:
                    request[KEY_ITEM] = key
            table = router.table
            if table.limits is not None:  # key-scoped (and route-scoped) limits, as on the routed paths
                decision = await router.quotas.admit(table.limits, table, decision, target.payload, key_name,
                                                     record)
            return await target.send(decision)

        return self._handler(name, admit_and_send)

    def _handler(self, name: str, serve: Serve, canonical: bool = False, shape: ErrorShape | None = None) -> Handler:
        router, inflight = self.router, self.inflight
        # with no keys at start there never are any (a keys file is watched only when it held some,
        # and database keys make authentication required from the start)
        authenticate = self.auth.authenticate if self.auth.enabled else None

        async def handle(request: web.Request) -> web.StreamResponse:
            if not canonical and is_unusual(request.raw_path):  # served as its canonical form, or refused
                try:
                    target = canonical_target(request.raw_path)
                except InvalidRequestError as exc:
                    return refused(router, request, name, exc)
                if target is not None:
                    return await reroute(request, target)
            headers = request.headers
            given = headers.get("x-request-id")  # request_id(), inline on the hot path
            record = RequestRecord(given if given and len(given) <= REQUEST_ID_MAX else new_request_id(), name)
            error: BaseException | None = None
            task = request.task  # the handler's own task (asyncio.current_task() costs more)
            inflight.add(task)
            try:
                key = authenticate(presented_key(headers)) if authenticate is not None else None
                if key is not None:  # its name, never the key: scopes limits and stored objects, and is logged
                    record.key_name = key.name
                return await serve(request, record, key)
            except (asyncio.CancelledError, ConnectionResetError) as exc:  # no one to answer
                error = exc
                raise
            except BaseException as exc:
                error, response = failure(exc, record, shape)
                return response
            finally:
                inflight.discard(task)
                router.finish(record, error)

        handle.__name__ = f"handle_{name.replace('.', '_')}"
        return handle
