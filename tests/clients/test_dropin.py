"""A transparent drop-in: through tiergate the official SDK sees what the provider would have sent
(status classes, Retry-After, headers both ways, deadlines fit for LLM calls, the right kind of model)."""

from __future__ import annotations

import asyncio
import time

import openai
import orjson
import pytest

from proxy.settings import RouterConfig

from ..conftest import BACKUP_KEY, PRIMARY_KEY, table_doc
from ..upstream import OPENAI_VERSION, BreakStream, Fail, Ok

MESSAGES = [{"role": "user", "content": "hi"}]


def sdk(running, **kw):
    return openai.AsyncOpenAI(base_url=running.v1, api_key="sk-client", **kw)


# -- errors and retries as the SDK expects them ---------------------------------------------------


async def test_an_upstream_429_reaches_the_sdk_as_a_rate_limit_with_its_retry_after(upstream, start_tiergate):
    running = await start_tiergate(table_doc(upstream))
    upstream.default = Fail(429, retry_after=20, retry_after_ms=20000,
                            headers={"x-ratelimit-remaining-requests": "0"})
    async with sdk(running, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
    response = caught.value.response
    assert response.status_code == 429
    assert response.headers["retry-after"] == "20" and response.headers["retry-after-ms"] == "20000"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-should-retry"] == "false"
    assert "primary failed with 429" in caught.value.message  # the provider's message, with tiergate's
    assert upstream.calls == 1  # a Retry-After longer than tiergate waits: not retried within the call


@pytest.mark.parametrize("status", [429, 500])
async def test_retries_do_not_multiply(upstream, backup, start_tiergate, status):
    running = await start_tiergate(table_doc(upstream, backup), max_retries=3)
    upstream.default = Fail(status, retry_after=0)
    backup.default = Fail(status, retry_after=0)
    async with sdk(running, max_retries=2) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
    assert caught.value.status_code == status  # the class the provider gave, not a 502
    assert upstream.calls + backup.calls == 3  # tiergate's TIERGATE_MAX_RETRIES, not 3 x (1 + 2)


async def test_an_unreachable_provider_is_a_502_and_a_deadline_a_504(upstream, start_tiergate):
    doc = table_doc(upstream)
    doc["providers"]["primary"]["base_url"] = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    running = await start_tiergate(doc)
    async with sdk(running, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
        assert caught.value.status_code == 502
    running = await start_tiergate(table_doc(upstream))
    upstream.default = Ok(delay=2)
    async with sdk(running, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES,
                                                 extra_headers={"x-tiergate-timeout": "0.3"})
        assert caught.value.status_code == 504


async def test_a_rate_limit_is_not_an_outage_of_the_provider(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), breaker_failure_threshold=2, cooldown_cap=30)
    upstream.default = Fail(429, retry_after=10)
    async with sdk(running, max_retries=0) as client:
        for _ in range(5):
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
        assert upstream.calls == 1  # the deployment cools down for its Retry-After: no more 429s earned
        upstream.default = Ok()
        # another model of the same provider answers at once
        answer = await client.chat.completions.create(model="fast", messages=MESSAGES)
        assert answer.choices[0].message.content == "primary answered model-fast"
    breakers = running.router.breakers.snapshot()
    assert breakers["primary/model-a"]["state"] == "closed" and breakers["primary/model-a"]["failures"] == 0
    assert breakers["primary/model-a"]["cooldown_s"] > 5
    async with http.get(running.url + "/health/details") as resp:
        details = await resp.json()
    assert details["circuit_breakers"]["primary/model-a"]["cooldown_s"] > 5
    assert details["providers"]["primary"]["available"] is True


async def test_a_5xx_streak_opens_only_that_deployments_breaker(upstream, start_tiergate):
    running = await start_tiergate(table_doc(upstream), breaker_failure_threshold=2, max_retries=1)
    upstream.default = Fail(500)
    async with sdk(running, max_retries=0) as client:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
        assert caught.value.status_code == 503 and "breaker_open" in caught.value.message
        upstream.default = Ok()
        answer = await client.chat.completions.create(model="fast", messages=MESSAGES)
        assert answer.choices[0].message.content == "primary answered model-fast"
    assert running.router.breakers.get("primary/model-a").state == "open"
    assert running.router.breakers.get("primary/model-fast").state == "closed"


# -- headers, both ways ---------------------------------------------------------------------------------


async def test_client_headers_reach_the_provider_and_its_headers_reach_the_client(upstream, start_tiergate):
    doc = table_doc(upstream)
    doc["providers"]["primary"]["headers"] = {"x-vendor-team": "from-table"}
    running = await start_tiergate(doc, drop_headers=("x-internal-secret",))
    async with sdk(running, max_retries=0, organization="org-123", project="proj-9") as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="general_purpose", messages=MESSAGES,
            extra_headers={"OpenAI-Beta": "assistants=v2", "Idempotency-Key": "idem-1", "X-Vendor-Flag": "on",
                           "x-vendor-team": "from-client", "X-Use-Case": "general_purpose",
                           "x-tiergate-timeout": "30", "x-internal-secret": "nope"})
    sent = {k.lower(): v for k, v in upstream.requests[-1].headers.items()}
    assert sent["openai-organization"] == "org-123" and sent["openai-project"] == "proj-9"
    assert sent["openai-beta"] == "assistants=v2" and sent["idempotency-key"] == "idem-1"
    assert sent["x-vendor-flag"] == "on" and sent["x-vendor-team"] == "from-table"  # the table wins
    assert sent["authorization"] == f"Bearer {PRIMARY_KEY}"  # never the client's key
    assert sent["user-agent"].startswith("AsyncOpenAI/Python")
    for dropped in ("x-use-case", "x-tiergate-timeout", "x-internal-secret"):
        assert dropped not in sent
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "10000" and headers["openai-processing-ms"] == "42"
    assert headers["openai-version"] == OPENAI_VERSION
    assert raw.request_id == "req_primary_1"  # the provider's id, as the SDK reads it
    assert headers["x-tiergate-request-id"].startswith("req_") and headers["x-tiergate-request-id"] != "req_primary_1"
    assert headers["x-tiergate-model"] == "primary/model-a"


