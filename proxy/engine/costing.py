"""What an answer cost: its token usage read from the upstream bytes (protocol/usage.py), priced by the
routing table (`RoutingTable.price`).

The router charges a non-stream answer before its response goes out (so it can carry
`x-tiergate-cost-usd`) and a stream when it ends, from its last bytes; observers (metrics, traces,
the request log) only report `record.usage` and `record.cost_usd`.
"""

from __future__ import annotations

from ..outcome import RequestRecord, Result, StreamState
from ..protocol.usage import Usage, find_usage, messages_stream_usage, usage_details, usage_of
from ..table.routing import RoutingTable

# answered without an upstream call of their own: their tokens were paid for by another request
UNPAID_CACHE_RESULTS = frozenset({"hit", "coalesced"})


def charge(record: RequestRecord, usage: Usage | None, table: RoutingTable | None) -> None:
    """Note `usage` on the record and its cost at the table's price (left None for a model without one)."""
    record.usage = usage
    ref = record.ref
    if usage is None or ref is None:
        return
    if record.cache in UNPAID_CACHE_RESULTS:
        record.cost_usd = 0.0
    elif table is not None:
        record.cost_usd = table.price(ref, usage)


def charge_answer(record: RequestRecord, result: Result, table: RoutingTable | None) -> None:
    """A non-stream answer: usage from the parse dispatch already made of it (no second parse), else found
    in its bytes."""
    if result.body is None:
        return
    data = result.data
    charge(record, usage_of(data) if data is not None else find_usage(result.body), table)


def charge_stream(record: RequestRecord, state: StreamState, table: RoutingTable | None) -> None:
    """A stream at its end: usage from its last event; a stream cut short before that event is charged
    for what it produced, estimated from its size."""
    tail = state.tail
    if not tail:
        return
    head = state.head_usage  # a Messages stream: its input counted in its first event, its output in its last
    if head is not None and head.prompt:
        usage = messages_stream_usage(head, tail)
    else:
        usage = find_usage(tail)
        if usage is not None and b'"message_delta"' in tail:  # Messages relayed as chat: output from the end
            usage = messages_stream_usage(usage, tail)
    if usage is not None:
        charge(record, usage, table)
        record.usage_details = usage_details(tail)
    elif not state.completed and state.request_bytes:
        charge(record, state.estimate(), table)
        record.usage_estimated = True
