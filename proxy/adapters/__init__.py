"""One adapter per API family: what a request carries, what an answer looks like, how a call is
translated for a provider that speaks another API. Adding a family means adding a module here."""

from .anthropic import CHAT_ROUTED as CHAT
from .anthropic import COUNT_TOKENS, MESSAGES
from .base import DONE, FIELD_TYPES, Endpoint, Translation, Translator
from .openai import COMPLETIONS, EMBEDDINGS
from .responses_api import RESPONSES

# the families tiergate routes itself, each served at POST /v1<path>
ROUTED: tuple[Endpoint, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS)

__all__ = ["CHAT", "COMPLETIONS", "COUNT_TOKENS", "DONE", "EMBEDDINGS", "FIELD_TYPES", "MESSAGES", "RESPONSES",
           "ROUTED", "Endpoint", "Translation", "Translator"]
