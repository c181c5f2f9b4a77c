"""The failure policy a careful client would follow, through a real tiergate over loopback with the mock
upstreams playing the providers: a prompt too long for a model goes to a larger one, a flapping primary
takes its traffic back at the next probe, the first-byte budget leaves a fallback time within the
client's deadline, and a short 429 or a lone 5xx is tried once more at the same deployment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import openai
import orjson
import pytest

from ..conftest import table_doc
from ..upstream import Fail, Hang, Ok

LONG = "word " * 400  # about 500 tokens by the usual estimate (four characters a token)


def chat(content: str = "hi", **extra):
    return {"model": "general_purpose", "messages": [{"role": "user", "content": content}], **extra}


async def post(http, url, body, headers=None):
    async with http.post(url, data=orjson.dumps(body), headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


def breaker(running, deployment):
    return running.router.breakers.get(deployment)


# 1. a prompt longer than the model's context window ------------------------------------------------

@pytest.mark.parametrize("message", [
    None,  # OpenAI's own words and its code
    "This model's maximum context length is {window} tokens. However, you requested {tokens} tokens (vLLM)",
    "prompt is too long: {tokens} tokens > {window} maximum",
    "the request exceeds the available context size, try increasing it",
    "Input has too many tokens for this model",
])
async def test_a_prompt_too_long_for_the_primary_goes_to_the_fallback(tiergate, upstream, backup, http, message):
    upstream.context_windows["model-a"] = 100
    if message is not None:
        upstream.context_message = message
    status, headers, data = await post(http, tiergate.v1 + "/chat/completions", chat(LONG))
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    assert orjson.loads(data)["choices"][0]["message"]["content"] == "backup answered model-b"
    assert upstream.calls == 1 and backup.calls == 1  # never the same deployment again
    assert breaker(tiergate, "primary/model-a").failures == 0  # it answered: not counted against it
    # a short prompt still goes to the primary
    status, headers, _ = await post(http, tiergate.v1 + "/chat/completions", chat("hi"))
    assert status == 200 and headers["x-tiergate-provider"] == "primary"


async def test_no_candidate_takes_the_prompt_the_providers_own_400_goes_back(tiergate, upstream, backup, http):
    upstream.context_windows["model-a"] = 100
    backup.context_windows["model-b"] = 200
    async with openai.AsyncOpenAI(base_url=tiergate.v1, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**chat(LONG))
    error = caught.value
    assert error.code == "context_length_exceeded" and error.param == "messages"
    assert "maximum context length is 200 tokens" in error.message  # the last one's own words
    assert upstream.calls == 1 and backup.calls == 1  # each once, although max_retries allows three
    assert error.response.headers["x-tiergate-model"] == "backup/model-b"


async def test_a_candidate_the_table_knows_is_too_small_is_not_sent_the_prompt(upstream, backup, start_tiergate,
                                                                               http):
    doc = table_doc(upstream, backup)
    doc["context_windows"] = {"primary/model-a": 100, "backup/model-b": 128000}
    running = await start_tiergate(doc)
    status, headers, _ = await post(http, running.v1 + "/chat/completions", chat(LONG))
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    assert upstream.calls == 0 and headers["x-tiergate-attempts"] == "1"
    status, headers, _ = await post(http, running.v1 + "/chat/completions", chat("hi"))
    assert status == 200 and headers["x-tiergate-provider"] == "primary"


async def test_a_window_no_larger_than_the_one_that_refused_is_skipped(upstream, backup, start_tiergate, http):
    doc = table_doc(upstream, backup)
    doc["model_rules"] = {"model-b": {"context_window": 100}}  # as small as the primary's
    running = await start_tiergate(doc)
    upstream.context_windows["model-a"] = 10
    upstream.context_message = "This model's maximum context length is 100 tokens."
    status, _, data = await post(http, running.v1 + "/chat/completions", chat("x" * 300))  # ~80 tokens: fits b
    assert status == 400 and orjson.loads(data)["error"]["code"] == "context_length_exceeded"
    assert upstream.calls == 1 and backup.calls == 0  # the 100-token window said no: b's is no larger


async def test_a_window_a_provider_named_is_remembered_for_the_next_long_prompt(tiergate, upstream, backup, http):
    upstream.context_windows["model-a"] = 100
    await post(http, tiergate.v1 + "/chat/completions", chat(LONG))
    assert upstream.calls == 1
    status, headers, _ = await post(http, tiergate.v1 + "/chat/completions", chat(LONG))
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    assert upstream.calls == 1  # known too small now: not sent again


async def test_every_candidate_known_too_small_is_a_clear_400(upstream, backup, start_tiergate, http):
    doc = table_doc(upstream, backup)
    doc["context_windows"] = {"primary/model-a": 100, "backup/model-b": 100}
    running = await start_tiergate(doc)
    status, _, data = await post(http, running.v1 + "/chat/completions", chat(LONG))
    error = orjson.loads(data)["error"]
    assert status == 400 and error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert upstream.calls == backup.calls == 0


# 2. a flapping primary -----------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_a_primary_that_comes_back_takes_its_traffic_back_at_the_next_probe(upstream, backup,
                                                                                  start_tiergate, http):
    clock = Clock()
    doc = table_doc(upstream, backup, retry_same=0)
    running = await start_tiergate(doc, breaker_failure_threshold=2, breaker_recovery_timeout=60,
                                   breaker_clock=clock)
    upstream.default = Fail(503)
    for _ in range(2):
        await post(http, running.v1 + "/chat/completions", chat())
    assert breaker(running, "primary/model-a").state == "open"
    calls = upstream.calls
    clock.now += timedelta(seconds=5.1)  # the first probe: still down
    status, headers, _ = await post(http, running.v1 + "/chat/completions", chat())
    assert status == 200 and headers["x-tiergate-provider"] == "backup" and upstream.calls == calls + 1
    clock.now += timedelta(seconds=5.1)  # the next probe waits twice as long
    await post(http, running.v1 + "/chat/completions", chat())
    assert upstream.calls == calls + 1
    upstream.default = Ok()  # it recovers
    clock.now += timedelta(seconds=5)
    status, headers, _ = await post(http, running.v1 + "/chat/completions", chat())
    assert status == 200 and headers["x-tiergate-provider"] == "primary"  # 10 s after its last failed probe
    assert breaker(running, "primary/model-a").state == "closed"


# 3. the first-byte budget fits the client's deadline -----------------------------------------------

async def test_a_hung_primary_under_a_short_client_deadline_falls_back_in_time(tiergate, upstream, backup):
    upstream.default = Hang()
    async with openai.AsyncOpenAI(base_url=tiergate.v1, api_key="x", max_retries=0, timeout=2.0) as client:
        # the SDK sends x-stainless-read-timeout: 2 and gives up itself after 2 s: an answer is in time
        raw = await client.chat.completions.with_raw_response.create(**chat())
    assert raw.headers["x-tiergate-provider"] == "backup"  # the hedge started at half the deadline
    assert raw.parse().choices[0].message.content == "backup answered model-b"


async def test_a_hung_primary_stream_under_a_short_deadline_falls_back_in_time(tiergate, upstream, backup):
    upstream.default = Hang()
    async with openai.AsyncOpenAI(base_url=tiergate.v1, api_key="x", max_retries=0, timeout=5.0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            stream=True, extra_headers={"x-tiergate-timeout": "2"}, **chat())
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert raw.headers["x-tiergate-provider"] == "backup" and text == "backup answered model-b"


# 4. a careful client's retry of the same deployment --------------------------------------------------

@pytest.mark.parametrize("failure,route", [(Fail(429, retry_after=0.2), {}), (Fail(500), {"retry_same": 1}),
                                           (Fail(503), {"retry_same": 1})])
async def test_a_short_429_or_a_lone_5xx_is_tried_once_more_at_the_same_deployment(upstream, backup, start_tiergate,
                                                                                   http, failure, route):
    running = await start_tiergate(table_doc(upstream, backup, **route), retry_after_cap=1.0)
    upstream.push(failure)
    status, headers, _ = await post(http, running.v1 + "/chat/completions", chat())
    assert status == 200 and headers["x-tiergate-provider"] == "primary"
    assert headers["x-tiergate-attempts"] == "2" and upstream.calls == 2 and backup.calls == 0
    if failure.status == 429:  # it waited what the provider asked
        assert upstream.requests[1].at - upstream.requests[0].at >= 0.19


@pytest.mark.parametrize("failure", [Fail(429), Fail(429, retry_after=30), Fail(504), Fail(500)])
async def test_a_long_or_unknown_wait_goes_to_the_fallback_at_once(tiergate, upstream, backup, http, failure):
    upstream.push(failure)
    status, headers, _ = await post(http, tiergate.v1 + "/chat/completions", chat())
    assert status == 200 and headers["x-tiergate-provider"] == "backup" and upstream.calls == 1


async def test_retry_same_zero_falls_back_at_once_and_two_tries_twice(upstream, backup, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, backup, retry_same=0), retry_after_cap=1.0)
    upstream.push(Fail(429, retry_after=0.1))
    status, headers, _ = await post(http, running.v1 + "/chat/completions", chat())
    assert status == 200 and headers["x-tiergate-provider"] == "backup" and upstream.calls == 1
    running = await start_tiergate(table_doc(upstream, backup, retry_same=2), max_retries=4)
    upstream.push(Fail(500), Fail(502))
    status, headers, _ = await post(http, running.v1 + "/chat/completions", chat())
    assert status == 200 and headers["x-tiergate-provider"] == "primary" and upstream.calls == 4


async def test_retry_same_stays_within_the_attempt_budget(upstream, backup, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream, backup, retry_same=1), max_retries=1)
    upstream.push(Fail(500))
    status, _, _ = await post(http, running.v1 + "/chat/completions", chat())
    assert status == 500 and upstream.calls == 1 and backup.calls == 0


def test_retry_same_is_checked_when_the_table_loads(upstream, backup):
    from proxy.table.routing import table_from_dict
    from proxy.types import ConfigError

    with pytest.raises(ConfigError, match="retry_same"):
        table_from_dict(table_doc(upstream, backup, retry_same=9), source="test")
    with pytest.raises(ConfigError, match="context_windows"):
        table_from_dict({**table_doc(upstream, backup), "context_windows": {"primary/model-a": "big"}}, source="test")
