"""Anthropic's Messages API translated to and from OpenAI's Chat Completions: pure functions, one module
per direction (the request, a whole answer, a stream's events). No I/O here; the adapter
(`adapters/anthropic.py`) decides when they apply."""

from .request import to_chat_request
from .response import chat_to_message, stop_reason
from .stream import ChatToMessagesStream

__all__ = ["ChatToMessagesStream", "chat_to_message", "stop_reason", "to_chat_request"]
