"""tiergate: an OpenAI-compatible LLM routing sidecar, usable in-process as a library.

    from proxy import get_llm_router, UseCase, ModelTier
    router = await get_llm_router()
    answer = await router.complete("Write a haiku", use_case=UseCase.CHAT_CONVERSATION,
                                   tier=ModelTier.ECONOMY)
"""

from .edge.asgi import fastapi_exception_handler
from .engine.factory import (
    BaseLLMRouter,
    DynamicLLMRouter,
    UnifiedLLMRouter,
    create_router,
    get_dynamic_router,
    get_llm_router,
    get_unified_router,
    router_context,
)
from .engine.router import Router
from .settings import RouterConfig
from .table.discovery import DiscoveredModel, Discovery
from .table.routing import RouteDecision, RoutingTable, load_table
from .types import (
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    LLMResponse,
    ModelRef,
    ModelTier,
    RateLimitError,
    Route,
    RouterClosedError,
    TiergateError,
    UnknownRouteError,
    UpstreamError,
    UpstreamStatusError,
    UseCase,
)

__all__ = [
    "AuthenticationError", "BaseLLMRouter", "ConfigError", "DiscoveredModel", "Discovery",
    "DynamicLLMRouter", "InvalidRequestError", "LLMResponse", "ModelRef", "ModelTier", "RateLimitError",
    "Route", "RouteDecision", "Router", "RouterClosedError", "RouterConfig", "RoutingTable",
    "TiergateError", "UnifiedLLMRouter", "UnknownRouteError", "UpstreamError", "UpstreamStatusError",
    "UseCase", "create_router", "fastapi_exception_handler", "get_dynamic_router", "get_llm_router",
    "get_unified_router", "load_table", "router_context",
]
__version__ = "0.1.0"
