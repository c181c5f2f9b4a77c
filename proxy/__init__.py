"""tiergate: an OpenAI-compatible LLM routing sidecar, usable in-process as a library.

    from proxy import get_llm_router, UseCase, ModelTier
    router = await get_llm_router()
    answer = await router.complete("Write a haiku", use_case=UseCase.CHAT_CONVERSATION,
                                   tier=ModelTier.ECONOMY)
"""

from .router import Router, create_router, get_llm_router, router_context
from .routing import RouteDecision, RoutingTable, load_table
from .settings import RouterConfig
from .types import (
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    LLMResponse,
    ModelRef,
    ModelTier,
    RateLimitError,
    Route,
    TiergateError,
    UnknownRouteError,
    UpstreamError,
    UpstreamStatusError,
    UseCase,
)

__all__ = [
    "AuthenticationError", "ConfigError", "InvalidRequestError", "LLMResponse", "ModelRef",
    "ModelTier", "RateLimitError", "Route", "RouteDecision", "Router", "RouterConfig",
    "RoutingTable", "TiergateError", "UnknownRouteError", "UpstreamError", "UpstreamStatusError",
    "UseCase", "create_router", "get_llm_router", "load_table", "router_context",
]
__version__ = "0.1.0"
