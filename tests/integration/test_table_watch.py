"""The table file is live in a running `tiergate serve`: a Kubernetes ConfigMap's `..data` symlink
swap, an editor's write-and-rename and an in-place write each change routing within two seconds;
a bad file keeps the running table and is reported in `/health/details`."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import orjson
import yaml

from ..conftest import table_doc, until
from ..upstream import MockUpstream
from .test_cli import ENV, free_port, wait_healthy

AUTH_B = {"Authorization": "Bearer sk-in-bbbbbbbbbbbb"}
CHAT = orjson.dumps({"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}]})


async def _serve(tmp_path: Path, config: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    env = {**{k: v for k, v in ENV.items() if k != "DATABASE_URL"}, "PYTHONPATH": os.getcwd(),
           "TIERGATE_HEALTH_CHECK_INTERVAL": "0", "TIERGATE_REQUEST_LOG": "off",
           "TIERGATE_TABLE_WATCH_INTERVAL": "0.2"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), env=env,
        cwd=str(tmp_path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url, proc)
    return proc, url


async def _routed_to(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(url + "/v1/chat/completions", data=CHAT) as resp:
        await resp.read()
        return resp.headers.get("x-tiergate-model", "")


async def test_configmap_swap_rename_and_in_place_write_each_change_routing(tmp_path):
    upstream = await MockUpstream("primary").start()

    def doc(model: str) -> str:
        return yaml.safe_dump(table_doc(upstream, model=f"primary/{model}"))

    # the layout kubelet makes: routes.yaml -> ..data/routes.yaml, ..data -> ..<timestamp>/
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "routes.yaml").write_text(doc("model-a"))
    (mount / "..data").symlink_to("..v1")
    (mount / "routes.yaml").symlink_to("..data/routes.yaml")
    proc, url = await _serve(tmp_path, mount / "routes.yaml")
    try:
        async with aiohttp.ClientSession() as http:
            assert await _routed_to(http, url) == "primary/model-a"

            # 1. a ConfigMap update: a new directory, then `..data` swapped by rename
            (mount / "..v2").mkdir()
            (mount / "..v2" / "routes.yaml").write_text(doc("model-b"))
            (mount / "..data_tmp").symlink_to("..v2")
            os.replace(mount / "..data_tmp", mount / "..data")
            await until(lambda: _is(http, url, "primary/model-b"))

            # 2. an editor: write a new file, rename it over the old (the target of the link)
            plain = tmp_path / "routes.yaml"
            plain.write_text(doc("model-a"))
            proc2, url2 = await _serve(tmp_path, plain)
            try:
                assert await _routed_to(http, url2) == "primary/model-a"
                (tmp_path / "routes.yaml.tmp").write_text(doc("model-c"))
                os.replace(tmp_path / "routes.yaml.tmp", plain)
                await until(lambda: _is(http, url2, "primary/model-c"), timeout=2.0)

                # 3. an in-place write (same inode)
                with plain.open("r+") as f:
                    f.seek(0)
                    f.write(doc("model-d"))
                    f.truncate()
                await until(lambda: _is(http, url2, "primary/model-d"), timeout=2.0)

                # 4. a bad file: routing unchanged, the reason in /health/details
                plain.write_text("routes: [this is not a route\n")

                async def reported() -> bool:
                    async with http.get(url2 + "/health/details") as resp:
                        watch = (await resp.json())["routing_table"]["file_watch"]
                    return watch["failures"] == 1 and not watch["last_change_applied"] and watch["last_error"]

                await until(reported, timeout=2.0)
                assert await _routed_to(http, url2) == "primary/model-d"
                async with http.get(url2 + "/health/details") as resp:
                    assert (await resp.json())["status"] == "degraded"
                plain.write_text(doc("model-e"))  # fixed: applied, and healthy again
                await until(lambda: _is(http, url2, "primary/model-e"), timeout=2.0)
            finally:
                proc2.terminate()
                await proc2.wait()
    finally:
        proc.terminate()
        await proc.wait()
        await upstream.stop()


async def _is(http: aiohttp.ClientSession, url: str, model: str) -> bool:
    return await _routed_to(http, url) == model


async def test_the_keys_file_is_live_and_an_emptied_one_is_refused(tmp_path):
    upstream = await MockUpstream("primary").start()
    config = tmp_path / "routes.yaml"
    config.write_text(yaml.safe_dump(table_doc(upstream)))
    keys = tmp_path / "keys"
    keys.write_text("team-a=sk-in-aaaaaaaaaaaa\n")
    port = free_port()
    env = {**{k: v for k, v in ENV.items() if k != "DATABASE_URL"}, "PYTHONPATH": os.getcwd(),
           "TIERGATE_HEALTH_CHECK_INTERVAL": "0", "TIERGATE_REQUEST_LOG": "off",
           "TIERGATE_TABLE_WATCH_INTERVAL": "0.2", "TIERGATE_API_KEYS_FILE": str(keys)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), env=env,
        cwd=str(tmp_path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as http:

            async def status(key: str) -> int:
                async with http.post(url + "/v1/chat/completions", data=CHAT,
                                     headers={"Authorization": f"Bearer {key}"}) as resp:
                    await resp.read()
                    return resp.status

            assert await status("sk-in-aaaaaaaaaaaa") == 200
            assert await status("sk-in-bbbbbbbbbbbb") == 401
            (tmp_path / "keys.new").write_text("team-b=sk-in-bbbbbbbbbbbb\n")
            os.replace(tmp_path / "keys.new", keys)
            await until(lambda: _status_is(status, "sk-in-bbbbbbbbbbbb", 200), timeout=2.0)
            assert await status("sk-in-aaaaaaaaaaaa") == 401  # the key taken out of the file is refused
            keys.write_text("# emptied\n")  # would turn authentication off: refused, reported

            async def reported() -> bool:
                async with http.get(url + "/health/details", headers=AUTH_B) as resp:
                    body = await resp.json()
                return body.get("keys_file_watch", {}).get("failures") == 1

            await until(reported, timeout=2.0)
            assert await status("sk-in-bbbbbbbbbbbb") == 200
            assert await status("sk-in-aaaaaaaaaaaa") == 401
            async with http.get(url + "/metrics", headers=AUTH_B) as resp:
                text = await resp.text()
            assert 'tiergate_config_reloads_total{file="keys",result="rejected"} 1.0' in text
            assert 'tiergate_config_file_invalid{file="keys"} 1.0' in text
    finally:
        proc.terminate()
        await proc.wait()
        await upstream.stop()


async def _status_is(status, key: str, expected: int) -> bool:
    return await status(key) == expected
