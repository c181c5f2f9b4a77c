"""Value types and errors shared by every part of tiergate. No I/O here."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import orjson


class UseCase(enum.StrEnum):
    """What kind of work a call is."""

    CODE_GENERATION = "code_generation"
    ARCHITECTURE_DESIGN = "architecture_design"
    DEBUGGING = "debugging"
    DOCUMENTATION = "documentation"
    CHAT_CONVERSATION = "chat_conversation"
    MEMORY_PROCESSING = "memory_processing"
    WORKFLOW_ORCHESTRATION = "workflow_orchestration"
    GENERAL_PURPOSE = "general_purpose"

    def __str__(self) -> str:
        return self.value


class ModelTier(enum.StrEnum):
    """How much quality a call wants to pay for."""

    PREMIUM = "premium"
    STANDARD = "standard"
    ECONOMY = "economy"

    def __str__(self) -> str:
        return self.value


DEFAULT_USE_CASE = UseCase.GENERAL_PURPOSE
DEFAULT_TIER = ModelTier.STANDARD


class ModelRef(NamedTuple):
    """A concrete model at a provider: `provider/model-id`. A named tuple: hashed and compared in C
    (it keys the per-model memos of every request)."""

    provider: str
    model: str

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        provider, sep, model = ref.partition("/")
        if not sep or not provider or not model:
            raise ValueError(f"model reference {ref!r} is not of the form provider/model-id")
        return cls(provider, model)

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class Shadow(NamedTuple):
    """A route's shadow deployment: `share` of the route's calls (0 to 1) are also sent to `model`, at
    most `max_concurrency` at a time; its answers are measured, compared with the primary's and discarded."""

    model: ModelRef
    share: float
    max_concurrency: int = 4


CACHE_POLICIES = ("auto", "always", "never")
# whose requests a cached answer may serve: the inbound key's own (default), or any key's (`shared`)
CACHE_SCOPES = ("key", "shared")


@dataclass(frozen=True, slots=True)
class Route:
    """One row of the routing table: a (use case, tier) and the models that serve it."""

    use_case: UseCase
    tier: ModelTier
    model: ModelRef
    fallbacks: tuple[ModelRef, ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    system_prompt: str | None = None
    cache: str = "auto"
    cache_ttl: int | None = None
    timeout: float | None = None  # overall deadline of this route's calls (default: the setting)
    first_byte_timeout: float | None = None  # a reasoning model may think long before its first chunk
    embeddings: tuple[ModelRef, ...] = ()  # the models of `/v1/embeddings` calls on this route
    completions: tuple[ModelRef, ...] = ()  # the models of legacy `/v1/completions` calls
    stream_recovery: str = "continue"  # a stream that breaks mid-answer is continued by the next model; or `off`
    cache_scope: str = "key"  # `shared`: a cached answer (and a shared stream) serves every inbound key
    # tries of the same deployment, at once, after a 429 with a short Retry-After or a 500/502/503, before the
    # next candidate; None: the default (one, after a short 429 only)
    retry_same: int | None = None
    shadow: Shadow | None = None  # a share of the calls mirrored to another deployment, answers discarded
    # how a fallback continues an answer a stream recovery hands it, where its entry says (`{model: ...,
    # continuation: ...}`); wins over the table's model_rules and the provider's
    continuations: tuple[tuple[ModelRef, str], ...] = ()
    strategy: str = "ordered"  # how the candidates are ordered per request (planner.STRATEGIES)
    # the candidates as the strategy sees them: each a single deployment or a group of equivalent ones;
    # empty when every candidate is a single deployment tried in the listed order (the usual route)
    layout: tuple[Group, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.use_case.value}:{self.tier.value}"

    @property
    def candidates(self) -> tuple[ModelRef, ...]:
        return (self.model, *self.fallbacks)


class Member(NamedTuple):
    """One deployment of a route's candidate, with its share of the traffic under `weighted`."""

    ref: ModelRef
    weight: float = 1.0

    @property
    def refs(self) -> tuple[ModelRef, ...]:
        return (self.ref,)


class Group(NamedTuple):
    """One candidate of a route as its strategy sees it: a single deployment, or a group of equivalent
    ones (the table's `groups:`) ordered among themselves by the group's `strategy`, all of them tried
    before the route's next candidate. `weight`: its share among the route's candidates (`weights:`)."""

    name: str
    members: tuple[Member, ...]
    strategy: str = "ordered"
    weight: float = 1.0

    @property
    def refs(self) -> tuple[ModelRef, ...]:
        return tuple(m.ref for m in self.members)


@dataclass(slots=True)
class LLMResponse:
    """A completed (non-streamed) answer, as the library API returns it."""

    id: str
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any] = field(default_factory=dict)
    created: int = 0
    cached: bool = False
    latency_ms: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def content(self) -> str | None:
        """The text of the first choice (chat message or completion text)."""
        if not self.choices:
            return None
        first = self.choices[0]
        message = first.get("message")
        if isinstance(message, dict):
            return message.get("content")
        return first.get("text")

    def dict(self) -> dict[str, Any]:
        return asdict(self)


