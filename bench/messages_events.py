"""CPU per stream event of the Messages paths, in-process (no sockets): what tiergate adds to each event
beyond the relay every stream takes.

    python bench/messages_events.py [--events 200000]

Rows: a native Messages stream (the adapter's wrapper: usage of the first event noted, error events
re-worded; the relay itself is the same as chat's), a Messages call answered by a chat provider
(chat chunks -> Messages events), and a chat call answered by Claude (Messages events -> chat chunks).
Each is fed realistic events one read at a time; the figure is CPU microseconds per event (best of 5).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable

import orjson

from proxy.adapters.anthropic import _messages_stream
from proxy.adapters.messages import ChatToMessagesStream, MessagesToChatStream


def chat_chunk(i: int) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", "choices": [{"index": 0, "delta": {"content": f"word{i} "},
                                                                "finish_reason": None}]}) + b"\n\n"


def messages_event(i: int) -> bytes:
    return b"event: content_block_delta\ndata: " + orjson.dumps(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"word{i} "}}) + b"\n\n"


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

    async def relay(chunks: list[bytes]) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def drain(stream: AsyncIterator[bytes]) -> None:
        async for _ in stream:
            pass

    loop = asyncio.new_event_loop()
    baseline = best(lambda: loop.run_until_complete(drain(relay(events))))
    native = best(lambda: loop.run_until_complete(drain(_messages_stream(relay(events)))))
    to_messages = ChatToMessagesStream("msg_1", "m")
    to_chat = MessagesToChatStream("m", 1, False)
    translated_in = best(lambda: [to_messages.feed(c) for c in chats])
    translated_out = best(lambda: [to_chat.feed(e) for e in events])
    loop.close()
    per = 1e6 / n
    print(f"events per run: {n}")
    print(f"relay generator alone (chat and Messages alike): {baseline * per:.3f} us/event")
    print(f"native Messages stream, adapter wrapper added:    {(native - baseline) * per:.3f} us/event")
    print(f"Messages client, chat provider (chat -> events):  {translated_in * per:.3f} us/event")
    print(f"chat client, Claude (events -> chat chunks):      {translated_out * per:.3f} us/event")


if __name__ == "__main__":
    main()
