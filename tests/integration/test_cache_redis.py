"""The shared Redis level against the machine's real Redis, and what happens when Redis is down or slow."""

from __future__ import annotations

import socket

import orjson

from ..conftest import REDIS_URL, table_doc, until

CHAT = {"model": "general_purpose", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


async def post(http, url, body, headers=None):
    async with http.post(url, data=orjson.dumps(body), headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_two_sidecars_share_one_redis(upstream, start_tiergate, http, redis_client, namespace):
    doc = table_doc(upstream, cache_ttl=120)
    a = await start_tiergate(doc, redis_url=REDIS_URL, cache_namespace=namespace, redis_timeout=1.0)
    b = await start_tiergate(doc, redis_url=REDIS_URL, cache_namespace=namespace, redis_timeout=1.0)
    status, headers, first = await post(http, a.v1 + "/chat/completions", CHAT)
    assert status == 200 and headers["x-tiergate-cache"] == "miss"

    async def stored() -> bool:
        return bool(await redis_client.keys(f"{namespace}:*"))

    await until(stored)  # written in the background, after the answer
    (key,) = await redis_client.keys(f"{namespace}:*")
    assert 0 < await redis_client.ttl(key) <= 120  # the route's TTL
    status, headers, second = await post(http, b.v1 + "/chat/completions", CHAT)
    assert status == 200 and headers["x-tiergate-cache"] == "hit"
    assert second == first and upstream.calls == 1
    assert headers["x-tiergate-model"] == "primary/model-a"
    redis_stats = (await b.router.get_health_status())["cache"]["redis"]
    assert redis_stats["available"] is True and redis_stats["hits"] == 1
    # b keeps what it read from Redis in memory: the next hit does not ask Redis
    assert (await post(http, b.v1 + "/chat/completions", CHAT))[1]["x-tiergate-cache"] == "hit"
    assert b.router.cache.redis.hits == 1


async def test_redis_down_requests_go_on_uncached(upstream, start_tiergate, http):
    url = f"redis://:hunter2-secret@127.0.0.1:{closed_port()}/15"
    running = await start_tiergate(table_doc(upstream), redis_url=url, redis_timeout=0.2)
    for expected in ("miss", "hit"):  # the memory level still works
        status, headers, _ = await post(http, running.v1 + "/chat/completions", CHAT)
        assert status == 200 and headers["x-tiergate-cache"] == expected
    other = {**CHAT, "seed": 5}
    status, headers, _ = await post(http, running.v1 + "/chat/completions", other)
    assert status == 200 and headers["x-tiergate-cache"] == "miss"
    async with http.get(running.url + "/health/details") as resp:
        text = await resp.text()
    details = orjson.loads(text)
    redis_stats = details["cache"]["redis"]
    assert redis_stats["configured"] is True and redis_stats["available"] is False
    assert redis_stats["errors"] >= 1 and redis_stats["last_error"].startswith("get:")
    assert "hunter2" not in text
    assert upstream.calls == 2


async def test_redis_slow_is_bounded_by_the_timeout(upstream, start_tiergate, http, silent_server):
    running = await start_tiergate(table_doc(upstream), redis_url=f"redis://127.0.0.1:{silent_server.port}/15",
                                   redis_timeout=0.05)
    status, headers, _ = await post(http, running.v1 + "/chat/completions", CHAT)
    assert status == 200 and headers["x-tiergate-cache"] == "miss"
    redis_stats = (await running.router.get_health_status())["cache"]["redis"]
    assert redis_stats["available"] is False and "Timeout" in redis_stats["last_error"]
    assert silent_server.accepted  # it did try
