"""The Responses API over Chat Completions: pure translation functions, no I/O.

A provider that only speaks Chat Completions gets a Responses call as a chat request
(`to_chat_request`); its answer comes back as a Response object (`chat_to_response`) or, for a
stream, as the Responses API's typed events (`ChatStreamTranslator`, fed the chat SSE bytes).
What has no Chat Completions equivalent is refused with an `InvalidRequestError`, never dropped.
"""

from .request import to_chat_request
from .response import chat_to_response, response_skeleton, translate_usage
from .stream import ChatStreamTranslator

__all__ = ["ChatStreamTranslator", "chat_to_response", "response_skeleton", "to_chat_request",
           "translate_usage"]
