"""CPU per stream event of the Messages paths, in-process (no sockets): the relay every stream takes, fed
a chat stream and a native Messages stream, and the two translations.

    python bench/messages_events.py [--events 200000]

Rows: the relay (`engine/dispatch/relay.py`, as an attempt runs it: its endpoint's final events and
error-event builder) over a chat stream and over a native Messages stream, each without and with the
route's recovery/usage work left out; a Messages call answered by a chat provider (chat chunks ->
Messages events); a chat call answered by Claude (Messages events -> chat chunks). Each is fed
realistic events one read at a time; the figure is CPU microseconds per event (best of 5).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from proxy.adapters.anthropic import MESSAGES
from proxy.adapters.messages import ChatToMessagesStream, MessagesToChatStream
from proxy.adapters.openai import CHAT
from proxy.engine.dispatch.relay import relay
from proxy.outcome import StreamState
from proxy.protocol.sse import UsageFilter
from proxy.types import ModelRef


def chat_chunk(i: int) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", "choices": [{"index": 0, "delta": {"content": f"word{i} "},
                                                                "finish_reason": None}]}) + b"\n\n"


def messages_event(i: int) -> bytes:
    return b"event: content_block_delta\ndata: " + orjson.dumps(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"word{i} "}}) + b"\n\n"


class _Content:
    def __init__(self, chunks: list[bytes]):
        self.reads = iter(chunks[1:])

    async def readany(self) -> bytes:
        return next(self.reads, b"")


class _Response:
    """An upstream answer whose reads give `chunks` (the first is handed to the relay, as an attempt does)."""

    def __init__(self, chunks: list[bytes]):
        self.content = _Content(chunks)

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Breaker:
    def record_success(self) -> None:
        pass

    def record_failure(self, cause: str) -> None:
        raise AssertionError(f"the bench stream broke: {cause}")

    def release_trial(self) -> None:
        pass


def _feed(translator: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        translator.feed(chunk)
    translator.close()


def best(run: Callable[[], None], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    n = parser.parse_args().events
    chats = [chat_chunk(i) for i in range(n)]
    events = [b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":5,'
              b'"output_tokens":1}}}\n\n'] + [messages_event(i) for i in range(n)]

    async def drain(chunks: list[bytes], endpoint: Any, usage: bool = False) -> None:
        stream = relay(_Response(chunks), chunks[0], ModelRef("p", "m"), _Breaker(), StreamState(), endpoint.done,
                       UsageFilter() if usage else None, endpoint.stream_error)
        async for _ in stream:
            pass

    chats.append(b"data: [DONE]\n\n")
    events.append(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    loop = asyncio.new_event_loop()
    chat = best(lambda: loop.run_until_complete(drain(chats, CHAT)))
    chat_usage = best(lambda: loop.run_until_complete(drain(chats, CHAT, usage=True)))
    native = best(lambda: loop.run_until_complete(drain(events, MESSAGES)))
    translated_in = best(lambda: _feed(ChatToMessagesStream("msg_1", "m"), chats))
    translated_out = best(lambda: _feed(MessagesToChatStream("m", 1, False), events))
    loop.close()
    per = 1e6 / n
    print(f"events per run: {n}")
    print(f"relay, chat stream:                               {chat * per:.3f} us/event")
    print(f"relay, chat stream, the usage tiergate asked out: {chat_usage * per:.3f} us/event")
    print(f"relay, native Messages stream:                    {native * per:.3f} us/event")
    print(f"Messages client, chat provider (chat -> events):  {translated_in * per:.3f} us/event")
    print(f"chat client, Claude (events -> chat chunks):      {translated_out * per:.3f} us/event")


if __name__ == "__main__":
    main()
