"""The layout rule of README "Layout": imports go one way, and no stage reaches into a sibling.

Read from the source (every ``import`` / ``from ... import``, relative and lazy ones inside
functions too, and modules named in strings: ``importlib.import_module("x.y")`` and ``-m x.y``
in a command list), so a new arrow that runs the wrong way fails here before it lands.
"""

from __future__ import annotations

import ast
import re
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


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _constant_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _started_modules(items: list[ast.AST]) -> list[str]:
    """The modules a command list runs: ``"-m", "x.y"`` (and the stage after ``"-m", "launch"``)."""
    words = [_constant_str(item) for item in items]
    found = []
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1]:
            found.append(words[i + 1])
            if words[i + 1] == "launch" and i + 2 < len(words) and words[i + 2]:
                found.append(words[i + 2])
    return found


def imported_names(path: Path) -> list[str]:
    """Every module name ``path`` imports or starts (as written; relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and node.args and _constant_str(node.args[0]):
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) == "import_module":
                names.append(_constant_str(node.args[0]))
        elif isinstance(node, (ast.List, ast.Tuple)):
            names += _started_modules(node.elts)
    return names


def run_sh_modules() -> list[str]:
    """The project modules run.sh starts (``-m x.y``, and the stage after ``-m launch``)."""
    found = []
    for first, second in re.findall(r"-m ([\w.]+)(?: ([\w.]+))?", (ROOT / "run.sh").read_text(encoding="utf-8")):
        found += [first, *([second] if first == "launch" and second else [])]
    return [m for m in found if m.split(".")[0] in ALLOWED]


def project_imports(path: Path) -> set[str]:
    """Top-level project packages that ``path`` imports."""
    return {name.split(".")[0] for name in imported_names(path)} & set(ALLOWED)


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


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in ALLOWED for path in (ROOT / package).rglob("*.py")}


def module_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (lazy imports inside functions too)."""
    files = project_modules()

    def module_of(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    return {module: {module_of(name) for name in imported_names(path)} - {"", module} for module, path in files.items()}


def test_strings_and_relative_imports_are_seen():
    gcm, scaling = imported_names(ROOT / "gcm" / "__init__.py"), imported_names(ROOT / "bench" / "scaling.py")
    assert "gcm.gcm" in gcm and {"launch", "train.main"} <= set(scaling)
    assert {"launch", "train.main", "robust.testset", "infer.validate"} <= set(run_sh_modules())


def test_every_module_run_sh_starts_exists():
    modules = project_modules()
    missing = [m for m in run_sh_modules() if m not in modules and f"{m}.__main__" not in modules]
    assert not missing, f"run.sh starts modules that are not there: {missing}"


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
