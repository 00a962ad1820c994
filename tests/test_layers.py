"""Imports run one way: caller -> middleware -> route -> domain -> upstream pool -> store.

Each module of ``gateway`` belongs to one layer; a module may import its own layer and the
layers below it, never one above. The simulator is a product of its own: it may import only
the protocol's shared constants. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

# Top first. The name is the first component below ``gateway`` (a module or a subpackage).
LAYERS: list[tuple[str, set[str]]] = [
    ("entry points", {"__main__", "server", "master", "worker", "demo", "sim", "http11"}),
    ("application", {"app"}),
    ("front middleware", {"middleware"}),
    ("routes", {"routes", "openapi"}),
    ("services", {"services", "purge"}),
    (
        "domain",
        {"auth", "ratelimit", "query", "lookup", "cache", "owners", "tasks", "validation"}
        | {"ledger", "quota", "dedup", "visibility"}
        | {"images"}
        | {"watcher", "events", "push", "webhooks"},
    ),
    ("upstream pool", {"upstreams", "outbound", "circuit", "transport"}),
    (
        "infrastructure",
        {"store", "streams", "buckets", "metrics", "logs", "lru", "flights", "records"},
    ),
    ("foundation", {"config", "configfile", "weakkeys", "errors", "context", "protocol"}),
]
LEVEL = {name: level for level, (_, names) in enumerate(LAYERS) for name in names}
SIM_MAY_IMPORT = {"sim", "protocol"}


def component(module: str) -> str | None:
    """``gateway.routes.tasks`` -> ``routes``; None for anything outside the package."""
    parts = module.split(".")
    if parts[0] != "gateway":
        return None
    return parts[1] if len(parts) > 1 else ""


def is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()


def imported_components(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
            if node.module == "gateway":  # a sub-module, or a name of the package's own
                modules = [
                    f"gateway.{alias.name}" if is_module(alias.name) else "gateway"
                    for alias in node.names
                ]
        found.update(c for m in modules if (c := component(m)) is not None)
    return found


def owner_component(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_has_a_layer() -> None:
    components = {owner_component(p) for p in SOURCES}
    assert components - set(LEVEL) == set()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up(path: Path) -> None:
    me = owner_component(path)
    imports = imported_components(path) - {me, ""}
    if me == "sim":
        assert imports <= SIM_MAY_IMPORT, f"the simulator imports {imports - SIM_MAY_IMPORT}"
        return
    upward = {name for name in imports if LEVEL[name] < LEVEL[me]}
    assert not upward, f"{me} imports higher layers: {sorted(upward)}"


def test_the_layering_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a domain module importing a route is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f() -> None:\n    from gateway.routes import tasks\n")
    assert imported_components(bad) == {"routes"}
    assert LEVEL["routes"] < LEVEL["lookup"]
