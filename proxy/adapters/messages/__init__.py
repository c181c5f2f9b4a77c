"""Anthropic's Messages API translated to and from OpenAI's Chat Completions: pure functions, one module
per direction (the request, a whole answer, a stream's events): `request`, `response`, `stream` for
Messages calls sent to chat providers; `chat_request`, `chat_response`, `chat_stream` for chat calls
sent to Messages providers. No I/O here; the adapter
(`adapters/anthropic.py`) decides when they apply."""

from .chat_request import DEFAULT_MAX_TOKENS, to_messages_request
from .chat_response import message_to_chat
from .chat_stream import MessagesToChatStream
from .request import to_chat_request
from .response import chat_to_message, stop_reason
from .stream import ChatToMessagesStream

__all__ = ["DEFAULT_MAX_TOKENS", "ChatToMessagesStream", "MessagesToChatStream", "chat_to_message",
           "message_to_chat", "stop_reason", "to_chat_request", "to_messages_request"]
