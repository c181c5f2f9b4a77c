"""No secret in any output: a real tiergate process with recognisable keys, driven down every error
path; every response (body and headers), health and metrics output, and the process's own
stdout/stderr are searched for the keys."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import orjson
import yaml

from .test_cli import ENV, free_port, wait_healthy
from .upstream import BreakStream, Fail, Hang, MockUpstream

SECRETS = {
    "PRIMARY_UPSTREAM_KEY": "sk-upstream-PRIMARY-s3cr3t-a1b2c3",
    "OPENROUTER_API_KEY": "sk-or-OPENROUTER-s3cr3t-d4e5f6",
    "PORTKEY_API_KEY": "pk-PORTKEY-s3cr3t-g7h8i9",
    "TIERGATE_API_KEYS": "tg-INBOUND-s3cr3t-j1k2l3,tg-INBOUND-s3cr3t-m4n5o6",
    "DATABASE_URL": "postgresql://tiergate:DBPASS-s3cr3t-p7q8@127.0.0.1:1/tiergate",
    "TIERGATE_REDIS_URL": "redis://:REDISPASS-s3cr3t-r9s0@127.0.0.1:1/0",
}
NEEDLES = ["s3cr3t", "DBPASS", "REDISPASS", "INBOUND", "PRIMARY-s3", "OPENROUTER-s3", "PORTKEY-s3"]
INBOUND = SECRETS["TIERGATE_API_KEYS"].split(",")[0]


def routes_file(tmp_path, upstream: MockUpstream, dead_port: int, *, broken: bool = False):
    doc = {
        "providers": {
            "primary": {"base_url": upstream.url, "api_key_env": "PRIMARY_UPSTREAM_KEY"},
            "dead": {"base_url": f"http://127.0.0.1:{dead_port}/v1", "api_key_env": "OPENROUTER_API_KEY"},
            "portkey": {"base_url": f"http://127.0.0.1:{dead_port}/v1", "api_key_env": "PORTKEY_API_KEY",
                        "api_key_header": "x-portkey-api-key"},
        },
        "routes": [
            {"use_case": "general_purpose", "tier": "standard", "model": "primary/model-a"},
            {"use_case": "code_generation", "tier": "premium", "model": "dead/model-x",
             "fallbacks": ["portkey/model-y"]},
            {"use_case": "debugging", "tier": "standard", "model": "primary/model-a",
             "fallbacks": ["dead/model-x"]},
        ],
        "settings": {"timeout": 5, "breaker_failure_threshold": 100, "retry_backoff": 0.001, "retry_after_cap": 0.05},
    }
    if broken:
        doc["routes"][0]["tier"] = "platinum"
        doc["providers"]["dead"]["api_key"] = SECRETS["OPENROUTER_API_KEY"]
        doc["providers"]["primary"]["base_url"] = 42
    path = tmp_path / ("broken.yaml" if broken else "routes.yaml")
    path.write_text(yaml.safe_dump(doc))
    return path


def assert_clean(label: str, text: str) -> None:
    for needle in NEEDLES:
        assert needle not in text, f"{label} leaks {needle!r}: {text[:2000]}"


async def test_no_secret_in_any_output(tmp_path):
    upstream = await MockUpstream("primary").start()
    dead_port = free_port()
    port = free_port()
    env = {**ENV, **SECRETS, "PYTHONPATH": os.getcwd()}
    config = routes_file(tmp_path, upstream, dead_port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
        env=env, cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    seen: list[tuple[str, int, str]] = []
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {INBOUND}"}

    async def call(http, method, path, body=None, headers=None, label=""):
        data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
        async with http.request(method, url + path, data=data, headers=headers or {}) as resp:
            text = (await resp.read()).decode("utf-8", "replace")
            seen.append((label or path, resp.status, f"{dict(resp.headers)}\n{text}"))
            return resp.status

    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as http:
            assert await call(http, "POST", "/v1/chat/completions", chat, label="no key") == 401
            assert await call(http, "POST", "/v1/chat/completions", chat,
                              {"Authorization": f"Bearer {INBOUND[:-1]}"}, "near key") == 401
            assert await call(http, "GET", "/v1/models", label="models no key") == 401
            assert await call(http, "POST", "/v1/chat/completions", b"{bad json", auth, "bad json") == 400
            assert await call(http, "POST", "/v1/chat/completions", {"messages": "x"}, auth, "bad type") == 400
            assert await call(http, "POST", "/v1/chat/completions", {**chat, "model": "nope:gold"},
                              auth, "unknown route") == 400
            assert await call(http, "POST", "/v1/chat/completions", chat, auth, "ok") == 200
            upstream.push(Fail(401))
            assert await call(http, "POST", "/v1/chat/completions", chat, auth, "upstream 401") == 401
            upstream.push(Fail(500), Fail(500), Fail(500))
            assert await call(http, "POST", "/v1/chat/completions", chat, auth, "upstream 500") == 500
            assert await call(http, "POST", "/v1/chat/completions", chat,
                              {**auth, "X-Use-Case": "code_generation", "X-Model-Tier": "premium"},
                              "unreachable") == 502
            upstream.push(Fail(503), Fail(503))
            assert await call(http, "POST", "/v1/chat/completions", chat,
                              {**auth, "X-Use-Case": "debugging"}, "fallback to dead") == 503
            upstream.push(Hang())
            assert await call(http, "POST", "/v1/chat/completions", chat,
                              {**auth, "x-tiergate-timeout": "0.3"}, "timeout") == 504
            upstream.push(BreakStream(after=1))
            assert await call(http, "POST", "/v1/chat/completions", {**chat, "stream": True}, auth,
                              "broken stream") == 200
            for path in ("/v1/models", "/health", "/ready", "/health/details", "/metrics", "/openapi.json"):
                await call(http, "GET", path, headers=auth)
        assert upstream.requests[0].headers["Authorization"] == f"Bearer {SECRETS['PRIMARY_UPSTREAM_KEY']}"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        await upstream.stop()
    out = (await proc.stdout.read()).decode() + (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert '"status":401' in out and '"status":504' in out  # the request log did record the errors
    assert_clean("process output", out)
    for label, status, text in seen:
        relayed = label in ("upstream 500", "fallback to dead")  # the provider's own 5xx, passed on as such
        assert status < 500 or status in (502, 504) or relayed, (label, status, text)
        assert_clean(f"response to {label} ({status})", text)


def test_no_secret_in_config_errors(tmp_path):
    """A bad table and bad settings, with the same secrets in the environment."""
    upstream = MockUpstream("primary")  # never started: only its URL goes into the file
    dead_port = free_port()
    env = {**ENV, **SECRETS, "PYTHONPATH": os.getcwd()}
    config = routes_file(tmp_path, upstream, dead_port)
    broken = routes_file(tmp_path, upstream, dead_port, broken=True)
    for args, extra in ((("check", "--config", str(broken)), {}),
                        (("serve", "--config", str(broken), "--port", "0"), {}),
                        (("serve", "--config", str(config)), {"TIERGATE_PORT": "x"}),
                        (("serve", "--config", str(config), "--port", "0", "--host", "0.0.0.0"),
                         {"TIERGATE_API_KEYS": "", "TIERGATE_TIMEOUT": "soon"})):
        done = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                              env={**env, **extra}, cwd=str(tmp_path), timeout=20)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert_clean(f"tiergate {' '.join(args)}", done.stdout + done.stderr)
