"""Usage read from upstream bytes (without parsing the whole body), cost, and the bounded latency ring."""

from __future__ import annotations

import orjson
import pytest

from proxy.observability.stats import LatencyRing, RequestStats
from proxy.protocol.usage import Usage, cost_usd, find_usage, finish_reasons, price_for, response_model
from proxy.table.routing import Pricing


def test_usage_from_a_body_with_nested_details():
    body = orjson.dumps({"id": "x", "model": "m-1", "choices": [{"message": {"content": 'he said "usage": {1}'},
                                                                  "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                                   "prompt_tokens_details": {"cached_tokens": 2},
                                   "completion_tokens_details": {"reasoning_tokens": 1}}})
    assert find_usage(body) == Usage(12, 5, cache_read=2, reasoning=1)
    assert finish_reasons(body) == ("length",)
    assert response_model(body) == "m-1"


@pytest.mark.parametrize(("usage", "expected"), [
    # chat completions (OpenAI): cached input and reasoning output in the details
    ({"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
      "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
      "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0}}, Usage(2006, 300, 1920, 0, 128)),
    # the Responses API's names
    ({"input_tokens": 500, "input_tokens_details": {"cached_tokens": 100}, "output_tokens": 40,
      "output_tokens_details": {"reasoning_tokens": 30}, "total_tokens": 540}, Usage(500, 40, 100, 0, 30)),
    # cache writes (OpenRouter's detail name, and Anthropic's names through the OpenAI shape)
    ({"prompt_tokens": 90, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0,
                                                                            "cache_write_tokens": 80}},
     Usage(90, 1, 0, 80, 0)),
    ({"prompt_tokens": 90, "completion_tokens": 1, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 70},
     Usage(90, 1, 10, 70, 0)),
    # details that make no sense are bounded by the totals they are part of, or ignored
    ({"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 50},
      "completion_tokens_details": {"reasoning_tokens": "many"}}, Usage(5, 1, 5, 0, 0)),
    ({"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": None}, Usage(5, 1)),
])
def test_cached_and_reasoning_tokens_from_the_providers_usage(usage, expected):
    assert find_usage(orjson.dumps({"id": "x", "choices": [], "usage": usage})) == expected
    stream_tail = b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n"
    assert find_usage(stream_tail) == expected


def test_usage_with_spaces_null_and_missing():
    assert find_usage(b'{"usage" :  {"prompt_tokens": 3, "completion_tokens": 4}\n}') == Usage(3, 4)
    assert find_usage(b'{"choices": [], "usage": null}') is None
    assert find_usage(b'{"choices": []}') is None
    assert find_usage(b'{"usage": {"prompt_tokens": "x"}}') is None
    assert find_usage(b'{"usage": {"prompt_tokens": 2, "total_tokens": 2}}') == Usage(2, 0)  # embeddings
    assert find_usage(b'{"usage": {"input_tokens": 7, "output_tokens": 1}}') == Usage(7, 1)
    assert find_usage(b'{"usage": {"prompt_tokens": 1') is None  # cut off


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},          # OpenAI's layout: the fast path
    {"prompt_tokens": 12, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1}},
    {"prompt_tokens": 3, "completion_tokens": 4.5},                              # not whole numbers: no usage
    {"prompt_tokens": 3, "completion_tokens": -1},                               # negative: clamped to 0
    {"prompt_tokens": 3, "completion_tokens": 45},
    {"completion_tokens": 2, "prompt_tokens": 8},                                # other order: the general path
    {"prompt_tokens": 123456789012, "completion_tokens": 0},
])
def test_the_fast_path_agrees_with_a_full_parse(usage):
    body = orjson.dumps({"id": "x", "choices": [], "usage": usage})
    parsed = orjson.loads(body)["usage"]
    prompt, completion = parsed.get("prompt_tokens"), parsed.get("completion_tokens")
    cached = (parsed.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    expected = (Usage(max(prompt, 0), max(completion, 0), cached)
                if type(prompt) is int and type(completion) is int else None)
    assert find_usage(body) == expected
    assert find_usage(orjson.dumps({"usage": usage}, option=orjson.OPT_INDENT_2)) == expected  # with whitespace


def test_usage_from_a_stream_tail():
    events = [{"choices": [{"delta": {"content": "hi"}, "finish_reason": None}], "usage": None},
              {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": None},
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}]
    tail = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    assert find_usage(tail) == Usage(9, 2)
    assert finish_reasons(tail) == ("stop",)


def test_cost_per_million_tokens():
    price = price_for({"p/m": Pricing(2.5, 10.0)}, "p", "m")
    assert cost_usd(Usage(1000, 500), price) == pytest.approx(0.0075)
    assert price_for({}, "p", "m") is None and price_for({"p/m": Pricing(1, 1)}, "p", "other") is None


def test_cached_input_tokens_priced_separately_when_the_table_says():
    usage = Usage(1000, 500, cache_read=800, reasoning=200)
    # 200 uncached at 2.5, 800 cached at 1.25, 500 output (reasoning included) at 10
    assert cost_usd(usage, Pricing(2.5, 10.0, cached_input=1.25)) == pytest.approx((200 * 2.5 + 800 * 1.25
                                                                                      + 500 * 10) / 1e6)
    assert cost_usd(usage, Pricing(2.5, 10.0)) == pytest.approx(0.0075)  # no cached price: all at input


def test_cached_input_price_read_from_the_table():
    from proxy.table.routing import table_from_dict

    doc = {"providers": {"p": {"base_url": "http://127.0.0.1:1/v1", "api_key": "k"}},
           "pricing": {"p/m": {"input": 2.5, "output": 10, "cached_input": 1.25}, "p/n": {"input": 1, "output": 2}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "p/m"}]}
    table = table_from_dict(doc, source="test")
    assert table.pricing["p/m"] == Pricing(2.5, 10.0, 1.25) and table.pricing["p/n"].cached_input is None


