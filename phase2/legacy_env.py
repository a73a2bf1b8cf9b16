"""The organizers' 2022 environment, checked without it.

Their helper repository (``CdtQin/CVPR2022-AISafety-Helper``, ``env.txt``) lists torch 1.5.0,
onnx 1.11.0 and onnxruntime 1.10.0, and the ``dataclasses 0.8`` backport, which installs only on
Python 3.6. A zip's code runs there, so each check here stands for one way it fails at their
``from model import Model``:

* :func:`syntax_problems`: Python 3.6's grammar. ``ast.parse(feature_version=(3, 6))`` catches
  most later syntax (walrus, positional-only parameters, ``f"{x=}"``, ``match``...) but not all;
  the rest, checked against the real 3.6.15 interpreter (tests/test_legacy_env.py), is walked
  here: a starred item in an unparenthesized ``return``/``yield`` tuple (3.8), a decorator that is
  not a dotted name or call (3.9), a starred subscript (3.11), ``continue`` in ``finally`` (3.8),
  a ``__future__`` feature 3.6 did not know (``annotations``, 3.7).
* :func:`torch_name_problems`: every ``torch.*``, ``torch.nn.*``, ``torch.nn.functional.*`` and
  ``torch.nn.init.*`` name the code reaches through an import existed in torch 1.5.0
  (:data:`TORCH_150_NAMES`, made from the real wheel). Methods of tensors cannot be resolved
  statically and are not checked.
* :func:`weights_problem`: a ``.pth``/``.pt`` file is in the pre-1.6 format (torch 1.5 cannot
  read the zip format ``torch.save`` writes since 1.6).
* :func:`onnx_version_problem`: an ONNX file's IR version <= 8 (onnx 1.11) and opset <= 15
  (onnxruntime 1.10).
"""

from __future__ import annotations

import ast
from pathlib import Path

NAMES_FILE = Path(__file__).resolve().parent / "torch150_names.txt"
TORCH_MODULES = ("torch", "torch.nn", "torch.nn.functional", "torch.nn.init")
MAX_IR_VERSION = 8  # onnx 1.11.0 writes and reads IR version 8
MAX_OPSET = 15  # onnxruntime 1.10.0 implements ai.onnx opsets up to 15
# The __future__ features Python 3.6 knows (Lib/__future__.py of 3.6).
FUTURE_36 = frozenset(
    "nested_scopes generators division absolute_import with_statement print_function unicode_literals "
    "barry_as_FLUFL generator_stop".split()
)


def load_torch_names() -> frozenset:
    """The dotted names of :data:`NAMES_FILE` (comment lines skipped)."""
    lines = NAMES_FILE.read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


TORCH_150_NAMES = load_torch_names()


def syntax_problems(source: str, name: str) -> list[str]:
    """What in ``source`` Python 3.6 cannot compile, as ``name:line: what`` (empty: none found)."""
    try:
        tree = ast.parse(source, filename=name, feature_version=(3, 6))
    except SyntaxError as exc:
        return [f"{name}:{exc.lineno}: {exc.msg} (Python 3.6 grammar)"]
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        return [f"{name}: not parseable Python ({type(exc).__name__})"]
    lines = source.splitlines()
    problems = []
    for node in ast.walk(tree):
        why = _newer_syntax(node, lines)
        if why:
            problems.append(f"{name}:{getattr(node, 'lineno', '?')}: {why}")
    return problems


def _newer_syntax(node: ast.AST, lines: list[str]) -> str | None:
    """Why ``node`` is syntax Python 3.6 lacks that ``feature_version`` lets through, or None."""
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        unknown = [a.name for a in node.names if a.name not in FUTURE_36]
        return f"from __future__ import {unknown[0]}: no such feature in Python 3.6" if unknown else None
    if isinstance(node, (ast.Return, ast.Yield)) and isinstance(node.value, ast.Tuple):
        if any(isinstance(e, ast.Starred) for e in node.value.elts) and not _parenthesized(node.value, lines):
            return "a starred item in an unparenthesized return/yield tuple needs Python 3.8"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        if not all(_plain_decorator(d) for d in node.decorator_list):
            return "a decorator that is not a dotted name or a call of one needs Python 3.9"
    if isinstance(node, ast.Subscript) and _has_starred(node.slice):
        return "a starred subscript (a[*b]) needs Python 3.11"
    if isinstance(node, ast.Try) and any(isinstance(n, ast.Continue) for n in _loop_free_walk(node.finalbody)):
        return "'continue' inside 'finally' needs Python 3.8"
    return None


