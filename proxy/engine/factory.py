"""Making routers: the file-table and Postgres-table classes, `create_router`, the shared router of an
event loop (`get_llm_router`), and `router_context`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import Any

from ..settings import RouterConfig
from ..table.routing import RoutingTable
from ..types import ConfigError
from .router import Router


class UnifiedLLMRouter(Router):
    """A router on the file table (`config/routes.yaml`, `TIERGATE_CONFIG`); never connects to Postgres."""

    def __init__(self, config: RouterConfig | None = None, **kwargs: Any):
        super().__init__(config, dynamic=False, **kwargs)


class DynamicLLMRouter(Router):
    """A router that follows the routing table in Postgres (`DATABASE_URL`), the file as its fallback."""

    def __init__(self, config: RouterConfig | None = None, **kwargs: Any):
        super().__init__(config, dynamic=True, **kwargs)


# The type to annotate with (a FastAPI dependency's, for one): every router is one.
BaseLLMRouter = Router


def _router_class(dynamic: bool) -> type[Router]:
    return DynamicLLMRouter if dynamic else UnifiedLLMRouter


async def create_router(cls_or_config: type[Router] | RouterConfig | None = None, *,
                        config: RouterConfig | None = None, dynamic: bool | None = None,
                        table: RoutingTable | None = None) -> Router:
    """A new, initialized router (the caller closes it).

    `create_router(UnifiedLLMRouter)`, `create_router(DynamicLLMRouter, config=...)`,
    `create_router(config)` or `create_router(config, dynamic=True)`."""
    if isinstance(cls_or_config, type):
        if not issubclass(cls_or_config, Router):
            raise TypeError(f"create_router(): {cls_or_config.__name__} is not a router class")
        cls = cls_or_config
        if cls in (UnifiedLLMRouter, DynamicLLMRouter):
            if dynamic is not None and dynamic != (cls is DynamicLLMRouter):
                raise TypeError(f"create_router(): {cls.__name__} with dynamic={dynamic}")
            router = cls(config, table=table)
        else:
            router = cls(config, table=table, dynamic=bool(dynamic))
    else:
        if cls_or_config is not None and config is not None:
            raise TypeError("create_router(): a config given twice")
        router = _router_class(bool(dynamic))(cls_or_config or config, table=table)
    await router.initialize()
    return router


@dataclass(eq=False)
class _Shared:
    """The shared router of one event loop, and what it was asked for."""

    router: Router
    dynamic: bool
    ready: asyncio.Task[None]


# One shared router per event loop: a router's pools and tasks belong to the loop that made them, so
# a new loop (a second asyncio.run(), a second TestClient block) gets a router of its own. Entries of
# closed loops are dropped on the next call.
_shared: dict[asyncio.AbstractEventLoop, _Shared] = {}


async def get_llm_router(dynamic: bool | None = None, config: RouterConfig | None = None) -> Router:
    """The shared router of the running event loop: created and initialized on the first call, the
    same one after (until it is closed; a closed one is replaced by the next call).

    `dynamic=True` follows the routing table in Postgres. A later call that asks for something else
    (another `dynamic`, a `config` that differs from the router's) raises ConfigError instead of
    handing out a router configured otherwise: use `create_router()` for a second one. The router is
    closed when its loop ends (asyncio.run() cancels it), or by `await router.close()`."""
    loop = asyncio.get_running_loop()
    for other in [lp for lp in _shared if lp.is_closed()]:
        _shared.pop(other, None)
    shared = _shared.get(loop)
    if shared is not None and (shared.router.closed or _failed(shared.ready)):
        shared = None
    if shared is None:
        dynamic = bool(dynamic)
        router = _router_class(dynamic)(config)
        shared = _shared[loop] = _Shared(router, dynamic, loop.create_task(router.initialize()))
        loop.create_task(_close_with_loop(router), name="tiergate-shared-router")
        try:
            await asyncio.shield(shared.ready)  # a caller cancelled meanwhile leaves it to the next
        except Exception:
            await router.close()  # what a failed start-up opened; the next call tries again
            raise
        return router
    if dynamic is not None and dynamic != shared.dynamic:
        raise ConfigError(f"get_llm_router(dynamic={dynamic}): the shared router was made with "
                          f"dynamic={shared.dynamic}; close it first, or use create_router() for another")
    if config is not None and config != shared.router.config:
        changed = sorted(f.name for f in fields(config) if f.compare
                         and getattr(config, f.name) != getattr(shared.router.config, f.name))
        raise ConfigError(f"get_llm_router(config=...): the shared router was made with another config "
                          f"(differs in {', '.join(changed)}); close it first, or use create_router() "
                          f"for another")
    await asyncio.shield(shared.ready)
    return shared.router


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


async def get_unified_router(config: RouterConfig | None = None) -> Router:
    """The shared router on the file table: `get_llm_router(dynamic=False, config=config)`."""
    return await get_llm_router(dynamic=False, config=config)


async def get_dynamic_router(config: RouterConfig | None = None) -> Router:
    """The shared router following Postgres: `get_llm_router(dynamic=True, config=config)`."""
    return await get_llm_router(dynamic=True, config=config)


async def _close_with_loop(router: Router) -> None:
    """Close the shared router when its loop ends: asyncio.run() cancels the tasks left at the end."""
    try:
        await router.wait_closed()
    except asyncio.CancelledError:
        await router.close()
        raise


@asynccontextmanager
async def router_context(config: RouterConfig | None = None, *, dynamic: bool = False,
                         table: RoutingTable | None = None) -> AsyncIterator[Router]:
    """`async with router_context() as router:` a router that is closed on exit."""
    router = await create_router(config, dynamic=dynamic, table=table)
    try:
        yield router
    finally:
        await router.close()
