"""End-to-end: the official `openai` SDK against a running tiergate."""

from __future__ import annotations

import openai
import pytest

from ..conftest import table_doc
from ..upstream import Fail, Hang


@pytest.fixture
async def client(tiergate):
    async with openai.AsyncOpenAI(base_url=tiergate.v1, api_key="sk-client", max_retries=0) as c:
        yield c


MESSAGES = [{"role": "user", "content": "Say hi"}]


async def test_chat(client, upstream):
    answer = await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
    assert answer.choices[0].message.content == "primary answered model-a"
    assert answer.usage.total_tokens > 0


async def test_chat_with_routing_headers_and_raw_response(client, upstream):
    raw = await client.chat.completions.with_raw_response.create(
        model="anything", messages=MESSAGES,
        extra_headers={"X-Use-Case": "code_generation", "X-Model-Tier": "premium"})
    assert raw.headers["x-tiergate-route"] == "code_generation:premium"
    assert raw.parse().choices[0].message.content == "primary answered model-p"


async def test_streamed_chat(client):
    stream = await client.chat.completions.create(model="general_purpose", messages=MESSAGES, stream=True,
                                                  stream_options={"include_usage": True})
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == "primary answered model-a"
    assert usage is not None and usage.completion_tokens == 3


async def test_completions(client):
    answer = await client.completions.create(model="fast", prompt="Once upon")
    assert answer.choices[0].text == "primary completed model-fast"


async def test_streamed_completions(client):
    stream = await client.completions.create(model="fast", prompt="Once upon", stream=True)
    text = "".join([c.choices[0].text async for c in stream])
    assert text.strip() == "primary completed model-fast"


async def test_embeddings(client):
    result = await client.embeddings.create(model="embed-small", input=["one", "three"], encoding_format="float")
    assert [d.embedding[0] for d in result.data] == [3.0, 5.0]


async def test_models(client):
    ids = [m.id async for m in client.models.list()]
    assert "code_generation:premium" in ids


async def test_bad_request_raises_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="general_purpose", messages=MESSAGES,
                                             extra_headers={"X-Model-Tier": "platinum"})


async def test_upstream_errors_map_to_sdk_exceptions(client, upstream, backup):
    upstream.push(Fail(401, body=b'{"error":{"message":"bad key","type":"invalid_request_error",'
                                 b'"param":null,"code":"invalid_api_key"}}'))
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
    upstream.default = Fail(500)
    backup.default = Fail(503)
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
    assert err.value.status_code == 500  # the deciding (last) failure: the primary's 500
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "primary/model-a: http_500" in err.value.message and "backup/model-b: http_503" in err.value.message


async def test_timeout_is_504_in_the_sdk(upstream, start_tiergate):
    upstream.default = Hang()
    running = await start_tiergate(table_doc(upstream), timeout=0.3, max_retries=1)
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
    assert err.value.status_code == 504


async def test_too_large_is_413_in_the_sdk(upstream, start_tiergate):
    running = await start_tiergate(table_doc(upstream), max_body_bytes=500)
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="general_purpose",
                                                 messages=[{"role": "user", "content": "x" * 1000}])
    assert err.value.status_code == 413
