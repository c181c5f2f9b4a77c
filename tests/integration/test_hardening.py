"""Hardening over real loopback HTTP: inbound keys, per-provider limits, slow and oversized clients."""

from __future__ import annotations

import asyncio

import openai
import orjson
import pytest

from proxy.edge.auth import InboundAuth, check_bind, is_loopback
from proxy.engine.slots import ProviderSlots
from proxy.types import AuthenticationError, ConfigError, RateLimitError

from ..conftest import table_doc, until
from ..upstream import Ok
from .test_cli import run_cli

CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]}
KEYS = ("tg-key-one-0123456789", "tg-key-two-9876543210")


async def post(http, url, body, headers=None):
    async with http.post(url, data=body if isinstance(body, bytes) else orjson.dumps(body),
                         headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


def assert_openai_error(data: bytes, code: str | None = None) -> dict:
    error = orjson.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return error


# -- inbound keys ----------------------------------------------------------------------------


async def test_v1_needs_a_configured_key_when_keys_are_set(upstream, start_tiergate, http):
    tg = await start_tiergate(table_doc(upstream), api_keys=KEYS)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"},
                    {"Authorization": f"Bearer {KEYS[0]}x"}, {"Authorization": "Bearer"}):
        status, _, data = await post(http, tg.v1 + "/chat/completions", CHAT, headers)
        assert status == 401, headers
        error = assert_openai_error(data, "invalid_api_key")
        assert error["type"] == "authentication_error" and KEYS[0] not in error["message"]
    for path in ("/v1/models", "/v1/nothing-here"):
        async with http.get(tg.url + path) as resp:
            assert resp.status == 401
            assert_openai_error(await resp.read(), "invalid_api_key")
    assert upstream.calls == 0
    # the probes and the spec stay open: kubelet and scrapers carry no key
    for path in ("/health", "/ready", "/openapi.json"):
        async with http.get(tg.url + path) as resp:
            assert resp.status == 200, path
    async with http.get(tg.url + "/health/details") as resp:  # key names, limits and their use: behind the key
        assert resp.status == 401


