"""Rounds of clients that leave mid-stream do not add up in the RSS of a real `tiergate serve` (stream
recovery on, as by default: what it keeps of each answer is released when the client leaves). The
full-size run (500 clients a round) is `bench/departures.py`; this is the same, smaller (40 clients
reading 12 kB each), with the same 5 MB bound."""

from __future__ import annotations

from bench.departures import measure

CLIENTS = 40
MIB = 1024  # KiB


async def test_three_rounds_of_clients_leaving_mid_stream_leave_rss_where_the_first_left_it():
    before, first, second, third = await measure(CLIENTS, 3, 12_000)
    assert third - first < 5 * MIB, (before, first, second, third)