async def test_provider_headers_come_back_on_errors_and_streams(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream))
    upstream.push(Fail(400))
    async with sdk(running, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
        assert caught.value.request_id == "req_primary_1"
        assert caught.value.response.headers["openai-processing-ms"] == "42"
        raw = await client.chat.completions.with_raw_response.create(model="general_purpose",
                                                                     messages=MESSAGES, stream=True)
        assert raw.headers["x-ratelimit-remaining-requests"] == "9999"
        assert raw.headers["content-type"].startswith("text/event-stream")
        parsed = raw.parse()
        async for _ in (await parsed if asyncio.iscoroutine(parsed) else parsed):
            pass


async def test_bring_your_own_key_passes_the_clients_key(upstream, start_tiergate):
    doc = table_doc(upstream)
    doc["providers"]["primary"]["pass_client_key"] = True
    running = await start_tiergate(doc)
    async with sdk(running, max_retries=0) as client:
        await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
    assert upstream.requests[-1].headers["Authorization"] == "Bearer sk-client"


# -- deadlines that fit LLM calls ---------------------------------------------------------------------


def test_the_default_deadline_is_the_sdks_own():
    config = RouterConfig.load(environ={}, dotenv_path=None)
    assert config.timeout == 600 and config.first_byte_timeout < 60


async def test_a_stream_has_no_total_deadline_only_an_idle_bound(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), timeout=0.3, stream_idle_timeout=2)
    gate = asyncio.Event()
    upstream.push(Ok(gate=gate))
    async with sdk(running, max_retries=0) as client:
        stream = await client.chat.completions.create(model="general_purpose", messages=MESSAGES, stream=True)
        started = time.monotonic()
        asyncio.get_running_loop().call_later(0.8, gate.set)  # the stream outlives the non-stream deadline
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "primary answered model-a" and time.monotonic() - started >= 0.7


