"""OpenAI's Chat Completions, Completions and Embeddings: the API every provider of the table speaks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..types import InvalidRequestError, Route
from .base import Endpoint


@dataclass(frozen=True, slots=True)
class ChatEndpoint(Endpoint):
    """Chat Completions: a non-empty list of messages, each with a role; the route's system prompt
    goes first unless the client sent one of its own."""

    def validate(self, payload: Any, max_messages: int) -> None:
        Endpoint.validate(self, payload, max_messages)
        messages = payload["messages"]
        if not messages:
            raise InvalidRequestError("'messages' must contain at least one message", param="messages")
        if len(messages) > max_messages:
            raise InvalidRequestError(f"'messages' has {len(messages)} messages; at most {max_messages} "
                                      "are accepted", param="messages")
        for i, message in enumerate(messages):
            if type(message) is not dict or type(message.get("role")) is not str:
                raise InvalidRequestError(f"'messages[{i}]' must be an object with a string 'role'",
                                          param=f"messages[{i}]")

    def apply_defaults(self, payload: dict[str, Any], route: Route) -> None:
        Endpoint.apply_defaults(self, payload, route)
        if route.system_prompt:
            messages = payload.get("messages")
            if isinstance(messages, list) and not any(
                    isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
                payload["messages"] = [{"role": "system", "content": route.system_prompt}, *messages]


@dataclass(frozen=True, slots=True)
class EmbeddingsEndpoint(Endpoint):
    """Embeddings: no sampling defaults apply, and the same input always gives the same vectors."""

    def apply_defaults(self, payload: dict[str, Any], route: Route) -> None:
        return None


CHAT = ChatEndpoint("chat.completions", "/chat/completions", "chat", True, required="messages",
                    answer_key="choices", usage_option=True)
# a legacy completion's prompt is not a list of messages a continuation could add the answer to
COMPLETIONS = Endpoint("completions", "/completions", "text_completion", True, "completions", required="prompt",
                       answer_key="choices", usage_option=True, continuable=False)
EMBEDDINGS = EmbeddingsEndpoint("embeddings", "/embeddings", "embeddings", False, "embeddings", required="input",
                                answer_key="data", deterministic=True,
                                batchable=True)
