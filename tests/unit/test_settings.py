"""RouterConfig: defaults < config file < environment (+ .env) < CLI flags."""

from __future__ import annotations

import pytest

from proxy.settings import RouterConfig
from proxy.types import ConfigError


def test_precedence(tmp_path):
    table = tmp_path / "routes.yaml"
    table.write_text("settings: {cache_ttl: 10, timeout: 7, max_retries: 5}\nroutes: []\n")
    dotenv = tmp_path / ".env"
    dotenv.write_text("export CACHE_TTL=20\nTIERGATE_TIMEOUT='8'\nOPENROUTER_API_KEY=sk-from-dotenv # note\n")
    config = RouterConfig.load(table, environ={"TIERGATE_TIMEOUT": "9"}, dotenv_path=dotenv,
                               overrides={"max_retries": 6})
    assert RouterConfig.defaults().cache_ttl == 3600
    assert config.cache_ttl == 20          # .env over the file
    assert config.timeout == 9.0           # real environment over .env
    assert config.max_retries == 6         # CLI flags over everything
    assert config.openrouter_api_key == "sk-from-dotenv"
    assert config.config_path == str(table)


def test_legacy_and_prefixed_names_and_types():
    config = RouterConfig.load(environ={
        "ENABLE_MONITORING": "false", "CONNECTION_POOL_SIZE": "7", "TIERGATE_PORT": "9100",
        "TIERGATE_API_KEYS": "k1, k2", "DATABASE_URL": "postgresql+asyncpg://u@h/db",
        "TIERGATE_REDIS_URL": "redis://127.0.0.1:6379/0"}, dotenv_path=None)
    assert config.enable_monitoring is False
    assert config.connection_pool_size == 7 and config.port == 9100
    assert config.api_keys == ("k1", "k2")
    assert config.database_dsn == "postgresql://u@h/db"
    assert config.redis_url == "redis://127.0.0.1:6379/0"


def test_bad_values_name_the_setting_and_hide_secrets():
    with pytest.raises(ConfigError, match="cache_ttl = 'soon' is invalid"):
        RouterConfig.load(environ={"CACHE_TTL": "soon"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        RouterConfig.from_mapping({"colour": 1})


def test_repr_hides_secrets():
    config = RouterConfig.load(environ={"OPENROUTER_API_KEY": "sk-very-secret",
                                        "DATABASE_URL": "postgresql://u:pw-secret@h/db"}, dotenv_path=None)
    assert "sk-very-secret" not in repr(config) and "pw-secret" not in str(config)
