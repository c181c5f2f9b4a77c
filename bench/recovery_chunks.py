"""CPU per chunk that stream recovery adds to a chat stream that does not break, in-process (no sockets).

    python bench/recovery_chunks.py [--chunks 200000] [--streams 50]

Recovery wraps the stream of every route that has a fallback: it watches each chunk for the break and
keeps what was relayed (folded into the answer's text past a few tens of kB, so what it holds stays
bounded). The rows: the relay's generator alone, and the same with the recovery wrap, fed the same
chat chunks one read at a time (`--streams` streams sharing `--chunks` chunks); CPU microseconds per
chunk, best of 5. The difference is what recovery on by default costs a chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from proxy.adapters.openai import CHAT
from proxy.engine.dispatch.call import Call
from proxy.engine.recovery import StreamRecovery
from proxy.outcome import Result, StreamState
from proxy.planner.plan import Candidate, Plan
from proxy.types import ModelRef


def chat_chunk(i: int) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", "choices": [{"index": 0, "delta": {"content": f"word{i} "},
                                                                "finish_reason": None}]}) + b"\n\n"


def best(run: Callable[[], None], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--streams", type=int, default=50)
    args = parser.parse_args()
    per_stream = args.chunks // args.streams
    chunks = [chat_chunk(i) for i in range(per_stream)] + [b"data: [DONE]\n\n"]
    primary, backup = ModelRef("a", "m"), ModelRef("b", "m")
    plan = Plan("general_purpose:standard", None, (Candidate(primary), Candidate(backup)))
    call = Call(CHAT, {"messages": [{"role": "user", "content": "hi"}], "stream": True}, plan, stream=True)
    recovery = StreamRecovery(loop=None)  # type: ignore[arg-type]  # never asked to continue: nothing breaks

    async def relay(state: StreamState) -> AsyncIterator[bytes]:
        for chunk in chunks:
            state.chunks += 1
            yield chunk

    async def drain(stream: AsyncIterator[Any]) -> None:
        async for _ in stream:
            pass

    async def plain() -> None:
        for _ in range(args.streams):
            await drain(relay(StreamState()))

    async def wrapped() -> None:
        for _ in range(args.streams):
            state = StreamState()
            result = Result(200, primary, [], stream=relay(state), stream_state=state)
            await drain(recovery.wrap(result, call))

    loop = asyncio.new_event_loop()
    baseline = best(lambda: loop.run_until_complete(plain()))
    recovering = best(lambda: loop.run_until_complete(wrapped()))
    loop.close()
    per = 1e6 / (args.streams * len(chunks))
    print(f"chunks per run: {args.streams * len(chunks)} ({args.streams} streams of {len(chunks)})")
    print(f"relay generator alone:        {baseline * per:.3f} us/chunk")
    print(f"recovery wrap added:          {(recovering - baseline) * per:.3f} us/chunk")


if __name__ == "__main__":
    main()
