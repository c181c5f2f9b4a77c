"""URLs in tiergate's own words: credentials masked wherever a URL is quoted, and checks of the
URLs a user configures (provider `base_url`, `DATABASE_URL`, `TIERGATE_REDIS_URL`: one server, a
Redis Cluster or a Sentinel-managed primary, see `parse_redis_url`).

Every message, log line, health field or CLI output that quotes a URL passes it (or the text
holding it) through `redact_credentials` first, so a `user:password@` never leaves the process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

# scheme://userinfo@ -- userinfo is `user`, `user:password` or `:password`; it ends at the last `@`
# before the host (a password may hold `@`), and never spans `/`, whitespace or quotes
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s'\"<>]*)@")


def redact_credentials(text: str) -> str:
    """`scheme://user:secret@host` -> `scheme://user:***@host` anywhere in `text`; a user
    alone (which may itself be a token, `https://sk-123@host`) becomes `***@`."""
    if "@" not in text:  # the common case: no URL with credentials, nothing to scan
        return text
    return _USERINFO.sub(_mask, text)


def _mask(match: re.Match[str]) -> str:
    user, sep, _ = match.group("userinfo").partition(":")
    shown = f"{user}:***" if sep and user else "***"
    return f"{match.group('scheme')}{shown}@"


def parse_url(url: str, *, name: str, schemes: Iterable[str], credentials: bool) -> SplitResult:
    """Split `url` and check its scheme, host and port; ValueError says what is wrong, naming
    `name` and quoting the URL with its credentials masked. `credentials=False` rejects `user:pass@`."""
    allowed = tuple(schemes)
    shown = redact_credentials(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
    except ValueError as exc:
        raise ValueError(f"{name}: {shown!r} is not a valid URL ({exc})") from None
    if parts.scheme not in allowed:
        raise ValueError(f"{name}: {shown!r} is not a URL starting with {' or '.join(s + '://' for s in allowed)}")
    if not parts.hostname and not credentials:  # DSNs may name a socket directory in the query instead
        raise ValueError(f"{name}: {shown!r} has no host")
    if not credentials and (parts.username is not None or parts.password is not None):
        raise ValueError(f"{name}: {shown!r} holds credentials (user:password@); they are not sent "
                         "from here: give the key as api_key or api_key_env (or a header in headers)")
    return parts


# --- TIERGATE_REDIS_URL --------------------------------------------------------------------------

REDIS_URL_FORMS = ("redis://[user:password@]host[:port][/db]",
                   "redis+cluster://[user:password@]host:port[,host:port...]",
                   "redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]",
                   "(rediss://, rediss+cluster://, rediss+sentinel:// for TLS)")
_REDIS_KINDS = {"redis": ("server", False), "rediss": ("server", True),
                "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
                "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True)}
# the query options tiergate passes on, each with the values it accepts (None: any text)
REDIS_OPTIONS: dict[str, tuple[str, ...] | None] = {
    "client_name": None, "ssl_cert_reqs": ("none", "optional", "required"), "ssl_ca_certs": None,
    "ssl_check_hostname": ("true", "false")}
_TLS_OPTIONS = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_check_hostname"})


@dataclass(frozen=True)
class RedisTarget:
    """What `TIERGATE_REDIS_URL` names: one server, a Redis Cluster (its seed nodes) or a
    Sentinel-managed primary (the sentinels and the service name)."""

    kind: str  # server | cluster | sentinel
    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    db: int = 0
    service: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()

    def where(self) -> str:
        """The nodes (and service, db) for messages: never a credential."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        if self.kind == "sentinel":
            return f"sentinel {hosts}/{self.service}/{self.db}"
        return f"cluster {hosts}" if self.kind == "cluster" else f"{hosts}/{self.db}"


def parse_redis_url(url: str, *, name: str = "TIERGATE_REDIS_URL") -> RedisTarget:
    """Read a Redis URL in one of `REDIS_URL_FORMS`; ValueError is one line naming the part at
    fault (the URL quoted with its credentials masked), so `tiergate check` and `serve` fail alike."""
    try:
        return _read_redis_url(url)
    except ValueError as exc:
        raise ValueError(f"{name}: {_shown(url)!r}: {exc}") from None


def _shown(url: str) -> str:
    """The URL with everything up to its last `@` masked: a password holding `/` (unencoded) would
    end `redact_credentials`'s match early, and this URL is quoted exactly when it is malformed."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if sep else "***@" + rest.rpartition("@")[2]


def _read_redis_url(url: str) -> RedisTarget:
    scheme, sep, rest = url.partition("://")
    kind_tls = _REDIS_KINDS.get(scheme.lower()) if sep else None
    if kind_tls is None:
        raise ValueError(f"the scheme must be one of {', '.join(s + '://' for s in _REDIS_KINDS)}")
    kind, tls = kind_tls
    head = rest.rpartition("@")[0]
    if any(c in head for c in "/?#"):  # the userinfo would be read as a path, query or fragment
        raise ValueError("the credentials hold '/', '?' or '#': percent-encode them (%2F, %3F, %23)")
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = unquote(user) or None, (unquote(secret) if colon else None)
    nodes = tuple(_redis_node(spec, 26379 if kind == "sentinel" else 6379) for spec in hosts.split(","))
    if kind == "server" and len(nodes) > 1:
        raise ValueError("redis:// names one server; several seed nodes are a cluster "
                         "(redis+cluster://host:port,host:port) or sentinels (redis+sentinel://...)")
    segments = [unquote(s) for s in path.split("/")] if path else []
    service = None
    if kind == "sentinel":
        if not segments or not segments[0]:
            raise ValueError("a Sentinel URL names the primary's service: "
                             "redis+sentinel://host:port[,host:port]/service_name[/db]")
        service = segments.pop(0)
    db = _redis_db(segments)
    if kind == "cluster" and db:
        raise ValueError(f"a Redis Cluster has database 0 only (drop /{db})")
    options = _redis_options(query, tls)
    return RedisTarget(kind, nodes, tls, db, service, username, password, options)


def _redis_node(spec: str, default_port: int) -> tuple[str, int]:
    if spec.startswith("["):
        host, bracket, port = spec[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError("a host in [brackets] is not a valid IPv6 address")
        port = port[1:]
    else:
        host, _, port = spec.partition(":")
    if not host:
        raise ValueError("a host is missing")
    if any(c in host for c in " []\\@"):
        raise ValueError("a host holds a character no host name may hold")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the port of {host} is not a number from 1 to 65535")
    return host, int(port)


def _redis_db(segments: list[str]) -> int:
    segments = [s for s in segments if s]
    if not segments:
        return 0
    if len(segments) > 1 or not segments[0].isdigit():
        raise ValueError("the path after the host must be a database number (/0)")
    return int(segments[0])


def _redis_options(query: str, tls: bool) -> tuple[tuple[str, str], ...]:
    options = []
    for option, value in parse_qsl(query, keep_blank_values=True):
        if option not in REDIS_OPTIONS:
            hint = " (a Redis Cluster is named redis+cluster://host:port[,host:port...])" \
                if option == "cluster" else ""
            raise ValueError(f"unknown option {option!r}{hint}; known: {', '.join(REDIS_OPTIONS)}")
        allowed = REDIS_OPTIONS[option]
        if allowed is not None and value.lower() not in allowed:
            raise ValueError(f"option {option} must be one of {', '.join(allowed)}")
        if option in _TLS_OPTIONS and not tls:
            raise ValueError(f"option {option} applies to TLS only (rediss://...)")
        options.append((option, value))
    return tuple(options)
