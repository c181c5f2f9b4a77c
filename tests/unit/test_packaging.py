"""The embedded tables and SQL migrations ship inside the package; `config/` is a link to them for users.

The wheel itself is built, installed into a fresh venv and run by `.ci/run` (see `.ci/wheel_check.sh`)."""

from __future__ import annotations

import fnmatch
import tomllib
from importlib import resources

from proxy.settings import DATA_DIR, DEFAULT_CONFIG_PATH, DEMO_CONFIG_PATH, MIGRATIONS_DIR, PACKAGE_ROOT
from proxy.table.store import load_migrations

CONFIG = PACKAGE_ROOT / "config"


def relative_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_config_dir_is_the_same_as_the_package_data():
    # a link, so the user-facing copy can never drift from what ships
    assert CONFIG.is_symlink() and CONFIG.resolve() == DATA_DIR.resolve()
    assert relative_files(CONFIG) == relative_files(DATA_DIR)


def test_every_data_file_is_declared_package_data():
    declared = tomllib.loads((PACKAGE_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = declared["proxy"]
    for name in relative_files(DATA_DIR):
        assert any(fnmatch.fnmatch(f"data/{name}", p) for p in patterns), f"proxy/data/{name} would not ship"


def test_paths_are_read_from_the_package():
    data = resources.files("proxy").joinpath("data")
    assert DEFAULT_CONFIG_PATH.read_text() == data.joinpath("routes.yaml").read_text()
    assert DEMO_CONFIG_PATH.read_text() == data.joinpath("demo.yaml").read_text()
    assert MIGRATIONS_DIR.is_relative_to(DATA_DIR)
    shipped = sorted(int(p.name[:3]) for p in data.joinpath("sql").iterdir() if p.name.endswith(".sql"))
    assert [m.version for m in load_migrations()] == shipped and shipped[0] == 1
