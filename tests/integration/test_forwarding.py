"""Forwarding over real loopback HTTP: tiergate in front of a real aiohttp mock upstream."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from ..conftest import BACKUP_KEY, PRIMARY_KEY, table_doc
from ..telemetry_support import requests_counted
from ..upstream import Fail, Hang, Ok, Reset


async def post(http, url, body, headers=None):
    async with http.post(url, data=orjson.dumps(body) if not isinstance(body, bytes) else body,
                         headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]}


async def test_forwards_with_model_rewritten_and_other_fields_untouched(tiergate, upstream, http):
    body = {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "response_format": {"type": "json_object"}, "seed": 42, "vendor_field": {"x": [1, 2]},
            "temperature": 0.9}
    status, headers, data = await post(http, tiergate.v1 + "/chat/completions", body)
    assert status == 200
    sent = upstream.requests[-1].json
    assert sent["model"] == "model-a"
    for key in ("tools", "response_format", "seed", "vendor_field", "messages", "temperature"):
        assert sent[key] == body[key]
    assert orjson.loads(data)["choices"][0]["message"]["content"] == "primary answered model-a"
    assert headers["x-tiergate-model"] == "primary/model-a"
    assert headers["x-tiergate-provider"] == "primary"
    assert headers["x-tiergate-route"] == "general_purpose:standard"
    assert headers["x-tiergate-attempts"] == "1"
    assert headers["x-request-id"]


async def test_upstream_body_bytes_are_passed_back_unchanged(tiergate, upstream, http):
    status, _, data = await post(http, tiergate.v1 + "/chat/completions", CHAT)
    assert status == 200
    # the mock serialises with orjson: compact; a re-serialisation with spaces would differ
    assert data.startswith(b'{"id":"chatcmpl-primary-1","object":"chat.completion"')


async def test_route_defaults_and_system_prompt(tiergate, upstream, http):
    headers = {"X-Use-Case": "code_generation", "X-Model-Tier": "PREMIUM"}
    status, resp_headers, _ = await post(http, tiergate.v1 + "/chat/completions", CHAT, headers)
    assert status == 200 and resp_headers["x-tiergate-route"] == "code_generation:premium"
    sent = upstream.requests[-1].json
    assert sent["model"] == "model-p" and sent["max_tokens"] == 999 and sent["temperature"] == 0.1
    assert sent["messages"][0] == {"role": "system", "content": "You write code."}
    await post(http, tiergate.v1 + "/chat/completions", {**CHAT, "max_tokens": 5}, headers)
    assert upstream.requests[-1].json["max_tokens"] == 5


async def test_auth_headers_client_key_never_forwarded(tiergate, upstream, backup, http):
    await post(http, tiergate.v1 + "/chat/completions", CHAT, {"Authorization": "Bearer client-own-key"})
    assert upstream.requests[-1].headers["Authorization"] == f"Bearer {PRIMARY_KEY}"
    assert upstream.requests[-1].headers["User-Agent"].startswith("Python/")  # the client's own, not aiohttp's
    upstream.push(Fail(500))
    status, headers, _ = await post(http, tiergate.v1 + "/chat/completions", CHAT,
                                    {"Authorization": "Bearer client-own-key"})
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    sent = backup.requests[-1].headers
    assert sent["x-backup-key"] == BACKUP_KEY
    assert "client-own-key" not in str(sent)


async def test_incoming_request_id_is_kept(tiergate, http):
    _, headers, _ = await post(http, tiergate.v1 + "/chat/completions", CHAT, {"x-request-id": "abc-123"})
    assert headers["x-tiergate-request-id"] == "abc-123"
    assert headers["x-request-id"] == "req_primary_1"  # the provider's own, as the SDK reports it


async def test_alias_and_override_models(tiergate, upstream, http):
    _, headers, _ = await post(http, tiergate.v1 + "/chat/completions", {**CHAT, "model": "fast"})
    assert headers["x-tiergate-route"] == "alias:fast" and upstream.requests[-1].json["model"] == "model-fast"
    _, headers, _ = await post(http, tiergate.v1 + "/chat/completions", {**CHAT, "model": "primary/vendor/m-1"})
    assert headers["x-tiergate-route"] == "override" and upstream.requests[-1].json["model"] == "vendor/m-1"


async def test_completions_and_embeddings(tiergate, upstream, http):
    status, _, data = await post(http, tiergate.v1 + "/completions", {"model": "fast", "prompt": "x"})
    assert status == 200 and orjson.loads(data)["object"] == "text_completion"
    assert upstream.requests[-1].path == "/v1/completions"
    status, _, data = await post(http, tiergate.v1 + "/embeddings", {"model": "embed-small", "input": ["a", "bb"]})
    assert status == 200 and len(orjson.loads(data)["data"]) == 2
    assert upstream.requests[-1].json == {"model": "text-embed", "input": ["a", "bb"]}


async def test_stream_chunks_arrive_before_the_stream_ends(tiergate, upstream, http):
    gate = asyncio.Event()
    upstream.push(Ok(gate=gate))
    async with http.post(tiergate.v1 + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True})) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-tiergate-model"] == "primary/model-a"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert b'"role":"assistant"' in first   # the upstream is still holding the rest
        assert not gate.is_set()
        gate.set()
        rest = await resp.content.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_stream_include_usage_is_passed_through(tiergate, upstream, http):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(tiergate.v1 + "/chat/completions", data=orjson.dumps(body)) as resp:
        text = await resp.read()
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
    assert b'"usage":{"prompt_tokens":10' in text


async def test_client_disconnect_cancels_the_upstream_request(tiergate, upstream, http):
    gate = asyncio.Event()
    upstream.push(Ok(gate=gate))
    resp = await http.post(tiergate.v1 + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True}))
    await resp.content.readuntil(b"\n\n")
    resp.close()  # the client goes away mid-stream
    async with asyncio.timeout(5):
        while upstream.cancelled == 0:
            await asyncio.sleep(0.01)
    assert upstream.completed == 0


@pytest.mark.parametrize("cancellation", [True, False])
async def test_a_client_that_leaves_mid_stream_is_a_499_and_no_logged_error(upstream, start_tiergate, caplog,
                                                                              cancellation):
    """A user pressing stop: the client closes its socket after the first chunk while the provider
    goes on. With handler cancellation (as `tiergate serve` runs) the handler is cancelled; without it
    (aiohttp's default, e.g. `build_app` mounted in an application's own runner) the next write to the
    closed socket fails. Neither is an error of tiergate's to log with a traceback, nor a 500."""
    caplog.set_level(logging.INFO)
    tg = await start_tiergate(table_doc(upstream), handler_cancellation=cancellation)
    port = int(tg.url.rsplit(":", 1)[1])
    body = orjson.dumps({**CHAT, "stream": True})
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(3):
        upstream.push(Ok(content="one two three four", gap=0.02))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await asyncio.wait_for(reader.readuntil(b"data:"), 5)
        writer.close()
        await writer.wait_closed()

    assert await requests_counted(tg, 3) == {"499": 3.0}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_non_stream_client_disconnect_cancels_upstream(tiergate, upstream, http):
    upstream.push(Hang())
    task = asyncio.create_task(post(http, tiergate.v1 + "/chat/completions", CHAT))
    async with asyncio.timeout(5):
        while upstream.calls == 0:
            await asyncio.sleep(0.01)
    task.cancel()
    async with asyncio.timeout(5):
        while upstream.cancelled == 0:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("body,param", [
    ({"model": "x", "messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"messages": []}, "messages"),
    ({"model": "general_purpose"}, "messages"),
])
async def test_wrong_field_types_are_400_naming_the_field(tiergate, http, body, param):
    status, headers, data = await post(http, tiergate.v1 + "/chat/completions", body)
    assert status == 400
    error = orjson.loads(data)["error"]
    assert error["param"] == param and param.split("[")[0] in error["message"]
    assert error["type"] == "invalid_request_error"


BAD_UTF8 = "{\"messages\": \"\udcff\"}".encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1,2]", BAD_UTF8])
async def test_malformed_bodies_are_400(tiergate, http, raw):
    status, _, data = await post(http, tiergate.v1 + "/chat/completions", raw)
    assert status == 400
    assert set(orjson.loads(data)["error"]) == {"message", "type", "param", "code"}


async def test_unknown_route_values_are_400(tiergate, http):
    status, _, data = await post(http, tiergate.v1 + "/chat/completions", CHAT, {"X-Use-Case": "poetry"})
    assert status == 400 and "code_generation" in orjson.loads(data)["error"]["message"]
    status, _, data = await post(http, tiergate.v1 + "/chat/completions", {**CHAT, "model": "gpt-9"})
    assert status == 400 and orjson.loads(data)["error"]["param"] == "model"


async def test_body_over_the_limit_is_413(upstream, start_tiergate, http):
    running = await start_tiergate(table_doc(upstream), max_body_bytes=1000)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    status, _, data = await post(http, running.v1 + "/chat/completions", big)
    assert status == 413 and orjson.loads(data)["error"]["code"] == "request_too_large"
    assert upstream.calls == 0


async def test_upstream_client_error_is_passed_through(tiergate, upstream, backup, http):
    body = b'{"error":{"message":"context too long","type":"invalid_request_error","param":null,"code":"x"}}'
    upstream.push(Fail(400, body=body))
    status, headers, data = await post(http, tiergate.v1 + "/chat/completions", CHAT)
    assert status == 400 and data == body
    assert headers["x-tiergate-provider"] == "primary"
    assert backup.calls == 0


async def test_upstream_unreachable_is_502(upstream, start_tiergate, http):
    doc = table_doc(upstream)
    doc["providers"]["primary"]["base_url"] = "http://127.0.0.1:9/v1"  # nothing listens on port 9
    running = await start_tiergate(doc, max_retries=1)
    status, _, data = await post(http, running.v1 + "/chat/completions", CHAT)
    assert status == 502
    error = orjson.loads(data)["error"]
    assert "primary/model-a: connection" in error["message"]
    assert PRIMARY_KEY not in data.decode()


async def test_upstream_timeout_is_504(upstream, start_tiergate, http):
    upstream.default = Hang()
    running = await start_tiergate(table_doc(upstream), max_retries=1, timeout=0.3)
    status, _, data = await post(http, running.v1 + "/chat/completions", CHAT)
    assert status == 504 and orjson.loads(data)["error"]["code"] == "upstream_timeout"


async def test_connection_reset_falls_back(tiergate, upstream, backup, http):
    upstream.push(Reset())
    status, headers, _ = await post(http, tiergate.v1 + "/chat/completions", CHAT)
    assert status == 200 and headers["x-tiergate-provider"] == "backup"
    assert headers["x-tiergate-attempts"] == "2"


async def test_models_health_and_unknown_paths(tiergate, http):
    async with http.get(tiergate.v1 + "/models") as resp:
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert "general_purpose:standard" in ids and "fast" in ids and "primary/model-a" in ids
    async with http.get(tiergate.url + "/health") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with http.get(tiergate.url + "/v1/nothing") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with http.get(tiergate.v1 + "/embeddings") as resp:
        assert resp.status == 405 and "error" in await resp.json()
