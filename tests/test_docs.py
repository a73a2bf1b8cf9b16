"""What the documents cite exists: every ``./run.sh`` command, config key and test name.

A renamed key, command or test leaves a sentence that points at nothing; this reads the Markdown
files and checks each citation against the code (run.sh's commands, the config schema, the test
functions).
"""

from __future__ import annotations

import ast
import re

import pytest

from core.config import all_keys, new_config
from tests.conftest import ROOT

DOCS = sorted(p for p in ROOT.glob("*.md"))
SECTIONS = {f.split(".")[0] for f in all_keys(new_config()) if "." in f}
FILE_SUFFIXES = (".py", ".md", ".json", ".csv", ".png", ".yaml", ".txt", ".zip", ".onnx", ".pt2", ".sh", ".safetensors")


def doc_text() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in DOCS}


def run_sh_commands() -> set[str]:
    text = (ROOT / "run.sh").read_text(encoding="utf-8")
    return set(re.findall(r"^\s+([a-z][a-z-]*)\)", text, flags=re.M))


def defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


def test_the_documents_are_found():
    assert {"README.md", "BENCHMARKS.md", "RELIABILITY.md"} <= {p.name for p in DOCS}


@pytest.mark.parametrize("doc", [p.name for p in DOCS])
def test_every_cited_command_exists(doc):
    commands = run_sh_commands()
    cited = set(re.findall(r"\./run\.sh ([a-z][a-z-]*)", doc_text()[doc]))
    assert cited - commands == set(), f"{doc} cites ./run.sh commands that run.sh does not have"


def _is_module_or_file(token: str) -> bool:
    """``eval.md``, ``model.py``: a file name; ``train.main``, ``phase2.score``: a module of this project."""
    if token.endswith(FILE_SUFFIXES):
        return True
    path = ROOT.joinpath(*token.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def cited_keys(text: str) -> set[str]:
    """Config keys a text cites: ``section.key=...`` anywhere, and backticked ``section.key``."""
    keys = {m for m in re.findall(r"\b([a-z_]+(?:\.[a-z_0-9]+)+)=", text)}
    keys |= set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", text))
    return {k for k in keys if k.split(".")[0] in SECTIONS and not _is_module_or_file(k)}


@pytest.mark.parametrize("doc", [p.name for p in DOCS])
def test_every_cited_config_key_exists(doc):
    valid = set(all_keys(new_config())) | SECTIONS
    # a section's sub-section (train.adv, aug.augmix) is a key too
    valid |= {k.rsplit(".", 1)[0] for k in all_keys(new_config())}
    unknown = sorted(k for k in cited_keys(doc_text()[doc]) if k not in valid)
    assert unknown == [], f"{doc} cites config keys that do not exist"


@pytest.mark.parametrize("doc", [p.name for p in DOCS])
def test_every_cited_test_exists(doc):
    # a test's name is a sentence (test_a_full_disk_...): at least three words after "test"
    cited = set(re.findall(r"\b(test_[a-z0-9]+(?:_[a-z0-9]+){2,}(?:_\*)?)", doc_text()[doc]))
    files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    tests = defined_tests() | files

    def exists(name: str) -> bool:  # `test_load_image_*`: some test of that prefix
        return any(t.startswith(name[:-1]) for t in tests) if name.endswith("*") else name in tests

    unknown = sorted(c for c in cited if not exists(c))
    assert unknown == [], f"{doc} cites tests that do not exist"
