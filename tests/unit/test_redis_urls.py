"""TIERGATE_REDIS_URL's forms: one server, a Redis Cluster's seed nodes, a Sentinel-managed primary;
`tiergate check` and `serve` read it the same way, and a wrong part is one clear line."""

from __future__ import annotations

import pytest

from proxy.settings import RouterConfig, check_service_urls
from proxy.types import ConfigError
from proxy.urls import parse_redis_url


def test_the_three_forms_and_tls():
    server = parse_redis_url("redis://user:p%40ss@example.org:6390/3")
    assert (server.kind, server.nodes, server.db, server.username, server.password, server.tls) == \
        ("server", (("example.org", 6390),), 3, "user", "p@ss", False)
    cluster = parse_redis_url("rediss+cluster://:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002?ssl_cert_reqs=none")
    assert cluster.kind == "cluster" and cluster.tls and cluster.password == "pw"
    assert cluster.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert cluster.options == (("ssl_cert_reqs", "none"),)
    sentinel = parse_redis_url("redis+sentinel://s1:26380,s2/mymaster/2")
    assert (sentinel.kind, sentinel.nodes, sentinel.service, sentinel.db) == \
        ("sentinel", (("s1", 26380), ("s2", 26379)), "mymaster", 2)
    assert "pw" not in repr(cluster) and "pw" not in cluster.where()


@pytest.mark.parametrize(("url", "message"), [
    ("redis://127.0.0.1:6379?cluster=true", "unknown option 'cluster' (a Redis Cluster is named redis+cluster://"),
    ("redis://a:1,b:2/0", "redis:// names one server"),
    ("redis+sentinel://127.0.0.1:26379", "names the primary's service"),
    ("redis+cluster://h:1/3", "database 0 only"),
    ("redis://h/x", "must be a database number"),
    ("redis://:s3cret@h:99999/0", "the port of h is not a number"),
    ("redis://h?ssl_cert_reqs=none", "applies to TLS only"),
    ("http://:s3cret@h/0", "the scheme must be one of"),
    ("redis://:s3/cret@h:6379/0", "percent-encode them"),
])
def test_a_wrong_url_is_one_line_from_settings_and_check(url, message):
    with pytest.raises(ConfigError) as err:
        RouterConfig(redis_url=url)
    text = str(err.value)
    assert message in text and "\n" not in text and "s3cret" not in text and "cret@" not in text
    with pytest.raises(ValueError):
        parse_redis_url(url)


def test_check_service_urls_accepts_every_form():
    for url in ("redis://h:1/0", "redis+cluster://h:1,h:2", "rediss+sentinel://s:1/main"):
        check_service_urls(RouterConfig(redis_url=url))
