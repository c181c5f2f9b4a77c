"""Inbound connections: how long a client may take to send a request's headers, how long an idle
keep-alive connection stays open, how many connections are open at once, and what a malformed
request costs in log lines.

aiohttp has an idle keep-alive timer but no bound on the time to receive headers (a connection
trickling a header a minute stays forever) and no cap on connections (at the descriptor limit
`accept()` fails and every legitimate client is starved). `GuardedAppRunner` runs the app with a
`GuardedServer`, whose protocol (`GuardedRequestHandler`) notes since when a connection has waited
for a request's headers and whose sweep closes those past the header deadline; the server caps
open connections and, at the cap, closes the oldest idle connection (one that has not finished a
request first) to make room, so a request is still served while idle or slow connections fill the
cap. A malformed request is answered with an OpenAI-shaped 400 and logged in one line, at most
one line per `LOG_INTERVAL` seconds (aiohttp logs each one at ERROR with a traceback).

The app may name its hot routes in `DIRECT_ROUTES`: a POST whose request target is one of them goes
straight to its handler, past the app's URL dispatcher and match-info bookkeeping (on a proxy that
is a tenth of aiohttp's own work per request); anything else, or a request with `Expect`, takes
the app's way.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..types import InvalidRequestError, TiergateError

log = logging.getLogger("tiergate")

LOG_INTERVAL = 10.0  # seconds between two log lines about malformed requests or refused connections
RESERVED_DESCRIPTORS = 64  # kept out of the connection cap: pools, database, Redis, log files

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
# request target of a POST (exactly as sent: no query, no escapes) -> its handler, called directly
DIRECT_ROUTES = web.AppKey("direct_routes", dict)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds from a connection's start (or a request's first byte) to its headers
    keepalive_timeout: float  # seconds an idle keep-alive connection stays open
    max_connections: int  # open inbound connections; at the cap the oldest idle one is closed


def headroom(cap: int) -> int:
    """Connections accepted beyond the cap while none is idle (just accepted, not yet read)."""
    return max(16, cap // 4)


def descriptor_budget(configured: int) -> int:
    """The connection cap: `configured`, or (0) two fifths of the descriptors this process may open
    beyond a reserve: each inbound request may hold an upstream connection too, and the cap has a
    headroom above it. The soft descriptor limit is raised to the hard one first (as Go's runtime does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit of "infinity" may be refused: keep the soft one
            pass
    if configured > 0:
        return configured
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(16, (soft - RESERVED_DESCRIPTORS) * 2 // 5)


class RateLimitedLog:
    """One warning line per `interval` seconds at most, saying how many were left out since."""

    def __init__(self, interval: float = LOG_INTERVAL):
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self.interval
        if self._suppressed:
            message += f" (and {self._suppressed} more in the last {self.interval:g} s)"
            self._suppressed = 0
        log.warning(message, *args)


def _reason(exc: BaseException) -> str:
    """The first line of a parser error, short and printable (it may quote the client's bytes)."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    first = str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__
    return ascii(first[:120].rstrip(": "))[1:-1]


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol plus a deadline for the request headers and a quiet answer to garbage.
    It reads its base class's state (`_waiter`, `_messages`, `_force_close`, `_loop`): aiohttp has
    no public view of whether a connection is idle or has a request's headers."""

    def __init__(self, manager: GuardedServer, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._malformed_log = manager.malformed_log
        self.served = False  # a request's headers arrived on this connection at least once
        # since when (loop time) it has waited for a request's headers: the server's sweep closes it
        # once that is longer than the header timeout (a timer per connection would cost every
        # connection and request a timer set and cancelled)
        self.waiting_since: float | None = None

    @property
    def idle(self) -> bool:
        """Waiting for a request (none in progress): aiohttp's own test for its keep-alive close."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.transport is not None:  # not closed at once by the server's cap
            self.waiting_since = self._loop.time()

    def data_received(self, data: bytes) -> None:
        RequestHandler.data_received(self, data)  # aiohttp's own, named: super() costs ~1k instructions a call
        if self._force_close:
            return
        if self._messages:
            self.served = True  # headers complete: the handler (and its body timeout) take over
            self.waiting_since = None
        elif self.waiting_since is None and self.idle:
            self.waiting_since = self._loop.time()  # the first bytes of a request on an idle keep-alive connection

    def headers_late(self, now: float, timeout: float) -> bool:
        since = self.waiting_since
        return since is not None and now - since >= timeout and self.idle and not self._messages

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # a request the parser refused: anyone can send these, so no traceback and no flood
        self._malformed_log.warning("tiergate: malformed HTTP request from %s: %s", request.remote,
                                    _reason(exc))
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send another")
        error: TiergateError = InvalidRequestError(f"malformed HTTP request: {_reason(exc)}",
                                                   code="malformed_request")
        response = web.Response(status=status if 400 <= status < 500 else 400, body=error.to_body(),
                                content_type="application/json")
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's low-level server with a cap on open connections."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.malformed_log = RateLimitedLog()
        self.refused_log = RateLimitedLog()
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # connections refused because every open one was busy
        self._sweeper: asyncio.TimerHandle | None = None
        # a connection is closed between one header timeout and a quarter more after it went silent
        self._sweep_interval = min(1.0, max(0.05, limits.header_timeout / 4))

    def _sweep(self) -> None:
        """Close the connections that have waited longer than the header timeout for a request's headers."""
        self._sweeper = None
        now = self._loop.time()
        timeout = self.limits.header_timeout
        for conn in list(self._connections):
            if isinstance(conn, GuardedRequestHandler) and conn.headers_late(now, timeout):
                conn.waiting_since = None
                conn.force_close()
        if self._connections:
            self._sweeper = self._loop.call_later(self._sweep_interval, self._sweep)

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await super().shutdown(timeout)

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self._sweeper is None and self.limits.header_timeout > 0:
            self._sweeper = self._loop.call_later(self._sweep_interval, self._sweep)
        open_now = len(self._connections)
        if open_now <= self.limits.max_connections:
            return
        victim = self._oldest_idle()
        if victim is not None:
            self.evicted += 1
            victim.force_close()
            return
        # nothing idle: connections just accepted have not been read yet (a burst of them arrives in
        # one go); take them into the headroom, where they either send a request or turn idle
        if open_now <= self.limits.max_connections + headroom(self.limits.max_connections):
            return
        self.refused += 1
        self.refused_log.warning("tiergate: %d connections open, none idle (TIERGATE_MAX_CONNECTIONS): "
                                 "refusing new ones with 503", open_now - 1)
        transport.write(_BUSY)
        handler.force_close()

    def _oldest_idle(self) -> RequestHandler | None:
        """The oldest idle connection that never completed a request, else the oldest idle one."""
        fallback = None
        for conn in self._connections:  # in the order they were opened
            if isinstance(conn, GuardedRequestHandler) and conn.idle and conn.transport is not None:
                if not conn.served:
                    return conn
                if fallback is None:
                    fallback = conn
        return fallback


class TooManyConnectionsError(TiergateError):
    status = 503
    error_type = "service_unavailable"
    code = "too_many_connections"


_BUSY_BODY = TooManyConnectionsError("tiergate has too many open connections; retry shortly").to_body()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `GuardedServer` with these limits."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any):
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        # aiohttp's own hook (private, and the only one) for the server a runner uses
        server = await super()._make_server()  # the app's start-up, and the server it would use
        handle = server.request_handler
        direct = self.app.get(DIRECT_ROUTES)
        if direct:
            handle = direct_routes(direct, handle)
        # the loop is the running one (aiohttp's runner made its server on it, and so does ours)
        return GuardedServer(handle, limits=self.limits, request_factory=server.request_factory,
                             handler_cancellation=server.handler_cancellation, **_protocol_settings(server))


def _protocol_settings(server: web.Server) -> dict[str, Any]:
    """The settings aiohttp's runner gave its server for each connection's protocol (keep-alive,
    access log, the app's handler_args...), handed on to the `GuardedServer` that replaces it.
    aiohttp has no public way to give a runner another server class, nor to read these back: this
    is the one read of its private state outside the subclasses (aiohttp 3.9 to 3.14 keep them in
    `Server._kwargs`)."""
    return dict(server._kwargs)


def direct_routes(routes: Mapping[str, Handler], app_handler: Handler) -> Handler:
    """The server's request handler: a POST to one of `routes` goes to its handler, the rest to the app."""
    async def handle(request: BaseRequest) -> web.StreamResponse:
        try:
            if request.method == "POST":
                handler = routes.get(request.raw_path)
                if handler is not None and "Expect" not in request.headers:
                    return await handler(request)
            return await app_handler(request)
        except asyncio.CancelledError as exc:
            # The client left and aiohttp cancelled its handler. The error's traceback holds every frame
            # of the request (a stream's buffers, the upstream response) in a cycle with the cancelled
            # task until a full collection, rare under `serve`'s collector settings: rounds of clients
            # leaving mid-stream added up. Without it those frames are freed as the handler ends.
            exc.__context__ = None
            raise exc.with_traceback(None) from None

    return handle
