"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`): routed like chat.

A candidate whose provider speaks Messages (`kind: anthropic`, or `apis` naming `messages`) gets the
request as written; one that speaks only Chat Completions gets it translated (the pure translation is
in `messages/`) and its answer translated back. Errors, tiergate's own and the providers', reach the
client in Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`), so the Anthropic SDKs
raise their own classes for them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson

from ..outcome import new_request_id
from ..protocol.usage import messages_start_usage
from ..table.routing import RouteDecision
from ..types import InvalidRequestError, ModelRef, Route, TiergateError, UpstreamStatusError
from .base import Endpoint, Translation, Translator, body_translation, split_for_translation, stream_translation
from .messages import (
    ChatToMessagesStream,
    MessagesToChatStream,
    chat_to_message,
    message_to_chat,
    to_chat_request,
    to_messages_request,
)
from .openai import CHAT, ChatEndpoint

if TYPE_CHECKING:
    from ..fleet.affinity import ResponseAffinity
    from ..outcome import Result
    from ..table.routing import RoutingTable

# the event a complete Messages stream ends with, as its data line carries it (an escaped quote inside
# a text delta can never form it)
MESSAGES_DONE = (b'"type":"message_stop"', b'"type": "message_stop"')

# the error type Anthropic gives each status; other 4xx are invalid requests, other 5xx api errors
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error"}
_ANTHROPIC_TYPES = frozenset(_ERROR_TYPES.values())

# Messages' own fields and their JSON types (the shared ones, `model`, `stream`, ..., are the base's)
_MESSAGES_FIELDS: dict[str, tuple[type, ...]] = {
    "system": (str, list), "max_tokens": (int,), "stop_sequences": (list,), "top_k": (int,),
    "thinking": (dict,), "tool_choice": (dict,), "tools": (list,), "metadata": (dict,),
    "container": (str, dict), "mcp_servers": (list,), "service_tier": (str,)}


def error_type_for(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    found = _ERROR_TYPES.get(status)
    if found is not None:
        return found
    return "invalid_request_error" if status < 500 else "api_error"


def anthropic_error(exc: TiergateError) -> bytes:
    """`exc` in Anthropic's shape. A provider's own error body passes as it came when it is Anthropic's
    already; an OpenAI-shaped one is re-worded (its message kept)."""
    if isinstance(exc, UpstreamStatusError):
        try:
            body = orjson.loads(exc.body)
        except orjson.JSONDecodeError:
            body = None
        if type(body) is dict and body.get("type") == "error" and type(body.get("error")) is dict:
            return exc.body
        error = body.get("error") if type(body) is dict else None
        message = error.get("message") if type(error) is dict else None
        if type(message) is not str:
            message = exc.body.decode("utf-8", "replace")[:2000] or exc.message
        return orjson.dumps({"type": "error", "error": {"type": error_type_for(exc.status), "message": message}})
    # OpenAI's type for every 4xx is Anthropic's for a 400 only: a 404 is `not_found_error`, a 403 `permission_error`
    generic = exc.error_type == "invalid_request_error"
    kind = exc.error_type if exc.error_type in _ANTHROPIC_TYPES and not generic else error_type_for(exc.status)
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": exc.message}})


def stream_error(message: str, *, code: str = "", error_type: str | None = None) -> bytes:
    """Anthropic's `error` event (the SDKs raise it): how tiergate ends a Messages stream that cannot
    reach its `message_stop` (a break, a stall, a shutdown). `code` is tiergate's cause
    (`upstream_timeout`, ...), kept in the error's type where Anthropic has one for it."""
    kind = error_type or ("timeout_error" if code.endswith("timeout") else "api_error")
    return b"event: error\ndata: " + orjson.dumps(
        {"type": "error", "error": {"type": kind, "message": message}}) + b"\n\n"


def _anthropic_variant(headers: Mapping[str, str] | None) -> str:
    """The API version and beta features the client asked for: they change what Anthropic answers (a beta
    turns on thinking blocks, caching, ...), so a cached answer serves only calls that asked for the same."""
    if not headers:
        return ""
    version, beta = headers.get("anthropic-version"), headers.get("anthropic-beta")
    if version is None and beta is None:
        return ""
    return f"\0anthropic-version={version or ''}\0anthropic-beta={beta or ''}"


def _check_types(payload: dict[str, Any]) -> None:
    for name, types in _MESSAGES_FIELDS.items():
        value = payload.get(name)
        if value is not None and type(value) not in types:
            raise InvalidRequestError(f"'{name}' has the wrong type for the Messages API", param=name)


def _check_messages(payload: dict[str, Any], max_messages: int) -> None:
    messages = payload["messages"]
    if type(messages) is not list or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
    if len(messages) > max_messages:
        raise InvalidRequestError(f"'messages' has {len(messages)} messages; at most {max_messages} are accepted",
                                  param="messages")
    for i, message in enumerate(messages):
        if type(message) is not dict or message.get("role") not in ("user", "assistant"):
            raise InvalidRequestError(f"messages.{i}: must be an object whose 'role' is 'user' or 'assistant'",
                                      param=f"messages.{i}")
        if type(message.get("content")) not in (str, list):
            raise InvalidRequestError(f"messages.{i}.content: must be a string or an array of content blocks",
                                      param=f"messages.{i}.content")


@dataclass(frozen=True, slots=True)
class MessagesEndpoint(Endpoint):
    """`POST /v1/messages`: native to Messages providers, translated to Chat Completions for the others."""

    def validate(self, payload: Any, max_messages: int) -> None:
        Endpoint.validate(self, payload, max_messages)
        _check_types(payload)
        _check_messages(payload, max_messages)

    def apply_defaults(self, payload: dict[str, Any], route: Route) -> None:
        """The route's defaults under Messages' names: `max_tokens`, `temperature`, `system`."""
        if route.max_tokens is not None and "max_tokens" not in payload:
            payload["max_tokens"] = route.max_tokens
        if route.temperature is not None and "temperature" not in payload:
            payload["temperature"] = route.temperature
        if route.system_prompt and not payload.get("system"):
            payload["system"] = route.system_prompt

    def cacheable(self, route: Route | None, payload: dict[str, Any], stream: bool) -> bool:
        # a Messages stream is typed events, not chat chunks: never replayed from or shared as a completion
        return not stream and Endpoint.cacheable(self, route, payload, stream)

    def error_body(self, exc: TiergateError) -> bytes:
        return anthropic_error(exc)

    def cache_variant(self, headers: Mapping[str, str] | None) -> str:
        return _anthropic_variant(headers)

    def at_query(self, query: str) -> Endpoint:
        """`?beta=true` (the SDKs' `client.beta.messages`) goes to a Messages provider as sent."""
        return _BETA.get(query, self)

    async def candidates(self, decision: RouteDecision, payload: dict[str, Any], table: RoutingTable,
                         affinity: ResponseAffinity) -> tuple[RouteDecision, Translator | None]:
        """Messages providers take the call as written; chat-only ones get it translated. A call that
        cannot be translated honestly goes only to the Messages providers (400 naming the field when
        there are none)."""
        specs = table.providers
        chat_only = [c for c in decision.candidates if c.provider in specs and not specs[c.provider].serves_messages]
        if not chat_only:
            return decision, None
        decision, chat = split_for_translation(decision, chat_only, lambda: to_chat_request(payload),
                                               "speak only Chat Completions")
        if chat is None:
            return decision, None
        translated = frozenset(chat_only)
        translate = _translation(payload, chat, "msg_" + new_request_id().removeprefix("req_"))
        return decision, lambda ref: translate(ref) if ref in translated else None

    async def answered(self, result: Result, payload: dict[str, Any], table: RoutingTable,
                       affinity: ResponseAffinity) -> Result:
        """A stream: its `message_start` usage kept for its cost (read once from the first chunk). A break
        needs no wrapper: the relay ends the stream with this endpoint's `stream_error`, Anthropic's."""
        state = result.stream_state
        if result.stream is not None and state is not None and state.head:
            state.head_usage = messages_start_usage(state.head)
        return result


@dataclass(frozen=True, slots=True)
class CountTokensEndpoint(Endpoint):
    """`POST /v1/messages/count_tokens`: to the route's first Messages provider, which does the counting."""

    def validate(self, payload: Any, max_messages: int) -> None:
        Endpoint.validate(self, payload, max_messages)
        _check_types(payload)
        _check_messages(payload, max_messages)

    def apply_defaults(self, payload: dict[str, Any], route: Route) -> None:
        if route.system_prompt and not payload.get("system"):
            payload["system"] = route.system_prompt

    def error_body(self, exc: TiergateError) -> bytes:
        return anthropic_error(exc)

    def cache_variant(self, headers: Mapping[str, str] | None) -> str:
        return _anthropic_variant(headers)

    def at_query(self, query: str) -> Endpoint:
        return _BETA_COUNT.get(query, self)

    async def candidates(self, decision: RouteDecision, payload: dict[str, Any], table: RoutingTable,
                         affinity: ResponseAffinity) -> tuple[RouteDecision, Translator | None]:
        specs = table.providers
        native = tuple(c for c in decision.candidates if c.provider in specs and specs[c.provider].serves_messages)
        if not native:
            raise InvalidRequestError(f"route {decision.name} has no provider that speaks the Messages API, "
                                      "which counts tokens; add one (kind: anthropic)", param="model",
                                      code="count_tokens_unsupported")
        return RouteDecision(decision.name, native, decision.route, decision.plans), None


MESSAGES = MessagesEndpoint("messages", "/messages", "chat", True, required="messages", answer_key="content",
                            done=MESSAGES_DONE, stateful=True, continuable=False, stream_error=stream_error)
COUNT_TOKENS = CountTokensEndpoint("messages.count_tokens", "/messages/count_tokens", "chat", False,
                                   required="messages", deterministic=True, stateful=True, stream_error=stream_error)


@dataclass(frozen=True, slots=True)
class ClaudeChatEndpoint(ChatEndpoint):
    """Chat Completions as tiergate serves it: a candidate whose provider speaks only Messages (`kind:
    anthropic`) gets the call translated to Messages and its answer translated back. Asked only when the
    table has such a provider (`RoutingTable.mixed_apis`), so other tables plan chat without it."""

    async def candidates(self, decision: RouteDecision, payload: dict[str, Any], table: RoutingTable,
                         affinity: ResponseAffinity) -> tuple[RouteDecision, Translator | None]:
        specs = table.providers
        claude = [c for c in decision.candidates if c.provider in specs
                  and specs[c.provider].serves_messages and "chat" not in specs[c.provider].apis]
        if not claude:
            return decision, None
        try:
            request = to_messages_request(payload)
        except InvalidRequestError as exc:
            rest = tuple(c for c in decision.candidates if c not in claude)
            if not rest:
                names = ", ".join(sorted({c.provider for c in claude}))
                raise InvalidRequestError(f"route {decision.name}: {exc.message} (providers {names} speak only "
                                          "Anthropic's Messages API)", param=exc.param, code=exc.code) from None
            return RouteDecision(decision.name, rest, decision.route, decision.plans), None
        translated = frozenset(claude)
        translate = _to_messages(request, _wants_usage(payload))
        return decision, lambda ref: translate(ref) if ref in translated else None


# chat as tiergate routes it (`adapters.CHAT`); `openai.CHAT` is the plain API a translation sends
CHAT_ROUTED = ClaudeChatEndpoint(CHAT.name, CHAT.path, CHAT.operation, True, required="messages",
                                 answer_key="choices", usage_option=True)
# the beta variants, by the query that asks for them: the same endpoints, their path with the query
_BETA: dict[str, Endpoint] = {"beta=true": replace(MESSAGES, path="/messages?beta=true")}
_BETA_COUNT: dict[str, Endpoint] = {"beta=true": replace(COUNT_TOKENS, path="/messages/count_tokens?beta=true")}


def _wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return type(options) is dict and options.get("include_usage") is True


def _to_messages(request: dict[str, Any], include_usage: bool) -> Translator:
    """A chat call for a provider that speaks only Messages: `request` (Messages) goes to it, its answer
    comes back as a chat completion (or chat chunks)."""

    transform_body = body_translation(lambda message: message_to_chat(message, int(time.time())))

    def translate(ref: ModelRef) -> Translation:
        return Translation(MESSAGES, request, transform_body, stream_translation(
            lambda: MessagesToChatStream(ref.model, int(time.time()), include_usage)))

    return translate


def via_messages(translation: Translation, ref: ModelRef) -> Translation:
    """`translation`, a call already put in Chat Completions (a Responses call), sent on to a provider that
    speaks only Messages: its chat request as Messages, the answer back to chat and then as before.
    InvalidRequestError when the chat request has no Messages form."""
    request = to_messages_request(translation.payload)
    hop = _to_messages(request, _wants_usage(translation.payload))(ref)
    body, stream = translation.transform_body, translation.transform_stream
    return Translation(MESSAGES, request, lambda data: body(hop.transform_body(data)),
                       lambda chunks: stream(hop.transform_stream(chunks)))


def _translation(request: dict[str, Any], chat: dict[str, Any], message_id: str) -> Translator:
    """A Messages call for a provider that speaks only Chat Completions: `chat` goes to it, and its
    answer comes back as a Message (or Messages' stream events)."""

    transform_body = body_translation(lambda completion: chat_to_message(completion, request, message_id))

    def translate(ref: ModelRef) -> Translation:
        return Translation(CHAT, chat, transform_body, stream_translation(
            lambda: ChatToMessagesStream(message_id, ref.model, int(time.time()))))

    return translate
