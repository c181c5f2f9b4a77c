"""redis-py clients and connection pools for what `TIERGATE_REDIS_URL` names: one server, a Redis
Cluster (`RedisCluster`: slots, redirections and failovers followed by redis-py) or a
Sentinel-managed primary (`Sentinel`: the primary asked of the sentinels at each connect, so a
failover is followed on the next connection).

The URL is read once by `proxy.urls.parse_redis_url`, the same reading `tiergate check` makes.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff

from ..types import ConfigError
from ..urls import RedisTarget, parse_redis_url


def redis_target(url: str) -> RedisTarget:
    """`parse_redis_url` with its ValueError as the ConfigError settings raise."""
    try:
        return parse_redis_url(url)
    except ValueError as exc:
        raise ConfigError(str(exc), param="redis_url") from None


def _auth_and_tls(target: RedisTarget) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"username": target.username, "password": target.password}
    for option, value in target.options:
        kwargs[option] = value.lower() == "true" if option == "ssl_check_hostname" else value
    return kwargs


def _sentinel(target: RedisTarget, *, timeout: float) -> Sentinel:
    # the credentials in the URL are the Redis servers'; sentinels are asked without any
    return Sentinel(list(target.nodes), sentinel_kwargs={"socket_timeout": timeout,
                                                         "socket_connect_timeout": timeout})


def redis_client(url: str, *, timeout: float, socket_timeout: float | None = None) -> Redis | RedisCluster:
    """A redis-py client (commands, pub/sub) for `url`; nothing connects until it is used.
    `timeout` bounds connecting, `socket_timeout` (default: `timeout`) each reply."""
    target = redis_target(url)
    read = timeout if socket_timeout is None else socket_timeout
    common = {"socket_connect_timeout": timeout, "socket_timeout": read, **_auth_and_tls(target)}
    if target.kind == "cluster":
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                            ssl=target.tls, **common)
    if target.kind == "sentinel":
        connection_class = SentinelManagedSSLConnection if target.tls else SentinelManagedConnection
        return _sentinel(target, timeout=timeout).master_for(
            target.service, db=target.db, connection_class=connection_class, **common)
    ((host, port),) = target.nodes
    return Redis(host=host, port=port, db=target.db, ssl=target.tls, **common)


def link_pool(target: RedisTarget, *, timeout: float) -> ConnectionPool:
    """The pool `RedisLink` takes its own connections from (one server, or the primary a Sentinel
    names): connecting bounded by `timeout`, replies by the link's own deadline, no retries."""
    common = {"socket_connect_timeout": timeout, "socket_timeout": None, "retry": Retry(NoBackoff(), 0),
              "db": target.db, **_auth_and_tls(target)}
    if target.kind == "sentinel":
        connection_class = SentinelManagedSSLConnection if target.tls else SentinelManagedConnection
        return SentinelConnectionPool(target.service, _sentinel(target, timeout=timeout),
                                      connection_class=connection_class, **common)
    if target.kind == "cluster":
        raise ConfigError("a Redis Cluster is reached through ClusterLink, not one connection pool",
                          param="redis_url")
    ((host, port),) = target.nodes
    if target.tls:
        common["connection_class"] = SSLConnection
    return ConnectionPool(host=host, port=port, **common)
