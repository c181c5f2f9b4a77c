"""The memory of which provider holds each stored Responses id: bounded, least recently used out."""

from __future__ import annotations

from proxy.fleet.affinity import Holder, ResponseAffinity

from ..conftest import make_config


async def test_memory_is_bounded_and_keeps_the_recent_ids():
    affinity = ResponseAffinity(make_config(response_affinity_size=2))
    await affinity.remember("resp_1", Holder("a", "m"))
    await affinity.remember("resp_2", Holder("b", "m", translated=True))
    assert await affinity.lookup("resp_1") == Holder("a", "m")
    await affinity.remember("resp_3", Holder("c", "m"))  # resp_2 is the least recently remembered
    assert await affinity.lookup("resp_2") is None
    assert await affinity.lookup("resp_1") == Holder("a", "m")
    await affinity.forget("resp_1")
    assert await affinity.lookup("resp_1") is None
    await affinity.close()


def test_holder_round_trips_through_its_encoding():
    for holder in (Holder("openai", "gpt-4o/2024"), Holder("local", "llama", translated=True)):
        assert Holder.decode(holder.encode()) == holder
    assert Holder.decode(b"garbage") is None
