"""`RouterConfig`: every setting tiergate reads, merged as defaults < config file < environment < CLI flags.

The environment includes a `.env` file in the working directory (real environment variables win
over it). Settings are read once, at start-up; request code never looks at the environment.
`RouterConfig(field=value, ...)` merges the same way, the fields given winning (as the migration
guides build it); `RouterConfig.defaults()` is the built-in defaults alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from .types import ConfigError
from .urls import REDIS_URL_FORMS, parse_redis_url, parse_url, redact_credentials

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the checkout (tests, docs); not there once installed
# The embedded tables and SQL migrations ship inside the package (package data), so an installed
# wheel finds them; `config/` at the top of the checkout is a link to them, for users.
DATA_DIR = Path(str(resources.files(__package__ or "proxy").joinpath("data")))
DEFAULT_CONFIG_PATH = DATA_DIR / "routes.yaml"
DEMO_CONFIG_PATH = DATA_DIR / "demo.yaml"
MIGRATIONS_DIR = DATA_DIR / "sql"

# Environment names kept from the migration guides; every other field reads TIERGATE_<FIELD>.
LEGACY_ENV = {
    "portkey_api_key": "PORTKEY_API_KEY",
    "openrouter_api_key": "OPENROUTER_API_KEY",
    "database_url": "DATABASE_URL",
    "connection_pool_size": "CONNECTION_POOL_SIZE",
    "cache_ttl": "CACHE_TTL",
    "cache_max_size": "CACHE_MAX_SIZE",
    "cache_memory_limit_mb": "CACHE_MEMORY_LIMIT_MB",
    "health_check_interval": "HEALTH_CHECK_INTERVAL",
    "enable_monitoring": "ENABLE_MONITORING",
    "enable_batching": "ENABLE_BATCHING",
}

SECRET_FIELDS = frozenset({"portkey_api_key", "openrouter_api_key", "database_url", "redis_url",
                           "api_keys"})

METRICS_AUTH = ("key", "open")


@dataclass(frozen=True)
class _Settings:
    """The fields and their built-in defaults; `RouterConfig` adds how they are merged."""

    # provider keys (a provider's `api_key_env` in the table names where its key comes from)
    portkey_api_key: str | None = None
    openrouter_api_key: str | None = None
    # routing table
    config_path: str | None = None
    allow_model_override: bool = True
    # server
    host: str = "127.0.0.1"
    port: int = 8100
    workers: int = 1
    worker_restart_backoff: float = 0.5  # seconds before a dead worker is restarted; doubles per quick death
    worker_restart_backoff_max: float = 30.0  # the longest wait; a worker that ran this long resets it
    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int = 2048
    client_body_timeout: float = 30.0
    drain_timeout: float = 20.0
    header_timeout: float = 10.0  # seconds to receive a request's headers (a silent connection: closed)
    keepalive_timeout: float = 75.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 0  # open inbound connections per process; 0: from the descriptor limit
    api_keys: tuple[str, ...] = ()
    # inbound keys also from Postgres (llm_api_keys, `tiergate keys ...`); authentication is on even
    # while the database has given none
    database_keys: bool = False
    # GET /metrics: `key` needs an inbound key when api_keys are set (it reveals traffic); `open` never
    metrics_auth: str = "key"
    metrics_port: int = 0  # > 0: /metrics (only) also served on metrics_host:metrics_port, without a key
    metrics_host: str = "127.0.0.1"
    # upstream calls
    enable_fallback: bool = True
    max_retries: int = 3
    # LLM calls last seconds to minutes (the OpenAI SDK itself waits 600 s): the overall deadline of a
    # non-stream call; a stream has none by default, only its idle bound between chunks
    timeout: float = 600.0
    connect_timeout: float = 5.0
    # until a stream's first chunk: past it the attempt failed and the next candidate is tried
    first_byte_timeout: float = 15.0
    stream_idle_timeout: float = 60.0
    attempt_timeout: float | None = None  # a non-stream attempt (default: what is left of the deadline)
    retry_backoff: float = 0.1
    retry_after_cap: float = 5.0
    rate_limit_cooldown: float = 1.0  # a 429 without Retry-After skips its deployment this long
    cooldown_cap: float = 60.0
    # streams hold a connection for their whole length: a sidecar holds thousands at once
    connection_pool_size: int = 2048
    connection_pool_overflow: int = 2048
    max_concurrent_per_provider: int = 0
    max_queue_per_provider: int = 1024
    shadow_max_concurrency: int = 32  # shadow calls (a route's `shadow`) running at once in this process, all routes
    max_response_bytes: int = 64 * 1024 * 1024
    # a shared stream's subscriber this many bytes behind the upstream is cut (an SSE error event); a
    # request arriving once a stream has relayed more than this starts its own upstream call
    stream_subscriber_buffer: int = 1024 * 1024
    drop_headers: tuple[str, ...] = ()
    breaker_failure_threshold: int = 5
    breaker_recovery_timeout: float = 60.0
    health_check_interval: float = 60.0
    # cache
    enable_caching: bool = True
    cache_ttl: int = 3600
    cache_max_size: int = 1000
    cache_memory_limit_mb: int = 100
    redis_url: str | None = None
    redis_timeout: float = 0.05
    cache_namespace: str = "tiergate"  # prefix of the keys in Redis: fleets sharing one Redis keep apart
    # the Responses API and pass-through
    response_affinity_size: int = 100_000  # stored response ids remembered in memory (Redis: all, for 30 days)
    passthrough_max_body_bytes: int = 512 * 1024 * 1024  # uploads passed through (files, audio) are streamed
    # rate limits and budgets: what to do while Redis cannot be reached (fail_open: count in this
    # process against the limit's share of the fleet; fail_closed: refuse requests a limit applies to)
    limits_on_redis_failure: str = "fail_open"
    # a request is admitted without waiting for Redis while every limit it counts against is further
    # than this share of its cap from full (and than the fleet's last second of use); nearer, each
    # admission waits for Redis's atomic check. 1 makes every admission wait.
    limits_sync_within: float = 0.1
    # batching
    enable_batching: bool = False
    batch_window_ms: float = 5.0
    batch_max_inputs: int = 256
    # database
    database_url: str | None = None
    db_pool_size: int = 5
    db_timeout: float = 5.0
    refresh_interval: float = 30.0
    # the table file is polled this often (seconds) and a change applied; 0: read once at start-up
    table_watch_interval: float = 0.5
    # observability
    enable_monitoring: bool = True
    log_level: str = "INFO"
    log_prompts: bool = False
    # one JSON line per request: stderr (cheapest) | logging | off. A library stays quiet unless the
    # application configures logging; `tiergate serve` defaults to stderr (see SERVE_DEFAULTS).
    request_log: str = "logging"
    trace_export: str = "process"  # spans exported by a child process | thread (the SDK's, in this process)
    trace_attempts: str = "auto"  # attempt child spans only when a request makes several | always
    genai_semconv: str = "1.42"  # GenAI convention names: 1.42 | 1.41 (previous) | 1.41/dup (both)
    # the merged environment (with .env), kept to resolve `api_key_env` names in the table
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # a malformed URL is a clear message at start-up (credentials masked), not a traceback later
        if self.database_url:
            try:
                parse_url(self.database_url, name="DATABASE_URL", credentials=True,
                          schemes=("postgresql", "postgres", "postgresql+asyncpg"))
            except ValueError as exc:
                raise ConfigError(str(exc), param="database_url") from None
        if self.redis_url:  # one server, a cluster or a Sentinel-managed primary: see parse_redis_url
            try:
                parse_redis_url(self.redis_url)
            except ValueError as exc:
                raise ConfigError(str(exc), param="redis_url") from None

        if not 0.0 <= self.limits_sync_within <= 1.0:
            raise ConfigError(f"limits_sync_within = {self.limits_sync_within}: expected a share of the cap "
                              "between 0 and 1", param="limits_sync_within")
        if self.metrics_auth not in METRICS_AUTH:
            raise ConfigError(f"metrics_auth = {self.metrics_auth!r}: expected one of {', '.join(METRICS_AUTH)}",
                              param="metrics_auth")


# Defaults of `tiergate serve` that differ from the library's (below the file and the environment).
SERVE_DEFAULTS: Mapping[str, Any] = {"request_log": "stderr"}


class RouterConfig(_Settings):
    """All of tiergate's settings. Field names follow the migration guides.

    `RouterConfig(cache_ttl=7200)` is `RouterConfig.load()` with `cache_ttl` given: the fields named
    win, the others come from the config file and the environment (a `.env` included).
    """

    def __init__(self, **given: Any):
        if given.keys() >= _INIT_FIELDS:  # every field named (dataclasses.replace): taken as is
            super().__init__(**given)
            return
        unknown = sorted(given.keys() - _INIT_FIELDS)
        if unknown:
            raise TypeError(f"RouterConfig() got an unexpected keyword argument {unknown[0]!r}")
        loaded = RouterConfig.load(config_path=given.get("config_path"), overrides=given, keep_none=True)
        super().__init__(**{f.name: getattr(loaded, f.name) for f in fields(loaded)})

    @classmethod
    def defaults(cls, **given: Any) -> RouterConfig:
        """The built-in defaults (with `given` fields), reading no file and no environment."""
        return cls._literal(given)

    @classmethod
    def _literal(cls, values: Mapping[str, Any]) -> RouterConfig:
        config = cls.__new__(cls)
        _Settings.__init__(config, **values)
        return config

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            if f.name == "env":
                continue
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "***"
            shown.append(f"{f.name}={value!r}")
        return f"RouterConfig({', '.join(shown)})"

    __str__ = __repr__

    def replace(self, **changes: Any) -> RouterConfig:
        return dataclasses.replace(self, **changes)

    @property
    def table_path(self) -> Path:
        return Path(self.config_path) if self.config_path else DEFAULT_CONFIG_PATH

    @property
    def database_dsn(self) -> str | None:
        """`DATABASE_URL` in the form asyncpg takes (`postgresql+asyncpg://` accepted)."""
        if not self.database_url:
            return None
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    @classmethod
    def load(
        cls,
        config_path: str | os.PathLike[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        dotenv_path: str | os.PathLike[str] | None = ".env",
        overrides: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        keep_none: bool = False,
    ) -> RouterConfig:
        """Merge defaults < `defaults` < the config file's `settings:` < environment (+ .env) < overrides.

        An override of None is ignored (an unset CLI flag) unless `keep_none`."""
        env = dict(read_dotenv(dotenv_path)) if dotenv_path else {}
        env.update(os.environ if environ is None else environ)
        overrides = {k: v for k, v in (overrides or {}).items() if keep_none or v is not None}

        path = overrides.get("config_path") or config_path or env.get("TIERGATE_CONFIG")
        values: dict[str, Any] = dict(defaults or {})
        if path:
            values["config_path"] = str(path)
        file_settings = _file_settings(Path(path) if path else DEFAULT_CONFIG_PATH)
        values.update(file_settings)
        values.update(_env_settings(env))
        values.update(overrides)
        values["env"] = env
        return cls.from_mapping(values, source="settings")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "settings") -> RouterConfig:
        """Build from loosely typed values (strings from the environment are converted)."""
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, raw in values.items():
            if name not in known:
                raise ConfigError(f"{source}: unknown setting {name!r}", param=name)
            kwargs[name] = raw if name == "env" else _coerce(name, hints[name], raw, source)
        return cls._literal(kwargs)


_URL_SCHEMES = {
    "database_url": ("DATABASE_URL", ("postgresql", "postgres", "postgresql+asyncpg"),
                     "postgresql://user@host:5432/db"),
}


def check_service_urls(config: _Settings) -> None:
    """Raise ConfigError for a malformed DATABASE_URL or Redis URL, naming the part at fault
    before anything tries to connect with it. No part of the URL is quoted: a password holding a
    `/` or `@` would be read as host or port."""
    for name, (variable, schemes, example) in _URL_SCHEMES.items():
        url = getattr(config, name)
        if url:
            problem = _url_problem(url, schemes)
            if problem:
                raise ConfigError(f"{variable} is malformed: {problem} (expected e.g. {example})", param=name)
    if config.redis_url:
        try:
            parse_redis_url(config.redis_url)
        except ValueError as exc:
            raise ConfigError(f"{exc} (expected {'; '.join(REDIS_URL_FORMS)})", param="redis_url") from None


def _url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        return f"the scheme must be {' or '.join(s + '://' for s in schemes)}"
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    hosts = netloc.rpartition("@")[2]  # the credentials are never looked at, nor shown
    for spec in hosts.split(","):  # asyncpg accepts host1:port1,host2:port2
        if spec.startswith("["):
            host, bracket, port = spec[1:].partition("]")
            if not bracket or (port and not port.startswith(":")):
                return "a host in [brackets] is not a valid IPv6 address"
            port = port[1:]
        else:
            host, _, port = spec.partition(":")
        if any(c in host for c in " []\\"):
            return "a host name is not valid"
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return "the port is not a number from 1 to 65535"
    return None


_INIT_FIELDS = frozenset(f.name for f in fields(_Settings) if f.init)


def read_dotenv(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `export` prefix, quotes and comments allowed."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key.strip()] = value
    return out


def _env_settings(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(RouterConfig):
        if f.name == "env":
            continue
        for name in (LEGACY_ENV.get(f.name), f"TIERGATE_{f.name.upper()}"):
            if name and env.get(name, "") != "":
                values[f.name] = env[name]
    if env.get("TIERGATE_API_KEYS_FILE"):
        file_keys = read_keys_file(Path(env["TIERGATE_API_KEYS_FILE"]))
        existing = _split_list(values.get("api_keys", ""))
        values["api_keys"] = tuple(existing) + file_keys
    return values


def read_keys_file(keys_file: Path) -> tuple[str, ...]:
    """The keys in `TIERGATE_API_KEYS_FILE`: one per line (`name=key` or a bare key), `#` comments."""
    try:
        lines = keys_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"TIERGATE_API_KEYS_FILE: cannot read {keys_file}: {exc.strerror}") from None
    return tuple(ln.strip() for ln in lines if ln.strip() and not ln.startswith("#"))


def _file_settings(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(redact_credentials(f"{path}: not valid YAML: {exc}")) from None
    if not isinstance(doc, dict):
        return {}
    settings = doc.get("settings") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: settings: must be a mapping", param="settings")
    return dict(settings)


def _split_list(raw: Any) -> list[str]:
    if isinstance(raw, (list, tuple)):
        return [str(x).strip() for x in raw if str(x).strip()]
    return [p.strip() for p in str(raw).split(",") if p.strip()]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(name: str, hint: Any, raw: Any, source: str) -> Any:
    text = str(hint)
    optional = "None" in text
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} may not be empty", param=name)
    try:
        if "tuple" in text:
            return tuple(_split_list(raw))
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("expected true or false")
        if hint is int or text.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError("expected a whole number")
            return int(str(raw).strip()) if not isinstance(raw, int) else raw
        if hint is float or text.startswith("float"):
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)
        if optional and str(raw).strip() == "":
            return None
        return str(raw)
    except (TypeError, ValueError) as exc:
        shown = "***" if name in SECRET_FIELDS else repr(raw)
        raise ConfigError(f"{source}: {name} = {shown} is invalid: {exc}", param=name) from None
