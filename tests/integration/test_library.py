"""The in-process library API: the same dispatch path as the server, no HTTP in front."""

from __future__ import annotations

import pytest

import proxy
from proxy import LLMResponse, ModelTier, RouterConfig, UseCase, create_router, get_llm_router, router_context
from proxy.settings import DEMO_CONFIG_PATH
from proxy.table.routing import table_from_dict

from ..conftest import make_config, table_doc
from ..upstream import Fail


@pytest.fixture
async def router(upstream, backup):
    async with router_context(make_config(), table=table_from_dict(table_doc(upstream, backup),
                                                                   source="test")) as r:
        yield r


async def test_complete_with_a_string(router, upstream):
    answer = await router.complete("hello", use_case=UseCase.CODE_GENERATION, tier=ModelTier.PREMIUM)
    assert isinstance(answer, LLMResponse)
    assert answer.content == "primary answered model-p"
    assert answer.usage["total_tokens"] > 0 and answer.latency_ms > 0
    assert answer.metadata["route"] == "code_generation:premium" and answer.metadata["provider"] == "primary"
    assert upstream.requests[-1].json["messages"][-1] == {"role": "user", "content": "hello"}
    as_dict = answer.dict()
    assert as_dict["cached"] is False and as_dict["choices"][0]["message"]["content"]


async def test_complete_falls_back(router, upstream, backup):
    upstream.push(Fail(500))
    answer = await router.complete([{"role": "user", "content": "x"}], temperature=0.2)
    assert answer.metadata["provider"] == "backup" and answer.metadata["attempts"] == 2
    assert backup.requests[-1].json["temperature"] == 0.2


async def test_stream(router):
    chunks = [c async for c in router.stream("hi", use_case="general_purpose")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "primary answered model-a"


async def test_embed_and_text_completion(router):
    result = await router.embed(["a", "bbb"], model="embed-small")
    assert [d["embedding"][0] for d in result["data"]] == [1.0, 3.0]
    text = await router.complete_text("Once", model="fast")
    assert text.content == "primary completed model-fast"


async def test_errors_are_tiergate_errors(router, upstream, backup):
    upstream.default = Fail(500)
    backup.default = Fail(500)
    with pytest.raises(proxy.UpstreamError) as err:
        await router.complete("x")
    assert err.value.status == 500  # the providers' own status class
    with pytest.raises(proxy.UnknownRouteError):
        await router.complete("x", use_case="poetry")


async def test_get_llm_router_is_one_instance_per_process():
    config = RouterConfig.load(DEMO_CONFIG_PATH, environ={}, dotenv_path=None)
    first = await get_llm_router(config=config)
    try:
        assert await get_llm_router() is first
        answer = await first.complete("ping")
        assert answer.model and answer.content.startswith("Mock answer from")
    finally:
        await first.close()


async def test_create_router_and_demo_table_with_mock_provider():
    config = RouterConfig.load(DEMO_CONFIG_PATH, environ={}, dotenv_path=None)
    router = await create_router(config)
    try:
        answer = await router.complete("hello world", use_case="debugging", tier="economy", max_tokens=3)
        assert answer.choices[0]["finish_reason"] == "length"
        chunks = [c async for c in router.stream("hello", stream_options={"include_usage": True})]
        assert chunks[-1]["usage"]["completion_tokens"] > 0
        vectors = await router.embed("text", model="text-embedding-3-small")
        assert len(vectors["data"][0]["embedding"]) == 8
        assert (await router.get_health_status())["status"] == "healthy"
    finally:
        await router.close()


async def test_apply_table_swaps_the_snapshot_and_retires_dropped_providers(router, upstream):
    old_backup = router.providers["backup"]
    await router.apply_table(table_from_dict(table_doc(upstream), source="second"))
    assert router.table.source == "second"
    assert "backup" not in router.providers and old_backup in router._retired
    assert (await router.complete("x")).metadata["provider"] == "primary"
    await router._close_retired([old_backup])
    assert old_backup.session is None and not router._retired
