"""The static checks of the organizers' Python 3.6 / torch 1.5 environment (issue 34), each
against the real thing where this machine has it: pyenv's Python 3.6 for the grammar (skipped
without it; PYTHON36 names another), the torch 1.5.0 name list made from the real wheel."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from phase2 import legacy_env

PYTHON36 = os.environ.get("PYTHON36", str(Path.home() / ".pyenv/versions/3.6.15/bin/python3.6"))

# Syntax newer than 3.6 (the version that added it); the first group is what ast's
# feature_version=(3, 6) catches by itself, the second what legacy_env walks for.
NEWER = {
    "walrus": "if (n := 3):\n    pass\n",
    "positional-only": "def f(a, /, b):\n    pass\n",
    "f-string =": "x = 1\ny = f'{x=}'\n",
    "match": "match x:\n    case 1:\n        pass\n",
    "future annotations": "from __future__ import annotations\n",
    "starred return": "def f(a):\n    return 1, *a\n",
    "starred yield": "def f(a):\n    yield 1, *a\n",
    "relaxed decorator": "@x[0].y\ndef f():\n    pass\n",
    "starred subscript": "a[*b]\n",
    "continue in finally": "for i in x:\n    try:\n        pass\n    finally:\n        continue\n",
}
VALID_36 = {
    "parenthesized starred return": "def f(a):\n    return (1, *a)\n",
    "dotted decorator call": "@a.b(1)\ndef f():\n    pass\n",
    "continue in a loop inside finally": "try:\n    pass\nfinally:\n    for i in x:\n        continue\n",
    "variable annotation": "x: int = 1\n",
    "f-string": "x = 1\ny = f'{x!r:>4}'\n",
    "division future": "from __future__ import division\n",
}


@pytest.mark.parametrize("case", list(NEWER))
def test_syntax_newer_than_36_is_reported(case):
    problems = legacy_env.syntax_problems(NEWER[case], "model.py")
    assert problems and problems[0].startswith("model.py:"), case


@pytest.mark.parametrize("case", list(VALID_36))
def test_syntax_36_had_is_not_reported(case):
    assert legacy_env.syntax_problems(VALID_36[case], "model.py") == []


@pytest.mark.skipif(not Path(PYTHON36).is_file(), reason=f"no Python 3.6 at {PYTHON36} (PYTHON36=...)")
def test_the_cases_agree_with_the_real_python_36():
    # What 3.6.15 itself says of each snippet: the ground truth the static check stands in for.
    script = (
        "import json, sys\n"
        "cases = json.load(sys.stdin)\n"
        "out = {}\n"
        "for k, src in cases.items():\n"
        "    try:\n"
        "        compile(src, k, 'exec'); out[k] = True\n"
        "    except SyntaxError:\n"
        "        out[k] = False\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [PYTHON36, "-I", "-c", script], input=json.dumps({**NEWER, **VALID_36}), capture_output=True, text=True
    )
    compiles = json.loads(proc.stdout)
    assert {k for k, ok in compiles.items() if not ok} == set(NEWER)


def test_the_model_py_template_passes():
    source = Path(legacy_env.__file__).with_name("model_template.py").read_text()
    assert legacy_env.syntax_problems(source, "model.py") == []
    assert legacy_env.torch_name_problems(source, "model.py") == []


def test_torch_names_later_than_15_are_reported_through_any_import():
    source = (
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from torch import nn, special\n"
        "from torch.nn import functional\n"
        "y = torch.linalg.norm(x) + F.silu(x) + functional.gelu(x) + nn.SiLU()(x) + torch.clip(x, 0, 1)\n"
    )
    problems = legacy_env.torch_name_problems(source, "m.py")
    for name in ("torch.special", "torch.linalg", "torch.nn.functional.silu", "torch.nn.SiLU", "torch.clip"):
        assert any(f"{name} is not in torch 1.5.0" in p for p in problems), name
    assert not any("gelu" in p for p in problems)


def test_weights_formats():
    assert legacy_env.weights_problem(b"PK\x03\x04", "weights.pth").startswith("weights.pth is in the zip format")
    assert legacy_env.weights_problem(b"\x80\x02\x8a\n", "weights.pth") is None
    assert "neither" in legacy_env.weights_problem(b"junk", "weights.pth")


def test_onnx_versions():
    assert legacy_env.onnx_version_problem(8, 15) is None
    assert legacy_env.onnx_version_problem(9, 13).startswith("IR version 9 > 8")
    assert legacy_env.onnx_version_problem(7, 16).startswith("opset 16 > 15")
