"""Every `<!-- runnable -->` python block of docs/migration.md runs against the demo table."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from proxy.settings import DEMO_CONFIG_PATH, PACKAGE_ROOT

from .test_cli import ENV

GUIDE = PACKAGE_ROOT / "docs" / "migration.md"
BLOCKS = re.findall(r"<!-- runnable -->\n```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)


@pytest.fixture(scope="module")
def sidecar_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A `tiergate serve --demo` for the blocks that use the OpenAI SDK over HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port)],
                            env={**ENV, "PYTHONPATH": os.getcwd()}, cwd=str(tmp_path_factory.mktemp("sidecar")),
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
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_runnable_block(code: str, sidecar_port: int, tmp_path):
    if "from fastapi" in code:
        pytest.importorskip("fastapi")
    code = code.replace("127.0.0.1:8100", f"127.0.0.1:{sidecar_port}")
    env = {**ENV, "PYTHONPATH": os.getcwd(), "TIERGATE_CONFIG": str(DEMO_CONFIG_PATH)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
