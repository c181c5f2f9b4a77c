"""Pass-through of OpenAI API paths tiergate does not route (models/{id}, moderations, images, audio,
files, batches, ...) and of model names the table does not know, with the official SDK."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from ..conftest import BACKUP_KEY, PRIMARY_KEY, table_doc
from ..telemetry_support import requests_counted
from ..upstream import MockUpstream
from .test_cli import ENV, free_port


def doc(upstream: MockUpstream, backup: MockUpstream | None = None, **extra: Any) -> dict[str, Any]:
    table = table_doc(upstream, backup)
    table.update(extra)
    return table


def sdk(running: Any, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key="sk-client", max_retries=0, **kw)


async def test_models_retrieve_own_ids_here_others_passed_through(upstream, start_tiergate):
    running = await start_tiergate(doc(upstream, passthrough_provider="primary"))
    async with sdk(running) as c:
        route = await c.models.retrieve("general_purpose:standard")
        assert route.owned_by == "tiergate"
        alias = await c.models.retrieve("fast")
        assert alias.owned_by == "primary"
        assert (await c.models.retrieve("primary/model-a")).id == "primary/model-a"
        assert upstream.calls == 0
        other = await c.models.retrieve("gpt-4o")
        assert (other.id, other.owned_by) == ("gpt-4o", "primary")
    (sent,) = upstream.requests
    assert (sent.method, sent.path) == ("GET", "/v1/models/gpt-4o")
    assert sent.headers["Authorization"] == f"Bearer {PRIMARY_KEY}"


async def test_without_a_passthrough_provider_a_clear_404(upstream, start_tiergate, http):
    running = await start_tiergate(doc(upstream))
    async with sdk(running) as c:
        with pytest.raises(openai.NotFoundError) as caught:
            await c.moderations.create(input="hello")
        assert "passthrough_provider" in caught.value.message
        assert caught.value.code == "not_found"
        with pytest.raises(openai.NotFoundError, match="pass-through"):
            await c.models.retrieve("gpt-4o")
    async with http.delete(running.v1 + "/chat/completions") as resp:  # tiergate's own path, wrong method
        assert resp.status == 405
    assert upstream.calls == 0


async def test_moderations_headers_and_model_rewrite(upstream, backup, start_tiergate):
    running = await start_tiergate(doc(upstream, backup, passthrough_provider="backup"))
    async with sdk(running, organization="org-1", project="proj-1",
                   default_headers={"X-Use-Case": "debugging", "x-tiergate-timeout": "5",
                                    "X-Vendor-Thing": "kept"}) as c:
        raw = await c.moderations.with_raw_response.create(model="omni-moderation-latest", input="hi")
        assert raw.parse().results[0].flagged is False
        # the provider's request id stays the SDK's request id; tiergate's has its own header
        assert raw.headers["x-request-id"].startswith("up_req_")
        assert raw.headers["x-tiergate-request-id"].startswith("req_")
        assert raw.headers["openai-processing-ms"] == "7"
        assert raw.headers["x-tiergate-provider"] == "backup"
        # a model naming an alias goes where the alias points, rewritten as for chat
        await c.moderations.create(model="fast", input="hi")
    sent = backup.requests[0]
    assert sent.json == {"model": "omni-moderation-latest", "input": "hi"}
    headers = {k.lower(): v for k, v in sent.headers.items()}
    assert headers["x-backup-key"] == BACKUP_KEY and "authorization" not in headers
    assert headers["openai-organization"] == "org-1" and headers["openai-project"] == "proj-1"
    assert headers["x-vendor-thing"] == "kept"
    assert not {"x-use-case", "x-tiergate-timeout"} & set(headers)
    (aliased,) = upstream.requests
    assert aliased.path == "/v1/moderations" and aliased.json["model"] == "model-fast"


async def test_images_files_batches_and_query_strings(upstream, start_tiergate):
    running = await start_tiergate(doc(upstream, passthrough_provider="primary"))
    async with sdk(running) as c:
        image = await c.images.generate(model="gpt-image-1", prompt="a cat")
        assert image.data[0].url == "https://primary.example/gpt-image-1.png"
        content = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' * 100
        file = await c.files.create(file=("batch.jsonl", content), purpose="batch")
        assert file.id == "file-1"
        batch = await c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
        assert (batch.id, batch.input_file_id) == ("batch_1", "file-1")
        listed = await c.files.list(purpose="batch", limit=2)
        assert listed.data == []
        stored = await c.chat.completions.retrieve("chatcmpl-123")
        assert stored.id == "chatcmpl-123"
    upload = upstream.requests[1]
    assert upload.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert upload.size > len(content)  # the multipart body as the SDK framed it, unparsed
    assert upstream.requests[3].method == "GET"
    assert sorted(upstream.requests[3].query.split("&")) == ["limit=2", "purpose=batch"]
    assert upstream.requests[4].path == "/v1/chat/completions/chatcmpl-123"


async def test_audio_transcription_of_a_multi_mb_file_and_speech_to_a_file(upstream, start_tiergate, tmp_path):
    audio = tmp_path / "talk.mp3"
    audio.write_bytes(os.urandom(6 * 1024 * 1024))
    running = await start_tiergate(doc(upstream, passthrough_provider="primary"))
    async with sdk(running) as c:
        with audio.open("rb") as f:
            text = await c.audio.transcriptions.create(model="whisper-1", file=f)
        async with c.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy",
                                                                 input="hello") as speech:
            assert speech.headers["content-type"] == "audio/mpeg"
            await speech.stream_to_file(tmp_path / "speech.mp3")
    sent = upstream.requests[0]
    assert text.text == f"primary heard {sent.size} bytes"
    assert sent.size > audio.stat().st_size
    assert (tmp_path / "speech.mp3").read_bytes() == (bytes(range(256)) * 256 * 48)[:upstream.speech_bytes]
    assert upstream.requests[1].json == {"model": "tts-1", "voice": "alloy", "input": "hello"}


async def test_passthrough_paths_by_prefix_keys_and_limits(upstream, backup, start_tiergate, http):
    running = await start_tiergate(doc(upstream, backup, passthrough_provider="primary",
                                       passthrough_paths={"/v1/audio/": "backup"}),
                                   api_keys=("sk-in",), passthrough_max_body_bytes=1000)
    async with sdk(running) as c:
        with pytest.raises(openai.AuthenticationError):
            await c.moderations.create(input="x")
    assert upstream.calls == 0
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="sk-in", max_retries=0) as c:
        await c.audio.speech.create(model="tts-1", voice="alloy", input="x")
        await c.moderations.create(input="x")
        with pytest.raises(openai.APIStatusError) as caught:
            await c.audio.transcriptions.create(model="whisper-1", file=("a.mp3", b"x" * 5000))
        assert caught.value.status_code == 413
    assert [r.path for r in backup.requests] == ["/v1/audio/speech"]
    assert [r.path for r in upstream.requests] == ["/v1/moderations"]
    assert "Authorization" not in backup.requests[0].headers  # the client's key is never forwarded


async def test_unknown_model_names_go_to_the_passthrough_provider(upstream, backup, start_tiergate):
    running = await start_tiergate(doc(upstream, backup, passthrough_provider="backup"))
    async with sdk(running) as c:
        chat = await c.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert chat.parse().choices[0].message.content == "backup answered gpt-4o"
        assert chat.headers["x-tiergate-route"] == "passthrough"
        await c.embeddings.create(model="text-embedding-3-large", input="hi")
        await c.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        # names the table knows still route as before
        await c.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
    assert [r.json["model"] for r in backup.requests] == ["gpt-4o", "text-embedding-3-large", "openai/gpt-4o-mini"]
    assert [r.json["model"] for r in upstream.requests] == ["model-fast"]
    running = await start_tiergate(doc(upstream))
    async with sdk(running) as c:
        with pytest.raises(openai.BadRequestError, match="unknown model 'gpt-4o'. Use a route name"):
            await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
async def tiergate_process(upstream: MockUpstream, tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """tiergate as its own process (its memory is measured), passing through to `upstream`."""
    config = tmp_path / "routes.yaml"
    config.write_text(yaml.safe_dump(doc(upstream, passthrough_provider="primary")))
    port = free_port()
    env = {**ENV, "PYTHONPATH": os.getcwd(), "ENABLE_MONITORING": "false"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
        env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while True:
            assert proc.returncode is None, "tiergate exited at start-up"
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "tiergate did not come up"
            await asyncio.sleep(0.05)
    yield url, proc.pid
    proc.terminate()
    await asyncio.wait_for(proc.wait(), 30)


async def test_memory_stays_flat_while_25_mb_pass_both_ways(upstream, tiergate_process):
    url, pid = tiergate_process
    size = 25 * 1024 * 1024
    block = os.urandom(256 * 1024)
    digest = hashlib.sha256()
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/models/warm-up") as resp:  # pools and code paths warm
            assert resp.status == 200
        baseline = _rss_kb(pid)
        peak = baseline
        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent, peak
            while sent < size:
                digest.update(block)
                sent += len(block)
                peak = max(peak, _rss_kb(pid))
                yield block

        headers = {"Content-Type": "audio/mpeg", "Content-Length": str(size)}
        async with session.post(url + "/v1/audio/transcriptions", data=body(), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["text"] == f"primary heard {size} bytes"
        upstream.speech_bytes = size
        received = 0
        async with session.post(url + "/v1/audio/speech", json={"model": "tts-1", "input": "x", "voice": "a"}) as resp:
            assert resp.headers["Content-Length"] == str(size)
            async for chunk in resp.content.iter_chunked(256 * 1024):
                received += len(chunk)
                peak = max(peak, _rss_kb(pid))
    upload = upstream.requests[-2]
    assert (upload.size, upload.sha256) == (size, digest.hexdigest())
    assert received == size
    grown_mb = (peak - baseline) / 1024
    assert grown_mb < 8, f"tiergate's RSS grew by {grown_mb:.1f} MB while 25 MB passed each way"


async def test_chunked_upload_over_the_limit_is_cut_off(upstream, start_tiergate, http):
    running = await start_tiergate(doc(upstream, passthrough_provider="primary"), passthrough_max_body_bytes=100_000)

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: the limit is counted as it streams
        for _ in range(10):
            yield b"x" * 64 * 1024

    async with http.post(running.v1 + "/audio/transcriptions", data=body(),
                         headers={"Content-Type": "audio/mpeg"}) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_a_multipart_model_naming_an_alias_is_rewritten_and_nothing_else(upstream, backup, start_tiergate,
                                                                               tmp_path):
    audio = tmp_path / "talk.mp3"
    audio.write_bytes(os.urandom(300_000))
    running = await start_tiergate(doc(upstream, backup, passthrough_provider="backup"))
    async with sdk(running) as c:
        with audio.open("rb") as f:
            await c.audio.transcriptions.create(model="whisper-1", file=f)  # not tiergate's: as sent
        with audio.open("rb") as f:
            text = await c.audio.transcriptions.create(model="fast", file=f)  # an alias of primary/model-fast
    (plain,) = backup.requests
    (aliased,) = upstream.requests
    assert b'name="model"\r\n\r\nwhisper-1\r\n' in plain.head
    assert b'name="model"\r\n\r\nmodel-fast\r\n' in aliased.head
    assert aliased.size - plain.size == len("model-fast") - len("whisper-1")  # the file passed unchanged
    assert text.text == f"primary heard {aliased.size} bytes"


async def test_sync_client_models_moderations_and_speech(upstream, start_tiergate, tmp_path):
    running = await start_tiergate(doc(upstream, passthrough_provider="primary"))

    def sync_calls() -> tuple[str, bool]:
        with openai.OpenAI(base_url=running.v1, api_key="sk-client", max_retries=0) as sync:
            model = sync.models.retrieve("gpt-4o-mini").id
            flagged = sync.moderations.create(input="hi").results[0].flagged
            with sync.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="x") as r:
                r.stream_to_file(tmp_path / "speech.mp3")
            return model, flagged

    assert await asyncio.to_thread(sync_calls) == ("gpt-4o-mini", False)
    assert (tmp_path / "speech.mp3").stat().st_size == upstream.speech_bytes


async def test_an_answer_the_provider_breaks_off_is_cut_for_the_client_too(upstream, start_tiergate, http, caplog):
    """The client must see that the body is incomplete (no end of body), one line in the log says
    why, and the request counts as a 502: not a traceback and a 500."""
    running = await start_tiergate(doc(upstream, passthrough_provider="primary"))
    upstream.speech_cut = True
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(running.v1 + "/audio/speech", json={"model": "tts-1", "input": "x", "voice": "a"}) as resp:
            assert resp.status == 200
            await resp.read()
    assert await requests_counted(running, 1) == {"502": 1.0}
    assert not [r for r in caplog.records if r.exc_info or "Error handling request" in r.getMessage()]
    assert any("broke off the pass-through answer" in r.getMessage() for r in caplog.records)


async def test_a_client_that_leaves_a_passed_through_answer_is_a_499(upstream, start_tiergate, caplog):
    """Without handler cancellation (aiohttp's default for an app in an application's own runner),
    leaving shows as a failed write to the client: not the provider's fault, not a logged error."""
    running = await start_tiergate(doc(upstream, passthrough_provider="primary"), handler_cancellation=False)
    upstream.speech_bytes = 64 * 1024 * 1024  # more than the sockets hold: tiergate is still writing
    port = int(running.url.rsplit(":", 1)[1])
    body = b'{"model":"tts-1","input":"x","voice":"a"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await reader.readexactly(65536)
    writer.transport.abort()  # gone at once
    assert await requests_counted(running, 1) == {"499": 1.0}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
