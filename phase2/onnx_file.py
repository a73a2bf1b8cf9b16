"""The Phase II ONNX file: the model ``submit`` predicts with, behind the channel flip.

Exported with the legacy (TorchScript) exporter at opset :data:`OPSET`: the organizers ran
onnxruntime 1.10, which implements opsets up to 15, so the dynamo exporter's opset 18
(``LayerNormalization``) would not load there; 13 is the lowest at which the random pad's
integer ``Clip`` is defined (opset 11 has no int64 ``Clip``, and onnxruntime refuses that
graph). LayerNorm is written out (ReduceMean, Sub, Pow, Sqrt, Div), ConvNeXt's channels-last
permutes are Transposes, GCM is its ``cos`` form (``Cos``: the organizers' converter, the
onnx-pytorch code generator, has no ``Sin``; :mod:`phase2.codegen`), and the random resize-pad is
left out (its pads depend on a random draw and that converter's ``Pad`` needs constant pads; the
zip keeps it); the batch axis is dynamic.

Why the exported graph is rewritten once: the legacy exporter merges initializers of equal
value (a freshly initialised ConvNeXt has every conv bias zero) and feeds the merged ones
through ``Identity`` nodes; ``onnx2pytorch`` then sees a Conv whose bias is an activation, not
a weight, and calls ``Conv2d.forward(x, bias)`` (``takes 2 positional arguments but 3 were
given``). :func:`split_shared_initializers` gives each such input its own initializer again.

The file describes itself in its metadata (``channel_order``, ``image_size``, ``num_classes``,
``gcm``, ``random_pad``, ``output``), which :mod:`phase2.check` and ``evaluate`` read.
"""

from __future__ import annotations

import collections
import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from core.errors import UserError, echo
from gcm import DefendedModel, GradientConcealment
from infer.defended import resize_to

OPSET = 13
ORT_110_MAX_OPSET = 15  # onnxruntime 1.10, the organizers' version, implements opsets up to 15
EXAMPLE_BATCH = 2
PROBABILITY_FLOOR = 1e-12  # the ensemble's clamp_min before its log

# onnx2pytorch 0.6.0 indexes with lists, which torch 2.14 warns about on every forward of a converted file.
warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")


class ChannelFlip(nn.Module):
    """BGR <-> RGB in front of the model (the organizers feed BGR, the model was trained on RGB).

    A Gather of channels 2, 1, 0, not ``flip`` (a Slice of step -1, which the organizers' converter
    writes as ``x[:, ::-1]``: torch refuses negative steps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, torch.tensor([2, 1, 0], device=x.device))


def create_file_model(model: DefendedModel, channel_order: str) -> nn.Module:
    """The model a Phase II file holds: ``model`` (GCM, random pad, one member) fed in ``channel_order``."""
    return nn.Sequential(ChannelFlip(), model) if channel_order == "bgr" else model


class SingleModelOutput(nn.Module):
    """One member without TTA: ``log(softmax(member(resize(x)) / temperature) + 1e-12)``.

    What the ensemble computes for one member and one view (its ``clamp_min(1e-12).log()``, within
    1e-12 in probability), written in ops the organizers' converter has: without the ensemble's
    ``view(views, N, -1)`` (a Reshape whose shape depends on the batch size: the converter runs
    onnxruntime's symbolic shape inference, which fails on it, and then stops with a KeyError on
    the tensor it could not type), and without ``LogSoftmax`` or ``Clip`` (it has no LogSoftmax,
    and the PyPI release writes Clip as ``torch.clip``, which torch 1.5 lacks).
    """

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.member = ensemble.members[0]
        self.image_size = ensemble.image_sizes[0]
        self.temperature = ensemble.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.member(resize_to(x, self.image_size)).float() / self.temperature
        return (logits.softmax(-1) + PROBABILITY_FLOOR).log()


def onnx_defended_model(model: DefendedModel) -> DefendedModel:
    """``model`` as an .onnx holds it: GCM in its ``cos`` form, no random resize-pad, the one member's
    log-probabilities (:class:`SingleModelOutput`; the module docstring says why)."""
    gcm = model.gcm
    if gcm is not None:
        gcm = GradientConcealment(gcm.w, gcm.eps, form="cos")
    return DefendedModel(SingleModelOutput(model.model), gcm=gcm, random_pad=None).eval()


def split_shared_initializers(model: onnx.ModelProto) -> int:
    """Replace each ``Identity(initializer)`` node by a copy of the initializer under its output's name.

    Returns the number of nodes replaced.
    """
    inits = {t.name: t for t in model.graph.initializer}
    kept, replaced = [], 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            replaced += 1
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return replaced


def export_onnx(model: nn.Module, image_size: int, metadata: dict) -> onnx.ModelProto:
    """ONNX of ``model`` for N x 3 x size x size float32 inputs, N dynamic, with ``metadata``."""
    example = torch.rand(EXAMPLE_BATCH, 3, image_size, image_size)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                (example,),
                buffer,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as exc:  # the exporter raises many types; all mean "this model does not export"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"export: ONNX export failed ({type(exc).__name__}: {first}); --debug shows the trace") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    split_shared_initializers(proto)
    for key, value in metadata.items():
        proto.metadata_props.add(key=str(key), value=str(value))
    return proto


def read_metadata(proto: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in proto.metadata_props}


def load_onnx(path: Path) -> onnx.ModelProto:
    """The ONNX file at ``path`` with its external data, as one line naming it on any failure
    (random or truncated bytes, external data outside its folder, through a link or missing)."""
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError... on a bad file
        first = (str(exc).strip().splitlines() or [""])[0][:400]
        raise UserError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {first})") from None


# onnx.TensorProto element types by name, for messages.
_ELEM_TYPES = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}


def graph_input(proto: onnx.ModelProto) -> tuple[dict | None, str | None]:
    """The graph's one image input, ``{"name", "type", "dims"}`` (a dim: int, or its name when
    dynamic), or what is wrong with the inputs: none, several, not of rank 4."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]  # older exporters list weights too
    if len(inputs) != 1:
        return None, f"the graph has {len(inputs)} inputs; the organizers feed one, N x 3 x H x W"
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    info = {"name": inputs[0].name, "type": _ELEM_TYPES.get(tensor.elem_type, str(tensor.elem_type)), "dims": dims}
    if len(dims) != 4:
        shape = "x".join(map(str, dims))
        return info, f"the input '{info['name']}' has rank {len(dims)} ({shape}); the organizers feed N x 3 x H x W"
    return info, None