# --- errors -----------------------------------------------------------------------------


class TiergateError(Exception):
    """Base of every error tiergate raises; each maps to an OpenAI error body and status.

    `attempts` are the upstream attempts made before the error was decided (`outcome.Attempt` values:
    outcome.py imports this module, so the class is not named here), empty when none was made; `ref`
    is the model whose answer decided it (an upstream client error passed through), else None."""

    status: int = 500
    error_type: str = "api_error"
    code: str | None = None
    attempts: list[Any]
    ref: ModelRef | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.attempts = []
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_body(self) -> bytes:
        return orjson.dumps(self.to_dict())


class ConfigError(TiergateError):
    """The routing table or settings are invalid; names the file and key."""

    status = 500
    error_type = "configuration_error"
    code = "invalid_configuration"


class InvalidRequestError(TiergateError):
    """The client's request is malformed (bad JSON, wrong field type, ...)."""

    status = 400
    error_type = "invalid_request_error"


class UnknownRouteError(InvalidRequestError):
    """Unknown use case, tier or model; the message lists the valid values."""

    code = "unknown_route"


class RequestTooLargeError(InvalidRequestError):
    status = 413
    code = "request_too_large"


class AuthenticationError(TiergateError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(TiergateError):
    """The key is valid but its scopes do not reach what the call asks for; the message says what they do."""

    status = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFoundError(InvalidRequestError):
    status = 404
    code = "not_found"


class RateLimitError(TiergateError):
    """tiergate's own limits are full (not an upstream 429, which is retried)."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class RequestTimeoutError(InvalidRequestError):
    """The client was too slow sending its request."""

    status = 408
    code = "request_timeout"


class UpstreamError(TiergateError):
    """No candidate could answer. The status is the class the client would have had from the provider
    whose failure decided it (its 429 stays a 429, its 503 a 503); a provider that could not be
    reached is a 502, a deadline a 504, no candidate available a 503.

    `headers` are the deciding provider's response headers (Retry-After, x-ratelimit-*, ...);
    `tried` says that tiergate spent its attempts upstream, so a client should not retry on top."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_unreachable"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 attempts: list[Any] | None = None, error_type: str | None = None, param: str | None = None,
                 headers: Any = None, retry_after: float | None = None, tried: bool = False):
        super().__init__(message, code=code, param=param)
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.attempts = attempts or []
        self.headers = headers
        self.retry_after = retry_after
        self.tried = tried


class UpstreamStatusError(TiergateError):
    """An upstream answered with a client error (4xx) that is passed through as it came."""

    tried = True

    def __init__(self, status: int, body: bytes, content_type: str = "application/json", headers: Any = None):
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type
        self.error_type = "upstream_error"
        self.headers = headers

    def to_body(self) -> bytes:
        return self.body


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task (if any) and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class RouterClosedError(TiergateError):
    """The router was closed: it has no pools left to send with."""

    status = 503
    error_type = "service_unavailable"
    code = "router_closed"
