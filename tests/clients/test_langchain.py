"""LangChain's OpenAI integration as the client, the way its users point it at tiergate: the routing
headers in `default_headers`, chat (plain and streamed), embeddings to the route's embeddings model
(never its chat model), and a provider's rate limit raised as the SDK's own error."""

from __future__ import annotations

import openai
import pytest

from ..conftest import ROUTING
from ..upstream import Fail

langchain_openai = pytest.importorskip("langchain_openai")

async def test_chat_plain_and_streamed_with_routing_headers(routed, upstream):
    chat = langchain_openai.ChatOpenAI(base_url=routed.v1, api_key="sk-client", model="gpt-4o",
                                       default_headers=ROUTING, max_retries=0)
    answer = await chat.ainvoke("Say hello")
    assert answer.content == "primary answered model-a"
    assert upstream.requests[-1].json["model"] == "model-a"  # the route's model, not the name in the code
    pieces = [chunk.content async for chunk in chat.astream("Say hello")]
    assert "".join(pieces) == "primary answered model-a" and len(pieces) > 1


async def test_embeddings_go_to_the_routes_embeddings_model(routed, upstream):
    embeddings = langchain_openai.OpenAIEmbeddings(
        base_url=routed.v1, api_key="sk-client", model="text-embedding-3-large", default_headers=ROUTING,
        max_retries=0, check_embedding_ctx_length=False)  # token ids need tiktoken's files: tested over raw HTTP
    vectors = await embeddings.aembed_documents(["first", "second"])
    assert len(vectors) == 2 and all(len(v) == 3 for v in vectors)
    assert upstream.requests[-1].json["model"] == "text-embedding-3-small"


async def test_a_providers_rate_limit_is_the_sdks_rate_limit_error(routed, upstream):
    upstream.default = Fail(429, retry_after=7)
    chat = langchain_openai.ChatOpenAI(base_url=routed.v1, api_key="sk-client", model="gpt-4o",
                                       default_headers=ROUTING, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await chat.ainvoke("Say hello")
    assert caught.value.response.headers["retry-after"] == "7"
