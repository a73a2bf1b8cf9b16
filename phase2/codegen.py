"""The organizers' ONNX -> PyTorch conversion: the onnx-pytorch code generator.

Their helper repository (``CdtQin/CVPR2022-AISafety-Helper``, ``onnx/onnx2torch.sh``) converts an
.onnx submission with ``python onnx_pytorch/code_gen.py --onnx_model_path F --output_dir D``: a
copy of onnx-pytorch 0.1.4 they modified, which writes ``D/model.py`` (``class Model``, loading
``D/variables/*.npy``). This module runs onnx-pytorch 0.1.5 from PyPI (pinned in
requirements-nodeps.txt) the way that command does (onnxruntime's symbolic shape inference on),
with the two differences from their copy that an exported ConvNeXt meets:

* their copy has ``Erf`` and ``Pow`` generators and 0.1.5 does not (GELU and the written-out
  LayerNorm use them): :class:`ErfOpCodeGenerator` / :class:`PowOpCodeGenerator` here write the
  same ``torch.erf(...)`` / ``torch.pow(...)`` lines theirs do;
* their ``Clip`` writes ``torch.clamp`` (torch 1.5 has no ``torch.clip``); 0.1.5 writes
  ``torch.clip``, which the check of the generated code against torch 1.5's names reports;
* their generated ``Model.__init__`` empties each ``self._vars`` entry its ``forward`` never reads
  (the weights a ``Conv``/``Gemm`` module took a copy of): without that, ptflops counts those
  parameters twice (the demo model: 6.75M instead of 3.38M). :func:`load_generated` does the same.

Neither has a ``Sin`` generator (hence GCM's ``cos`` form in an exported .onnx), and ``Pad``
needs its pads as initializers (constant pads). onnx-pytorch 0.1.5 imports ``onnx.mapping``,
which onnx removed in 1.15; :func:`import_code_gen` puts back the one table it reads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import sys
import types
import uuid
from pathlib import Path

import onnx
import torch
from torch import nn

PACKAGE = "onnx-pytorch==0.1.5"
# What a tensor or node name may hold once the generator has replaced ':', '/' and '.' by '_': the
# names are pasted into the generated Python, so anything else is refused before generating.
SAFE_NAME = re.compile(r"^[A-Za-z0-9_]*$")


FORWARD = "def forward(self, *inputs):"
VAR_READ = re.compile(r'self\._vars\["([^"]+)"\]')


class ConversionError(Exception):
    """The code generator refused the file, or its module does not load."""


def _shim_onnx_mapping() -> None:
    """``onnx.mapping.TENSOR_TYPE_TO_NP_TYPE`` as onnx < 1.15 had it (onnx-pytorch imports it)."""
    if "onnx.mapping" in sys.modules or importlib.util.find_spec("onnx.mapping") is not None:
        return
    mapping = types.ModuleType("onnx.mapping")
    mapping.TENSOR_TYPE_TO_NP_TYPE = {
        t: onnx.helper.tensor_dtype_to_np_dtype(t)
        for t in onnx.TensorProto.DataType.values()
        if t not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING) and _has_np_dtype(t)
    }
    sys.modules["onnx.mapping"] = mapping
    onnx.mapping = mapping


def _has_np_dtype(t: int) -> bool:
    try:
        onnx.helper.tensor_dtype_to_np_dtype(t)
    except (KeyError, ValueError, TypeError):
        return False
    return True


def import_code_gen():
    """``onnx_pytorch.code_gen`` with the organizers' ``Erf`` and ``Pow`` generators registered."""
    _shim_onnx_mapping()
    try:
        from onnx_pytorch import code_gen, op_code_generators
    except ImportError as exc:
        raise ConversionError(
            f"the onnx-pytorch code generator is not installed ({exc}); pip install {PACKAGE}"
        ) from exc
    base = op_code_generators.OpCodeGenerator
    for op, call in (("Erf", "torch.erf"), ("Pow", "torch.pow")):
        if not hasattr(op_code_generators, op):  # get_op_code_generator looks the op up in this namespace
            generator = _unary_call(base, op, call)
            setattr(op_code_generators, op, types.SimpleNamespace(**{f"{op}OpCodeGenerator": generator}))
    return code_gen


def _unary_call(base: type, op: str, call: str) -> type:
    """A generator writing ``out = call(inputs...)``, the form of the organizers' Erf and Pow generators."""

    def gen(self, node, value_infos, initializers):
        inputs, outputs = self.gen_input_output_string(node, initializers, self.rename_helper, self.tensor_inplace)
        return {"init": [], "forward": [f"{outputs[0]} = {call}({', '.join(inputs)})"]}

    return type(f"{op}OpCodeGenerator", (base,), {"gen": gen})


def unsafe_name(proto: onnx.ModelProto) -> str | None:
    """A tensor or node name (or a node's string attribute) that would not be a plain identifier in
    the generated code, or None."""
    graph = proto.graph
    names = [n.name for n in graph.node] + [t for n in graph.node for t in (*n.input, *n.output)]
    names += [v.name for v in (*graph.input, *graph.output, *graph.initializer)]
    for name in names:
        if not SAFE_NAME.match(re.sub("[:/.]", "_", name)):
            return name
    # string attributes (a Pad or Resize mode...) are pasted into the code too
    for node in graph.node:
        for attr in node.attribute:
            for value in [attr.s, *attr.strings]:
                if not SAFE_NAME.match(value.decode("utf-8", errors="replace").replace("-", "_")):
                    return f"{node.name}.{attr.name}"
    return None


def generate(proto: onnx.ModelProto, out_dir: Path) -> Path:
    """Run the code generator on ``proto`` into ``out_dir``; returns the generated ``model.py``.

    Raises:
        ConversionError: the generator's error, as its first line (e.g. an op it has no generator for).
    """
    bad = unsafe_name(proto)
    if bad is not None:
        raise ConversionError(f"the tensor/node name {bad[:80]!r} is not a plain identifier; not generated")
    code_gen = import_code_gen()
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs every renamed tensor and its shape-inference fallback
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the whole generated file
            code_gen.get_model_code_generator(copy, str(out_dir), shape_infer=True).run()
    except Exception as exc:  # the generator raises NotImplementedError, KeyError, AssertionError...
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConversionError(f"{type(exc).__name__}: {first}") from exc
    finally:
        logger.setLevel(level)
    return out_dir / "model.py"


def load_generated(model_py: Path) -> nn.Module:
    """``Model()`` of the generated file (it reads ``variables/*.npy`` beside it), in eval mode, its
    variables that ``forward`` never reads emptied as the organizers' copy does (module docstring)."""
    name = f"phase2_generated_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, model_py)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        model = module.Model().eval()
    except Exception as exc:  # whatever the generated code raises on import or construction
        raise ConversionError(f"the generated model.py does not load ({type(exc).__name__}: {str(exc)[:200]})") from exc
    source = model_py.read_text()
    read = set(VAR_READ.findall(source[source.find(FORWARD) :])) if FORWARD in source else set()
    for key in list(getattr(model, "_vars", {})):
        if key not in read:
            model._vars[key] = nn.Parameter(torch.empty(0), requires_grad=False)
    return model


def convert(proto: onnx.ModelProto, out_dir: Path) -> tuple[nn.Module, str]:
    """The generated module of ``proto`` and the generated source (for the torch 1.5 name check)."""
    model_py = generate(proto, out_dir)
    return load_generated(model_py), model_py.read_text()
