"""The official OpenAI Node SDK as the client (`tests/clients/node/client.mjs`, one scenario per run): a
completion with the provider's request id, a stream to its end, a provider's rate limit as the SDK's
RateLimitError with its Retry-After, and retries that do not multiply (`x-should-retry: false`).

Needs Node.js and `npm install --prefix tests/clients/node` (`.ci/run` does it); skipped without them,
except where `TIERGATE_TEST_REQUIRE_SERVICES=1` (CI), which fails instead."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import orjson
import pytest

from ..conftest import table_doc
from ..upstream import Fail

CLIENT = Path(__file__).parent / "node" / "client.mjs"
INSTALLED = (Path(__file__).parent / "node" / "node_modules" / "openai").is_dir()

if not (shutil.which("node") and INSTALLED):
    reason = "the Node SDK is not installed: npm install --prefix tests/clients/node"
    if os.environ.get("TIERGATE_TEST_REQUIRE_SERVICES") == "1":
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


async def node(base_url: str, scenario: str) -> dict:
    proc = await asyncio.create_subprocess_exec("node", str(CLIENT), base_url, scenario,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return orjson.loads(out.splitlines()[-1])


async def test_a_completion_and_a_stream(tiergate):
    seen = await node(tiergate.v1, "chat")
    assert seen["content"] == "primary answered model-a"
    assert seen["requestId"].startswith("req_primary_")  # the provider's request id, as the SDK reports it
    seen = await node(tiergate.v1, "stream")
    assert seen["content"] == "primary answered model-a" and seen["chunks"] > 1


async def test_a_rate_limit_and_retries_that_do_not_multiply(upstream, backup, start_tiergate):
    running = await start_tiergate(table_doc(upstream), max_retries=3)
    upstream.default = Fail(429, retry_after=20)
    seen = await node(running.v1, "rate_limit")
    assert seen["error"] == "RateLimitError" and seen["status"] == 429 and seen["retryAfter"] == "20"
    running = await start_tiergate(table_doc(upstream, backup), max_retries=3)
    upstream.default = Fail(500, retry_after=0)
    backup.default = Fail(500, retry_after=0)
    calls = upstream.calls + backup.calls
    seen = await node(running.v1, "retries")  # the SDK's maxRetries: 2
    assert seen["status"] == 500
    assert upstream.calls + backup.calls - calls == 3  # tiergate's TIERGATE_MAX_RETRIES, not 3 x (1 + 2)
