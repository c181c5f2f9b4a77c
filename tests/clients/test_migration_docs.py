"""Every `<!-- runnable -->` python block of docs/migration.md runs as written, in a process of its own,
with the environment a user of the old router has: the shipped table with its providers pointed at a
mock upstream over real HTTP, the provider keys set, and DATABASE_URL naming a seeded database."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from proxy.settings import DEFAULT_CONFIG_PATH, PACKAGE_ROOT
from proxy.table.store import init_db

from ..integration.test_cli import ENV
from ..pg import database_url, with_search_path
from ..upstream import MockUpstream, upstream_in_thread

GUIDE = PACKAGE_ROOT / "docs" / "migration.md"
BLOCKS = re.findall(r"<!-- runnable -->\n```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
# what a block leaving resources behind (or failing half-way) prints besides a traceback
LEFTOVERS = ("Traceback", "Unclosed client session", "Unclosed connector", "never retrieved",
             "Task was destroyed", "Event loop is closed")


@pytest.fixture(scope="module")
def provider() -> Iterator[MockUpstream]:
    with upstream_in_thread("mock-provider") as upstream:
        upstream.models = ("openai/gpt-4o-mini", "anthropic/claude-sonnet-4.5")
        upstream.model_pricing = {"openai/gpt-4o-mini": {"prompt": "0.00000015", "completion": "0.0000006"}}
        upstream.model_context = {"openai/gpt-4o-mini": 128000}
        yield upstream


@pytest.fixture(scope="module")
def table(provider: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped table, every provider at the mock upstream."""
    doc = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    for spec in doc["providers"].values():
        spec["base_url"] = provider.url
    path = tmp_path_factory.mktemp("table") / "routes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def database(table: Path) -> Iterator[str | None]:
    """A schema of its own, seeded by `init_db` from the table; None when Postgres is unreachable."""
    base = database_url()
    schema = f"tg_docs_{os.getpid()}_{int(time.time())}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(base, timeout=3)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE SCHEMA "{schema}"'))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if os.environ.get("TIERGATE_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"PostgreSQL unreachable: {exc}")
        yield None
        return
    url = with_search_path(base, schema)
    from proxy.settings import RouterConfig

    asyncio.run(init_db(RouterConfig.load(environ={"DATABASE_URL": url}, dotenv_path=None), table))
    try:
        yield url
    finally:
        asyncio.run(admin(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(scope="module")
def user_env(table: Path, database: str | None) -> dict[str, str]:
    env = {**ENV, "PYTHONPATH": str(PACKAGE_ROOT), "TIERGATE_CONFIG": str(table),
           "OPENROUTER_API_KEY": "sk-or-docs", "PORTKEY_API_KEY": "pk-docs", "OPENAI_API_KEY": "sk-docs",
           "HEALTH_CHECK_INTERVAL": "0"}  # no background GET /models: the mock counts only the blocks' calls
    env.pop("DATABASE_URL", None)
    if database is not None:
        env["DATABASE_URL"] = database
    return env


@pytest.fixture(scope="module")
def sidecar_port(user_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`tiergate serve` on the same table, for the blocks that use the OpenAI SDK over HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in user_env.items() if k != "DATABASE_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(port)],
                            env=env, cwd=str(tmp_path_factory.mktemp("sidecar")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "tiergate did not start"
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def test_the_guide_has_runnable_blocks():
    assert len(BLOCKS) >= 12
    text = "".join(BLOCKS)
    for call in ("await router.get_health_status()", "health[\"circuit_breakers\"]",
                 "await router.discover_available_models()", "create_router(UnifiedLLMRouter)",
                 "get_unified_router", "get_dynamic_router", "BaseLLMRouter", "DynamicLLMRouter",
                 'get_llm_router(dynamic=True, config=RouterConfig(portkey_api_key="...", cache_ttl=7200))',
                 "Depends(get_router)", "return await get_llm_router(dynamic=True)", "fastapi_exception_handler"):
        assert call in text, call


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_runnable_block(code: str, provider: MockUpstream, database: str | None, user_env: dict[str, str],
                        sidecar_port: int, tmp_path: Path):
    if "from fastapi" in code:
        pytest.importorskip("fastapi")
    if database is None and ("dynamic" in code.lower()):
        pytest.skip("this block follows the routing table in PostgreSQL, which is unreachable")
    code = code.replace("127.0.0.1:8100", f"127.0.0.1:{sidecar_port}")
    calls = provider.calls + provider.listings
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=user_env,
                          cwd=str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    for leftover in LEFTOVERS:
        assert leftover not in done.stderr, done.stderr
    if "DEMO_CONFIG_PATH" not in code:  # every other block calls a provider: over HTTP, to the mock
        assert provider.calls + provider.listings > calls, done.stdout