def _parenthesized(node: ast.expr, lines: list[str]) -> bool:
    line = lines[node.lineno - 1] if 0 < node.lineno <= len(lines) else ""
    return line[node.col_offset : node.col_offset + 1] == "("


def _plain_decorator(node: ast.expr) -> bool:
    """3.6's ``'@' dotted_name [ '(' [arglist] ')' ]``."""
    target = node.func if isinstance(node, ast.Call) else node
    while isinstance(target, ast.Attribute):
        target = target.value
    return isinstance(target, ast.Name) and (not isinstance(node, ast.Call) or _dotted(node.func))


def _dotted(node: ast.expr) -> bool:
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def _has_starred(node: ast.expr) -> bool:
    return isinstance(node, ast.Starred) or (
        isinstance(node, ast.Tuple) and any(isinstance(e, ast.Starred) for e in node.elts)
    )


def _loop_free_walk(body: list[ast.stmt]):
    """The nodes of ``body`` outside any loop or function nested in it (a ``continue`` there is legal)."""
    stack = list(body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.For, ast.AsyncFor, ast.While, ast.FunctionDef, ast.AsyncFunctionDef)):
            stack.extend(ast.iter_child_nodes(node))


def torch_name_problems(source: str, name: str, known: frozenset = TORCH_150_NAMES) -> list[str]:
    """Every torch name the code reaches through its imports that torch 1.5.0 did not have."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []  # syntax_problems reports it
    aliases = _torch_aliases(tree)
    problems = []
    for node in ast.walk(tree):
        for dotted in _torch_references(node, aliases):
            missing = _first_missing(dotted, known)
            if missing:
                problems.append(f"{name}:{node.lineno}: {missing} is not in torch 1.5.0")
    return sorted(set(problems), key=problems.index)


def _torch_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to torch modules by the file's imports: ``{"F": "torch.nn.functional", ...}``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module in TORCH_MODULES and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in TORCH_MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _torch_references(node: ast.AST, aliases: dict[str, str]) -> list[str]:
    """The dotted torch names ``node`` names: an import of one, or an attribute chain on an alias."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("torch.")]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        if node.module == "torch" or node.module.startswith("torch."):
            return [node.module] + [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
    if isinstance(node, ast.Attribute):  # inner links of a chain repeat its prefixes; the caller dedupes
        root = _chain_root(node)
        if isinstance(root, ast.Name) and root.id in aliases:
            return [aliases[root.id] + "." + ".".join(_chain_names(node))]
    return []


def _chain_root(node: ast.Attribute) -> ast.expr | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node if isinstance(node, ast.Name) else None


def _chain_names(node: ast.Attribute) -> list[str]:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return names[::-1]


def _first_missing(dotted: str, known: frozenset) -> str | None:
    """The first prefix of ``dotted`` past a checked module that ``known`` lacks, or None."""
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        module, prefix = ".".join(parts[:i]), ".".join(parts[: i + 1])
        if module not in TORCH_MODULES:
            return None  # past the namespaces the list covers (a class's attributes...)
        if prefix not in known:
            return prefix
    return None


def weights_problem(data: bytes, name: str) -> str | None:
    """Why torch 1.5 cannot read the saved file ``data`` (None if it is in the legacy format)."""
    if data[:4] == b"PK\x03\x04":
        return (
            f"{name} is in the zip format torch.save writes since torch 1.6; torch 1.5 cannot read it "
            "(save with _use_new_zipfile_serialization=False)"
        )
    if data[:2] != b"\x80\x02":
        return f"{name} is not a file torch.save writes (neither the legacy pickle nor the zip format)"
    return None


def onnx_version_problem(ir_version: int, opset: int) -> str | None:
    """Why onnx 1.11 / onnxruntime 1.10 would refuse a file of this IR version and opset (None if not)."""
    if ir_version > MAX_IR_VERSION:
        return f"IR version {ir_version} > {MAX_IR_VERSION}: onnx 1.11 (the organizers') cannot load it"
    if opset > MAX_OPSET:
        return f"opset {opset} > {MAX_OPSET}: onnxruntime 1.10 (the organizers') does not implement it"
    return None
