"""The Phase II zip: ``model.py`` (plain torch, no timm) + ``model.json`` + ``weights.pth``.

The organizers unpack it with ``shutil.unpack_archive`` and load it with ``sys.path.append(dir);
from model import Model; Model().float()``, in an environment with torch 1.5 and no timm. So
``model.py`` is the template :mod:`infer.model_template` (one readable file, copied as is), the
architecture and defense settings go in ``model.json``, and the weights are the timm backbone's
state dict under the template's module names, saved in the pre-1.6 serialization that torch 1.5
reads (``_use_new_zipfile_serialization=False``).

The template defines its own ConvNeXt; :func:`resolve_spec` reads the architecture off the timm
model (stems ``patch``, ``overlap``, ``overlap_tiered``; LayerNorm; GELU exact or tanh; with or
without the convolutional MLP and layer scale) and refuses anything else with one line.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import torch
from torch import nn

from core.config import Config
from core.errors import UserError
from core.model import ImageClassifier

TEMPLATE = Path(__file__).resolve().parent / "model_template.py"
MEMBERS = ("model.py", "model.json", "weights.pth")


def _unsupported(what: str) -> UserError:
    return UserError(
        f"export: model.py holds timm ConvNeXt models only (stems patch/overlap/overlap_tiered, LayerNorm, GELU); "
        f"this model has {what}; export.formats=[onnx] or [pt2] writes the other files"
    )


def _gelu_tanh(act: nn.Module) -> bool:
    kind = type(act).__name__
    if kind == "GELUTanh" or getattr(act, "approximate", "none") == "tanh":
        return True
    if kind == "GELU" and getattr(act, "approximate", "none") == "none":
        return False
    raise _unsupported(f"activation {kind}")


def resolve_spec(backbone: nn.Module, stem: str) -> dict:
    """The architecture fields of ``model.json``, read off a timm ConvNeXt."""
    if type(backbone).__name__ != "ConvNeXt":
        raise _unsupported(f"architecture {type(backbone).__name__}")
    if not isinstance(backbone.norm_pre, nn.Identity) or type(backbone.head).__name__ != "NormMlpClassifierHead":
        raise _unsupported("the head_norm_first head")
    if not isinstance(backbone.head.pre_logits, nn.Identity):
        raise _unsupported("a hidden layer in the head")
    blocks = [b for s in backbone.stages for b in s.blocks]
    first = blocks[0]
    if any(type(b.mlp).__name__ != "Mlp" for b in blocks):
        raise _unsupported("GlobalResponseNorm (ConvNeXt-V2) MLPs")
    if any(not isinstance(b.shortcut, nn.Identity) or b.conv_dw.dilation != (1, 1) for b in blocks):
        raise _unsupported("dilated or projecting blocks")
    norms = {type(b.norm).__name__ for b in blocks}
    if not norms <= {"LayerNorm", "LayerNorm2d"}:
        raise _unsupported(f"norm layers {sorted(norms)}")
    return {
        "arch": "convnext",
        "stem": stem,
        "stem_mid": int(backbone.stem[0].out_channels) if stem != "patch" else None,
        "depths": [len(s.blocks) for s in backbone.stages],
        "dims": [int(s.blocks[0].conv_dw.out_channels) for s in backbone.stages],
        "kernel_size": int(first.conv_dw.kernel_size[0]),
        "mlp_ratio": first.mlp.fc1.out_features / first.mlp.fc1.in_features
        if isinstance(first.mlp.fc1, nn.Linear)
        else first.mlp.fc1.out_channels / first.mlp.fc1.in_channels,
        "conv_mlp": bool(first.use_conv_mlp),
        "norm_eps": float(first.norm.eps),
        "gelu_tanh": _gelu_tanh(first.mlp.act),
        "layer_scale": first.gamma is not None,
        "num_classes": int(backbone.num_classes),
    }


def create_spec(member: ImageClassifier, info: dict, cfg: Config) -> dict:
    """Everything ``model.json`` holds: architecture, input size, normalization, defenses, output."""
    norm = member.normalize
    return {
        **resolve_spec(member.backbone, str(info.get("stem", "patch"))),
        "image_size": int(info["image_size"]),
        "channel_order": cfg.export.channel_order,
        "mean": norm.mean.flatten().tolist() if norm.enabled else None,
        "std": norm.std.flatten().tolist() if norm.enabled else None,
        "gcm": bool(cfg.gcm.enabled),
        "gcm_w": cfg.gcm.w,
        "gcm_eps": cfg.gcm.eps,
        "random_pad": bool(cfg.random_pad.enabled),
        "pad_min_ratio": cfg.random_pad.min_ratio,
        "pad_max_ratio": cfg.random_pad.max_ratio,
        "temperature": cfg.submit.temperature,
        "output": "log_probabilities",
    }


def legacy_weights(member: ImageClassifier) -> bytes:
    """The backbone's state dict (timm's names are the template's) in torch 1.5's format."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in member.backbone.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def create_zip_bytes(member: ImageClassifier, info: dict, cfg: Config) -> tuple[bytes, dict]:
    """The zip (model.py at its top level) and its spec."""
    spec = create_spec(member, info, cfg)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.py", TEMPLATE.read_text(encoding="utf-8"))
        zf.writestr("model.json", json.dumps(spec, indent=2) + "\n")
        zf.writestr("weights.pth", legacy_weights(member))
    return buffer.getvalue(), spec


def import_model_py(folder: Path):
    """Import ``folder/model.py`` under a fresh module name (several zips may be loaded in one process)."""
    name = f"phase2_model_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(name, folder / "model.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def load_zip_model(path: str | Path) -> tuple[nn.Module, dict]:
    """The zip's ``Model()``, unpacked and built as the organizers do; returns it with its spec.

    Unpacks into a temporary folder that is removed once the weights are loaded (``Model``
    reads everything in its constructor).
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a zip file")
    folder = Path(tempfile.mkdtemp(prefix="phase2_zip_"))
    try:
        shutil.unpack_archive(str(path), str(folder), "zip")
        missing = [m for m in MEMBERS if not (folder / m).is_file()]
        if missing:
            raise UserError(f"{path}: no {', '.join(missing)} at the top level of the zip")
        model = import_model_py(folder).Model().float().eval()
        spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return model, spec


def load_zip_bytes(data: bytes) -> tuple[nn.Module, dict]:
    """:func:`load_zip_model` of zip bytes not yet written to their final place."""
    with tempfile.TemporaryDirectory(prefix="phase2_zip_") as tmp:
        path = Path(tmp) / "model.zip"
        path.write_bytes(data)
        return load_zip_model(path)