async def test_either_key_works_with_the_openai_sdk(upstream, start_tiergate):
    tg = await start_tiergate(table_doc(upstream), api_keys=KEYS)
    for key in KEYS:
        async with openai.AsyncOpenAI(base_url=tg.v1, api_key=key, max_retries=0) as client:
            answer = await client.chat.completions.create(model="general_purpose", messages=CHAT["messages"])
            assert answer.choices[0].message.content == "primary answered model-a"
            assert (await client.models.list()).data
    async with openai.AsyncOpenAI(base_url=tg.v1, api_key="not-a-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="general_purpose", messages=CHAT["messages"])
    # the client's key is never sent upstream
    assert all(KEYS[0] not in str(r.headers) and KEYS[1] not in str(r.headers) for r in upstream.requests)


def test_inbound_auth_unit():
    InboundAuth(()).check(None)  # no keys configured: open
    auth = InboundAuth(KEYS)
    auth.check(f"Bearer {KEYS[1]}")
    auth.check(f"bearer {KEYS[0]}")
    for bad in (None, "", "Bearer ", f"Token {KEYS[0]}", "Bearer \udcff"):
        with pytest.raises(AuthenticationError):
            auth.check(bad)


def test_non_loopback_bind_needs_keys_or_insecure():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.internal")
    check_bind("127.0.0.1", (), False)
    check_bind("0.0.0.0", ("k",), False)
    check_bind("0.0.0.0", (), True)
    with pytest.raises(ConfigError, match="--insecure"):
        check_bind("0.0.0.0", (), False)


def test_serve_refuses_an_open_bind_without_keys():
    done = run_cli("serve", "--demo", "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without inbound keys" in done.stderr
    assert "Traceback" not in done.stderr


# -- per-provider concurrency ------------------------------------------------------------------


async def test_provider_cap_queues_then_refuses_with_429(upstream, start_tiergate, http):
    doc = table_doc(upstream)
    doc["providers"]["primary"]["max_concurrency"] = 1
    tg = await start_tiergate(doc, max_queue_per_provider=1)
    gate = asyncio.Event()
    upstream.push(Ok(gate=gate))
    url = tg.v1 + "/chat/completions"
    async with http.post(url, data=orjson.dumps({**CHAT, "stream": True})) as streaming:
        assert streaming.status == 200
        await streaming.content.readany()  # the stream holds the only slot
        queued = asyncio.create_task(post(http, url, CHAT))
        limits = tg.router.loop.limits
        await until(lambda: limits.snapshot()["primary"]["queued"] == 1)
        status, headers, data = await post(http, url, CHAT)
        assert status == 429 and headers["Retry-After"] == "1"
        assert assert_openai_error(data, "rate_limited")["type"] == "rate_limit_error"
        assert not queued.done()
        gate.set()
        await streaming.read()
    status, _, _ = await asyncio.wait_for(queued, 5)
    assert status == 200
    assert limits.snapshot()["primary"] == {"capacity": 1, "active": 0, "queued": 0}
    assert upstream.calls == 2  # the refused request never reached the provider


async def test_cap_with_no_queue_and_global_default(upstream, start_tiergate, http):
    tg = await start_tiergate(table_doc(upstream), max_concurrent_per_provider=2)
    for _ in range(3):
        status, _, _ = await post(http, tg.v1 + "/chat/completions", CHAT)
        assert status == 200
    assert tg.router.loop.limits.snapshot()["primary"] == {"capacity": 2, "active": 0, "queued": 0}


async def test_slots_hand_over_and_survive_cancelled_waiters():
    slots = ProviderSlots("p", capacity=1, max_queue=2)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    assert slots.queued == 2
    with pytest.raises(RateLimitError):
        await slots.acquire()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    slots.release()  # goes to `second`, skipping the cancelled waiter
    await asyncio.wait_for(second, 1)
    assert slots.active == 1 and slots.queued == 0
    slots.release()
    assert slots.active == 0


# -- slow, oversized and malformed clients -------------------------------------------------------


async def test_trickling_body_is_cut_off_with_408(upstream, start_tiergate):
    tg = await start_tiergate(table_doc(upstream), client_body_timeout=0.2)
    port = int(tg.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"messages\":")
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = await reader.readexactly(length)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert_openai_error(body, "request_timeout")
    assert upstream.calls == 0


async def test_oversized_header_is_a_4xx_not_a_500(upstream, start_tiergate, http):
    tg = await start_tiergate(table_doc(upstream))
    async with http.post(tg.v1 + "/chat/completions", data=orjson.dumps(CHAT),
                         headers={"X-Big": "a" * 20000}) as resp:
        assert 400 <= resp.status < 500
    async with http.post(tg.v1 + "/chat/completions", data=orjson.dumps(CHAT)) as resp:
        assert resp.status == 200  # the server is still fine


async def test_too_many_messages_and_too_big_body(upstream, start_tiergate, http):
    tg = await start_tiergate(table_doc(upstream), max_messages=3, max_body_bytes=2000)
    status, _, data = await post(http, tg.v1 + "/chat/completions",
                                 {"messages": [{"role": "user", "content": "x"}] * 4})
    assert status == 400 and assert_openai_error(data)["param"] == "messages"
    status, _, data = await post(http, tg.v1 + "/chat/completions",
                                 {"messages": [{"role": "user", "content": "x" * 5000}]})
    assert status == 413 and assert_openai_error(data, "request_too_large")


async def test_openapi_describes_the_endpoints(tiergate, http):
    async with http.get(tiergate.url + "/openapi.json") as resp:
        assert resp.status == 200
        spec = orjson.loads(await resp.read())
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health",
                 "/ready", "/health/details", "/metrics", "/openapi.json"):
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


async def test_undecodable_body_and_odd_expect_are_4xx(upstream, start_tiergate):
    """Found by the fuzz run: both used to answer 500."""
    tg = await start_tiergate(table_doc(upstream))
    port = int(tg.url.rsplit(":", 1)[1])
    for request, status in ((b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                             b"Content-Length: 2\r\n\r\n{}", b"400"),
                            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: \x80\r\n"
                             b"Content-Length: 2\r\n\r\n{}", b"417")):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.read(2000)
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 " + status), head
        assert_openai_error(body)
