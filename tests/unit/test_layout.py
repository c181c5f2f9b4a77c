"""The shape of the code, checked: short functions, no import cycles (type-only imports included),
no reads of another object's private attributes, no API-family identity checks outside the adapters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every proxy module `name` imports, wherever the import is (type-only and deferred ones too)."""
    package = name if name in MODULES and (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() \
        else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycles() -> None:
    graph = {name: _imports(name, tree) for name, tree in MODULES.items()}
    # a package's __init__ that re-exports its modules is not a cycle with them
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and m in MODULES)}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _functions():
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_no_function_is_longer_than_a_screen() -> None:
    long = [f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines"
            for name, fn in _functions() if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def _private_names(tree: ast.Module) -> set[str]:
    """The private attributes a module's own classes define (`self._x = ...`, class fields, slots)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
                    if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets):
                        names.update(c.value for c in ast.walk(item.value) if isinstance(c, ast.Constant))
    return {n for n in names if isinstance(n, str) and n.startswith("_") and not n.startswith("__")}


# private attributes of third-party objects, each read in the one module that adapts that library
# (the name happens to be one a tiergate class uses too)
THIRD_PARTY_READS = {
    ("proxy.observability.metrics", "_buckets"): "prometheus_client's histogram child: bulk increments",
}


def test_no_private_attribute_of_another_module_is_read() -> None:
    """`x._name` (or `getattr(x, "_name")`) where `_name` belongs to a class of another tiergate module.
    (Private names of third-party objects are each read in the one module that adapts that library.)"""
    own = {name: _private_names(tree) for name, tree in MODULES.items()}
    bad = []
    for name, tree in MODULES.items():
        elsewhere = set().union(*(names for module, names in own.items() if module != name)) - own[name]
        for node in ast.walk(tree):
            attr = None
            if isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name)
                                                        and node.value.id in ("self", "cls")):
                attr = node.attr
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "getattr", "setattr", "hasattr") and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                attr = node.args[1].value
            if isinstance(attr, str) and attr in elsewhere and (name, attr) not in THIRD_PARTY_READS:
                bad.append(f"{name}:{node.lineno}: .{attr}")
    assert not bad, "\n".join(bad)


def test_api_families_are_not_told_apart_outside_the_adapters() -> None:
    bad = []
    for name, tree in MODULES.items():
        if name.startswith("proxy.adapters"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Name) and s.id in ("endpoint", "ENDPOINT") for s in sides) or any(
                        isinstance(s, ast.Name) and s.id in ("CHAT", "COMPLETIONS", "EMBEDDINGS", "RESPONSES",
                                                             "MESSAGES") for s in sides):
                    bad.append(f"{name}:{node.lineno}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["Attempt", "Result", "StreamState", "RequestRecord"])
def test_outcome_types_come_from_the_outcome_module(name: str) -> None:
    users = []
    for module, tree in MODULES.items():
        if module == "proxy.outcome":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
                if not (node.module or "").endswith("outcome"):
                    users.append(f"{module}:{node.lineno} from {node.module}")
            if isinstance(node, ast.ClassDef) and node.name == name:
                users.append(f"{module}:{node.lineno} defines {name}")
    assert not users, "\n".join(users)
