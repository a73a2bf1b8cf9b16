"""The layout rule of README "Layout": imports go one way, and no stage reaches into a sibling.

Read from the source (every ``import`` / ``from ... import``, lazy ones inside functions too),
so a new arrow that runs the wrong way fails here before it lands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "gcm": set(),
    "attacks": set(),
    "core": set(),
    "train": {"core", "attacks"},
    "infer": {"core", "gcm"},
    "launch": {"core"},  # starts the stages by module name: imports none of them
    "robust": {"core", "gcm", "attacks", "infer", "train"},
    "phase2": {"core", "gcm", "attacks", "infer", "robust"},
    "bench": {"core", "gcm", "attacks", "infer", "train", "robust", "phase2", "launch"},
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = project_imports(path) - ALLOWED[package] - {package}
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package]) or 'torch and itself'}: {wrong}"


def test_every_package_is_in_the_rule():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(ALLOWED)


def module_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (lazy imports inside functions too)."""
    files = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        names = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        graph[module] = {module_of(name) for name in names} - {"", module}
    return graph


def test_no_module_imports_itself_around_a_circle():
    # A circle is dodged with a lazy import or an injected callable, and either hides the design
    # problem (issue 27: core.config <-> core.transforms, core.labels <-> core.config).
    graph = module_graph()
    assert "core.config.schema" in graph and graph["core.config.load"] >= {"core.config.schema"}
    reaches: dict[str, set[str]] = {}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())
        reaches[start] = seen
    circles = sorted(m for m in graph if m in reaches[m])
    assert not circles, f"modules that import themselves through others: {circles}"