def test_cache_writes_priced_at_cache_write_when_the_table_gives_it():
    from proxy.table.routing import table_from_dict
    from proxy.types import ModelRef

    doc = {"providers": {"p": {"base_url": "http://127.0.0.1:1/v1", "api_key": "k"}},
           "pricing": {"p/m": {"input": 3, "output": 15, "cached_input": 0.3, "cache_write": 3.75},
                       "p/n": {"input": 3, "output": 15, "cached_input": 0.3}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "p/m"}]}
    table = table_from_dict(doc, source="test")
    assert table.pricing["p/m"].cache_write == 3.75 and table.pricing["p/n"].cache_write is None
    usage = Usage(1000, 100, cache_read=600, cache_write=300)
    # 100 uncached at 3, 600 read at 0.3, 300 written at 3.75, 100 output at 15
    assert table.price(ModelRef("p", "m"), usage) == pytest.approx((100 * 3 + 600 * 0.3 + 300 * 3.75 + 100 * 15) / 1e6)
    # no cache_write price: the writes cost input, as before
    assert table.price(ModelRef("p", "n"), usage) == pytest.approx((400 * 3 + 600 * 0.3 + 100 * 15) / 1e6)
    # a write price alone: reads at input, writes at their own price
    assert cost_usd(usage, Pricing(3, 15, cache_write=3.75)) == pytest.approx((700 * 3 + 300 * 3.75 + 1500) / 1e6)
    doc["pricing"] = {"p/m": {"input": 3, "output": 15, "cache_write": "dear"}}
    with pytest.raises(Exception, match="pricing.p/m"):
        table_from_dict(doc, source="test")


def test_latency_ring_is_bounded_and_percentiles_are_nearest_rank():
    ring = LatencyRing(size=100)
    for v in range(1, 1001):
        ring.add(float(v))
    assert len(ring._values) == 100
    assert ring.percentiles(50, 95, 99) == [950.0, 995.0, 999.0]  # only the last 100 values are kept
    assert LatencyRing(8).percentiles(50) == [None]


def test_model_labels_are_capped():
    stats = RequestStats(max_models=2)
    for name in ("a", "b", "c"):
        stats.add(stats.model_label(name), True, 1.0, "miss", 1, 1, None, False)
    assert set(stats.models) == {"a", "b", "other"}
    snap = stats.snapshot()
    assert snap["requests"] == 3 and snap["cache_hit_rate"] == 0.0 and snap["cache"]["miss"] == 3