# What a file ``./run.sh export`` wrote says of itself, and how each value is read.
FILE_METADATA = {
    "channel_order": lambda v: v if v in ("rgb", "bgr") else None,
    "image_size": lambda v: int(v) if v.isdigit() and 16 <= int(v) <= 4096 else None,
    "num_classes": lambda v: int(v) if v.isdigit() and 2 <= int(v) <= 100_000 else None,
    "gcm": lambda v: {"True": True, "False": False}.get(v),
    "random_pad": lambda v: {"True": True, "False": False}.get(v),
}


def read_file_metadata(proto: onnx.ModelProto, where: str) -> dict:
    """The metadata of a file ``./run.sh export`` wrote, each value read and checked.

    Raises:
        UserError: a key missing or a value that is not what export writes (one line naming it).
    """
    raw = read_metadata(proto)
    meta = {}
    for key, parse in FILE_METADATA.items():
        if key not in raw:
            raise UserError(f"{where}: its metadata has no '{key}' (not written by ./run.sh export)")
        value = parse(raw[key])
        if value is None:
            raise UserError(f"{where}: its metadata '{key}' is {echo(raw[key])}, not what ./run.sh export writes")
        meta[key] = value
    return meta


def op_report(proto: onnx.ModelProto) -> dict:
    """Opset, op types and counts, and whether the file fits onnxruntime 1.10's opset range.

    onnxruntime 1.10 cannot be installed on Python 3.11, so this checks its constraint
    explicitly: every node in the default domain, the file's opset <= 15, and every op type
    defined at that opset.
    """
    opsets = {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import}
    opset = opsets.get("ai.onnx", 0)
    counts = collections.Counter(n.op_type for n in proto.graph.node)
    foreign = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    undefined = [op for op in counts if not onnx.defs.has(op, max_inclusive_version=opset, domain="")]
    return {
        "opset": opset,
        "ops": dict(sorted(counts.items())),
        "other_domains": foreign,
        "ops_undefined_at_opset": undefined,
        "fits_onnxruntime_1_10": opset <= ORT_110_MAX_OPSET and not foreign and not undefined,
    }


def create_session(data: bytes, gpu: bool = False):
    """An onnxruntime session of the file's bytes: on the GPU when ``gpu`` and this onnxruntime has
    the CUDA provider (``session.get_providers()`` says which ran), else on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(data, options, providers=providers)


def run_session(session, x: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])


class BypassableWave(nn.Module):
    """The GCM sine or cosine of a converted ONNX graph, with the BPDA switch ``evaluate`` looks for.

    In the graph GCM is ``x + eps * Cos(w * x)`` (``Sin`` in files of older exports); detaching
    the wave keeps every forward value and leaves the identity path as the gradient: BPDA
    straight through GCM.
    """

    is_gcm = True

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.bpda = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cos(x) if self.form == "cos" else torch.sin(x)
        return y.detach() if self.bpda else y


def convert_to_torch(proto: onnx.ModelProto) -> nn.Module:
    """The file converted to PyTorch by ``onnx2pytorch``, with its ``Sin``/``Cos`` nodes made
    bypassable (:class:`BypassableWave`): what ``evaluate`` attacks. Not the organizers'
    converter (that is :mod:`phase2.codegen`); what it adds is one module per ONNX node, so GCM's
    wave can carry the BPDA switch an adaptive attack needs."""
    from onnx2pytorch import ConvertModel

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ConvertModel(copy).eval()
    except Exception as exc:  # onnx2pytorch raises anything on an op it cannot map
        raise UserError(f"onnx2pytorch cannot convert the file ({type(exc).__name__}: {str(exc)[:200]})") from exc
    for name, module in list(model.named_children()):
        if getattr(module, "op_name", None) in ("sin", "cos"):
            setattr(model, name, BypassableWave(module.op_name))
    return model
