"""No secret in any output: a real tiergate process with recognisable keys, driven down every error
path; every response (body and headers), health and metrics output, and the process's own
stdout/stderr are searched for the keys."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import orjson
import yaml

from ..upstream import BreakStream, Fail, Hang, MockUpstream
from .test_cli import ENV, free_port, wait_healthy

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


# --- credentials inside URLs ----------------------------------------------------------------------

URL_USER, URL_PASSWORD = "tguser", "URLPASS-s3cr3t-x1y2"


def creds_url(port: int) -> str:
    return f"http://{URL_USER}:{URL_PASSWORD}@127.0.0.1:{port}/v1"


def test_redact_credentials_masks_every_form():
    from proxy.urls import redact_credentials

    assert redact_credentials("at https://u:p%40ss@h:1/v1 and redis://:pw@r/0") == \
        "at https://u:***@h:1/v1 and redis://***@r/0"
    assert redact_credentials("'https://sk-token@api.example/v1'") == "'https://***@api.example/v1'"
    assert redact_credentials("postgresql://a:b@c@h/db?x=1") == "postgresql://a:***@h/db?x=1"
    assert redact_credentials("mail me at a@b.c, see https://h/x") == "mail me at a@b.c, see https://h/x"


async def run_all(*runs: tuple[tuple[str, ...], dict[str, str]], cwd: Any) -> list[tuple[int, str, str]]:
    """`python -m proxy ARGS` with extra environment, side by side; (exit code, stdout, stderr) each."""
    async def one(args: tuple[str, ...], extra: dict[str, str]) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, env={**ENV, "PYTHONPATH": os.getcwd(), **extra}, cwd=str(cwd),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    return await asyncio.gather(*(one(args, extra) for args, extra in runs))


async def test_credentials_in_a_base_url_are_refused_by_check_and_serve_and_never_echoed(tmp_path):
    """`check`, `serve` and `db init` refuse the table at load time; the message masks the password."""
    doc = {"providers": {"creds": {"base_url": creds_url(free_port()), "api_key": "sk-x"}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "creds/m"}]}
    table = tmp_path / "routes.yaml"
    table.write_text(yaml.safe_dump(doc))
    # a YAML syntax error on the line of such a URL: the parser quotes the line
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f'providers:\n  creds: {{base_url: "{creds_url(1)}", api_key: [}}\n')
    runs = (("check", "--config", str(table)), ("serve", "--config", str(table), "--port", "0"),
            ("db", "init", "--from", str(table)), ("check", "--config", str(bad_yaml)))
    # db init checks the file before it connects: the database is never reached
    results = await run_all(*((args, {"DATABASE_URL": "postgresql://127.0.0.1:1/x"}) for args in runs), cwd=tmp_path)
    for args, (code, out, err) in zip(runs, results, strict=True):
        assert code == 2, (args, out + err)
        assert "Traceback" not in out + err and URL_PASSWORD not in out + err and "s3cr3t" not in out + err
        if args[-1] != str(bad_yaml):
            assert f"providers.creds: base_url: 'http://{URL_USER}:***@127.0.0.1:" in err, err
            assert "holds credentials" in err, err


async def test_malformed_database_and_redis_urls_are_one_masked_line(tmp_path):
    """serve, db init and routes list with a DATABASE_URL / TIERGATE_REDIS_URL that does not parse."""
    cases = [
        (("serve", "--port", "0"), {"DATABASE_URL": f"postgresql://admin:{URL_PASSWORD}@127.0.0.1:54x2/db"},
         "DATABASE_URL", "admin:***@"),
        (("db", "init"), {"DATABASE_URL": f"postgresql://admin:{URL_PASSWORD}@[::1/db"}, "DATABASE_URL",
         "admin:***@"),
        (("routes", "list"), {"DATABASE_URL": f"mysql://admin:{URL_PASSWORD}@127.0.0.1/db"}, "DATABASE_URL",
         "admin:***@"),
        (("routes", "list"), {"DATABASE_URL": f"postgresql://admin:{URL_PASSWORD}@127.0.0.1:99999/db"},
         "DATABASE_URL", "admin:***@"),
        (("serve", "--port", "0"), {"TIERGATE_REDIS_URL": f"redis://:{URL_PASSWORD}@127.0.0.1:63x9/0"},
         "TIERGATE_REDIS_URL", "redis://***@"),
    ]
    results = await run_all(*((args, extra) for args, extra, _, _ in cases), cwd=tmp_path)
    for (args, extra, name, masked), (code, out, err) in zip(cases, results, strict=True):
        assert code == 2, (args, extra, out + err)
        assert "Traceback" not in out + err and URL_PASSWORD not in out + err, (args, extra, out + err)
        assert err.startswith(f"tiergate: {name}: ") and masked in err, (args, extra, err)
        assert len(err.strip().splitlines()) == 1, err


async def test_credentials_in_a_database_provider_row_are_rejected_and_masked(tmp_path):
    """A provider row whose base_url holds credentials: left out when the table loads, and listed,
    masked, by `tiergate routes list`, a running `tiergate serve`'s /health/details and its log."""
    from ..pg import fresh_schema
    from .test_store import cli

    upstream = await MockUpstream("primary").start()
    doc = {"providers": {"primary": {"base_url": upstream.url, "api_key": "sk-primary"}},
           "routes": [{"use_case": "general_purpose", "tier": "standard", "model": "primary/model-a"}]}
    table = tmp_path / "routes.yaml"
    table.write_text(yaml.safe_dump(doc))
    try:
        async with fresh_schema() as schema:
            code, _, err = await cli("db", "init", "--from", str(table), database_url=schema.url, cwd=tmp_path)
            assert code == 0, err
            await schema.conn.execute(
                "INSERT INTO llm_providers (name, base_url, api_key) VALUES ('creds', $1, 'sk-x')",
                creds_url(free_port()))
            await schema.conn.execute(
                "INSERT INTO llm_routes (use_case, tier, model) VALUES ('debugging', 'premium', 'creds/m')")
            code, out, err = await cli("routes", "list", database_url=schema.url, cwd=tmp_path)
            assert code == 0, err
            assert f"rejected: llm_providers creds: base_url: 'http://{URL_USER}:***@127.0.0.1:" in out, out
            assert URL_PASSWORD not in out + err

            port = free_port()
            env = {**ENV, "DATABASE_URL": schema.url, "PYTHONPATH": os.getcwd()}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--config", str(table), "--port", str(port),
                env=env, cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            url = f"http://127.0.0.1:{port}"
            try:
                await wait_healthy(url, proc)
                async with aiohttp.ClientSession() as http:
                    async with http.get(url + "/health/details") as resp:
                        details = await resp.text()
                problems = orjson.loads(details)["routing_table"]["problems"]
                assert any(f"'http://{URL_USER}:***@127.0.0.1:" in p for p in problems), problems
                assert URL_PASSWORD not in details
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
            out = (await proc.stdout.read()).decode() + (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            assert f"http://{URL_USER}:***@" in out and URL_PASSWORD not in out, out
    finally:
        await upstream.stop()
