"""LiteLLM's SDK as the client, pointed at tiergate as an OpenAI-compatible base: the routing headers in
`extra_headers`, a completion and a stream, embeddings to the route's embeddings model (never its
chat model), and a provider's rate limit raised as LiteLLM's RateLimitError."""

from __future__ import annotations

import os

import pytest

from ..conftest import ROUTING
from ..upstream import Fail

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
litellm = pytest.importorskip("litellm")

def through(routed) -> dict:
    return {"api_base": routed.v1, "api_key": "sk-client", "extra_headers": ROUTING, "num_retries": 0}


async def test_a_completion_and_a_stream(routed, upstream):
    answer = await litellm.acompletion(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                       **through(routed))
    assert answer.choices[0].message.content == "primary answered model-a"
    assert upstream.requests[-1].json["model"] == "model-a"
    stream = await litellm.acompletion(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                       stream=True, **through(routed))
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream]
    assert "".join(parts) == "primary answered model-a"


async def test_embeddings_go_to_the_routes_embeddings_model(routed, upstream):
    vectors = await litellm.aembedding(model="openai/text-embedding-3-large", input=["a", "b"], **through(routed))
    assert len(vectors.data) == 2
    assert upstream.requests[-1].json["model"] == "text-embedding-3-small"


async def test_a_providers_rate_limit_is_litellms_rate_limit_error(routed, upstream):
    upstream.default = Fail(429, retry_after=7)
    with pytest.raises(litellm.RateLimitError):
        await litellm.acompletion(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                  **through(routed))