async def test_a_route_timeout_and_the_sdks_timeout_shorten_the_deadline(upstream, start_tiergate):
    running = await start_tiergate(table_doc(upstream, timeout=0.3))
    upstream.default = Ok(delay=2)
    async with sdk(running, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES)
        assert caught.value.status_code == 504
    running = await start_tiergate(table_doc(upstream))
    async with sdk(running, max_retries=0, timeout=5.0) as client:
        with pytest.raises(openai.APIStatusError) as caught:  # without the header: the answer, after 2 s
            await client.chat.completions.create(model="general_purpose", messages=MESSAGES,
                                                 extra_headers={"x-stainless-read-timeout": "0.4"})
        assert caught.value.status_code == 504


# -- routing that never sends the wrong kind of model --------------------------------------------------


async def test_embeddings_with_routing_headers_use_the_routes_embeddings_model(upstream, start_tiergate):
    doc = table_doc(upstream)
    doc["routes"][0]["embeddings_model"] = "primary/text-embedding-3-small"
    running = await start_tiergate(doc)
    headers = {"X-Use-Case": "general_purpose", "X-Model-Tier": "standard"}
    async with sdk(running, max_retries=0, default_headers=headers) as client:
        vectors = await client.embeddings.create(model="text-embedding-3-large", input=["a", "b"])  # base64
        assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 3
        assert upstream.requests[-1].json["model"] == "text-embedding-3-small"
        # a route without an embeddings model: the body's model decides, never the chat model
        await client.embeddings.create(model="embed-small", input=[[1, 2, 3]],
                                       extra_headers={"X-Use-Case": "code_generation", "X-Model-Tier": "premium"})
        assert upstream.requests[-1].json["model"] == "text-embed"
        assert upstream.requests[-1].json["input"] == [[1, 2, 3]]
        # no model in the body: the default route's embeddings model
        await client.embeddings.create(model="auto", input="x",
                                       extra_headers={"X-Use-Case": "code_generation", "X-Model-Tier": "premium"})
        assert upstream.requests[-1].json["model"] == "text-embedding-3-small"
        await client.completions.create(model="fast", prompt="Once")
        assert upstream.requests[-1].json["model"] == "model-fast"
    running = await start_tiergate(table_doc(upstream))  # no embeddings model anywhere
    async with sdk(running, max_retries=0, default_headers=headers) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="auto", input="x")
        assert "embeddings_model" in caught.value.message


async def test_reasoning_models_never_get_parameters_they_refuse(upstream, backup, start_tiergate):
    doc = table_doc(upstream, backup, model="primary/o3-mini", max_tokens=500, temperature=0.3)
    doc["model_rules"] = {"model-b": {"drop": ["seed"]}}
    running = await start_tiergate(doc)
    upstream.push(Fail(500))
    async with sdk(running, max_retries=0) as client:
        await client.chat.completions.create(model="general_purpose", messages=MESSAGES, seed=1, top_p=0.5)
    to_o3, to_b = upstream.requests[-1].json, backup.requests[-1].json
    assert "temperature" not in to_o3 and "top_p" not in to_o3 and "max_tokens" not in to_o3
    assert to_o3["max_completion_tokens"] == 500 and to_o3["seed"] == 1
    assert to_b["temperature"] == 0.3 and to_b["top_p"] == 0.5 and to_b["max_tokens"] == 500  # another family
    assert "seed" not in to_b


# -- truth in telemetry ---------------------------------------------------------------------------------


async def test_a_stream_that_breaks_is_not_counted_as_a_200(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream))
    upstream.push(BreakStream(after=2))
    async with http.post(running.v1 + "/chat/completions",
                         data=orjson.dumps({"model": "general_purpose", "messages": MESSAGES, "stream": True})) as r:
        await r.read()
    running.router.telemetry.drain()
    async with http.get(running.url + "/metrics") as resp:
        text = await resp.text()
    line = next(ln for ln in text.splitlines() if ln.startswith("tiergate_requests_total{"))
    assert 'status="502"' in line and 'status="200"' not in text.split("tiergate_requests_total{", 1)[1][:200]
    assert BACKUP_KEY not in text
