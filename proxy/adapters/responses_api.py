"""The Responses API: routed like chat; sent as written to providers that serve it, translated to
Chat Completions for the others (the pure translation is in `responses/`); a stored response's id
follows the provider that holds it, so follow-ups (`previous_response_id`, GET/DELETE by id) reach it.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson

from ..fleet.affinity import Holder
from ..outcome import new_request_id
from ..table.routing import RouteDecision
from ..types import InvalidRequestError, ModelRef, NotFoundError, Route
from .anthropic import via_messages
from .base import Endpoint, Translation, Translator, body_translation, split_for_translation, stream_translation
from .messages import to_messages_request
from .openai import CHAT
from .responses import ChatStreamTranslator, chat_to_response, to_chat_request

if TYPE_CHECKING:
    from ..fleet.affinity import ResponseAffinity
    from ..outcome import Result
    from ..table.routing import RoutingTable

# the top-level `id` of a Response body, or of the response in a stream's first event
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')
_ID_SNIFF_BYTES = 8192
# the events a complete Responses stream ends with (a failed or incomplete response is complete too)
RESPONSES_DONE = (b"response.completed", b"response.incomplete", b"response.failed")


def stream_error(message: str, *, code: str, error_type: str = "server_error") -> bytes:
    """The Responses API's `error` event: how tiergate ends a Responses stream that cannot reach its
    terminal event (a break, a stall, a shutdown). Its top-level fields are the `error` event's own; the
    `error` object is what makes the openai SDK raise `APIError` (as for a translated stream's failure)."""
    error = {"type": error_type, "code": code, "message": message, "param": None}
    return b"event: error\ndata: " + orjson.dumps(
        {"type": "error", "code": code, "message": message, "param": None, "error": error}) + b"\n\n"


@dataclass(frozen=True, slots=True)
class ResponsesEndpoint(Endpoint):
    """`POST /v1/responses`. A call may have no `input` (a stored prompt, or a conversation that continues)."""

    def validate(self, payload: Any, max_messages: int) -> None:
        """The common checks, but `prompt` is the Responses API's: a stored template, `{id, version,
        variables}` (Completions' `prompt`, a string or an array, is what the common checks know)."""
        if type(payload) is dict and type(payload.get("prompt")) is dict:
            payload = {name: value for name, value in payload.items() if name != "prompt"}
        Endpoint.validate(self, payload, max_messages)

    def apply_defaults(self, payload: dict[str, Any], route: Route) -> None:
        """The route's defaults under the Responses API's names."""
        if route.max_tokens is not None and "max_output_tokens" not in payload:
            payload["max_output_tokens"] = route.max_tokens
        if route.temperature is not None and "temperature" not in payload:
            payload["temperature"] = route.temperature
        if route.system_prompt and not payload.get("instructions"):
            payload["instructions"] = route.system_prompt

    def cacheable(self, route: Route | None, payload: dict[str, Any], stream: bool) -> bool:
        # a Responses stream is typed events, not chat chunks: never replayed from or shared as a completion
        return not stream and Endpoint.cacheable(self, route, payload, stream)

    async def candidates(self, decision: RouteDecision, payload: dict[str, Any], table: RoutingTable,
                         affinity: ResponseAffinity) -> tuple[RouteDecision, Translator | None]:
        """A `previous_response_id` goes to the provider that holds it and nowhere else. A candidate whose
        provider does not serve the Responses API gets the call translated to Chat Completions; when
        the call cannot be translated, such candidates are left out (400 when none is left)."""
        previous = payload.get("previous_response_id")
        if isinstance(previous, str) and previous:
            return await _follow_up(decision, previous, table, affinity), None
        specs = table.providers
        candidates = decision.candidates
        chat_only = [c for c in candidates if c.provider in specs and not specs[c.provider].serves_responses]
        if not chat_only:
            return decision, None
        decision, chat = split_for_translation(decision, chat_only, lambda: to_chat_request(payload),
                                               "serve only Chat Completions")
        if chat is None:
            return decision, None
        translated = frozenset(chat_only)
        translate = _translation(payload, _without_thinking(chat), "resp_" + new_request_id().removeprefix("req_"))
        claude = frozenset(c for c in chat_only if "chat" not in specs[c.provider].apis)
        if claude:  # providers that speak only Messages: Responses -> chat -> Messages, and back
            return _through_messages(decision, chat, claude, translated, translate)
        return decision, lambda ref: translate(ref) if ref in translated else None

    async def answered(self, result: Result, payload: dict[str, Any], table: RoutingTable,
                       affinity: ResponseAffinity) -> Result:
        """Note which provider holds the response id (read from the body, or a stream's first event)."""
        if payload.get("store") is False:
            return result
        ref = result.ref
        spec = table.providers.get(ref.provider)
        holder = Holder(ref.provider, ref.model, spec is not None and not spec.serves_responses)
        if result.body is not None:
            match = _RESPONSE_ID.search(result.body, 0, _ID_SNIFF_BYTES)
            if match is not None:
                await affinity.remember(match[1].decode(), holder)
        elif result.stream is not None:
            result.stream = _remember_from_stream(result.stream, holder, affinity)
        return result


# a native Responses stream is typed events, not chat chunks a continuation could carry on (a translated
# one is continued as chat before it is translated back)
RESPONSES = ResponsesEndpoint("responses", "/responses", "chat", True, answer_key="output", done=RESPONSES_DONE,
                              stateful=True, continuable=False, stream_error=stream_error)


async def _follow_up(decision: RouteDecision, previous: str, table: RoutingTable,
                     affinity: ResponseAffinity) -> RouteDecision:
    """The one candidate a continued conversation may go to: the provider that stored its response."""
    holder = await affinity.lookup(previous)
    if holder is None and affinity.keyed:  # another key's response, or one whose owner is unknown
        raise NotFoundError(f"previous_response_id {previous!r} was not found: no response of this key has "
                            "that id", param="previous_response_id", code="previous_response_not_found")
    if holder is not None and holder.translated:
        raise InvalidRequestError(
            f"previous_response_id {previous!r} was answered by provider {holder.provider!r}, which "
            "serves only Chat Completions (tiergate translated the call), so nothing was stored "
            "there; send the whole conversation as `input` instead", param="previous_response_id",
            code="previous_response_not_stored")
    specs = table.providers
    candidates = decision.candidates
    if holder is not None:
        candidates = tuple(c for c in candidates if c.provider == holder.provider) or (
            ModelRef(holder.provider, holder.model),)
    else:  # not seen by this tiergate (or forgotten): only a Responses provider may know it
        candidates = tuple(c for c in candidates if c.provider in specs and specs[c.provider].serves_responses)[:1]
        if not candidates:
            raise InvalidRequestError(
                f"previous_response_id {previous!r} is unknown to tiergate and no candidate of route "
                f"{decision.name} serves the Responses API", param="previous_response_id",
                code="previous_response_not_found")
    return RouteDecision(decision.name, candidates, decision.route, decision.plans)


def _through_messages(decision: RouteDecision, chat: dict[str, Any], claude: frozenset[ModelRef],
                      translated: frozenset[ModelRef], translate: Translator) -> tuple[RouteDecision, Translator]:
    """Candidates that speak only Messages get the chat translation sent on as Messages; when the chat
    request has no Messages form they are left out (400 when none is left)."""
    decision, messages = split_for_translation(decision, claude, lambda: to_messages_request(chat),
                                               "speak only Anthropic's Messages API")
    if messages is None:
        return decision, lambda ref: translate(ref) if ref in translated else None

    def send(ref: ModelRef) -> Translation | None:
        if ref in claude:  # the chat request with Claude's thinking blocks, which only Claude takes back
            return via_messages(replace(translate(ref), payload=chat), ref)  # type: ignore[arg-type]
        return translate(ref) if ref in translated else None

    return decision, send


def _without_thinking(chat: dict[str, Any]) -> dict[str, Any]:
    """`chat` as a chat provider gets it: without the thinking blocks of Claude's earlier turns (input
    reasoning items tiergate wrote), which only a Messages provider takes back."""
    messages = chat["messages"]
    if not any("thinking_blocks" in m for m in messages):
        return chat
    return {**chat, "messages": [{k: v for k, v in m.items() if k != "thinking_blocks"} for m in messages]}


def _translation(request: dict[str, Any], chat: dict[str, Any], response_id: str) -> Translator:
    """A Responses call for a provider that speaks only Chat Completions: `chat` (the translated request)
    goes to it, and its answer comes back as a Response (or the Responses API's stream events)."""

    transform_body = body_translation(lambda completion: chat_to_response(completion, request, response_id))

    def translate(ref: ModelRef) -> Translation:
        return Translation(CHAT, chat, transform_body, stream_translation(
            lambda: ChatStreamTranslator(request, response_id, int(time.time()), ref.model)))

    return translate


async def _remember_from_stream(chunks: AsyncIterator[bytes], holder: Holder,
                                affinity: ResponseAffinity) -> AsyncIterator[bytes]:
    head: bytes | None = b""
    try:
        async for chunk in chunks:
            if head is not None:
                head += chunk
                match = _RESPONSE_ID.search(head, 0, _ID_SNIFF_BYTES)
                if match is not None:  # before the client sees the id, so a follow-up finds it
                    await affinity.remember(match[1].decode(), holder)
                    head = None
                elif len(head) >= _ID_SNIFF_BYTES:
                    head = None
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
