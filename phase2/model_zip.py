"""The Phase II zip: ``model.py`` (plain torch, no timm) + ``model.json`` + ``weights.pth``.

The organizers unpack it with ``shutil.unpack_archive`` and load it with ``sys.path.append(dir);
from model import Model; Model().float()``, in an environment with torch 1.5 and no timm. So
``model.py`` is the template :mod:`phase2.model_template` (one readable file, copied as is), the
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
import math
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from core.config import Config
from core.errors import UserError, echo
from core.io import parse_json
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


# --- reading a zip without running it ----------------------------------------------------------

# A Phase II zip holds < 120 MB of weights (30M float32 parameters); anything near this is a bomb.
MAX_UNPACKED_BYTES = 1 << 30
MAX_MEMBERS = 10_000
MAX_TEXT_BYTES = 1 << 20  # model.py, model.json


def open_zip(path: Path) -> zipfile.ZipFile:
    """The zip at ``path``, its declared sizes checked before anything is unpacked.

    Raises:
        UserError: not a zip, or members that unpack to more than :data:`MAX_UNPACKED_BYTES`.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a zip file ({exc})") from None
    problem = unpacked_size_problem(zf.infolist())
    if problem:
        zf.close()
        raise UserError(f"{path}: {problem}")
    return zf


def unpacked_size_problem(infos: Sequence[zipfile.ZipInfo]) -> str | None:
    """Why a zip with these members is not unpacked (None if it may be): zipfile never yields more
    than a member's declared size, so the declared sizes bound what unpacking writes."""
    total = sum(i.file_size for i in infos)
    if len(infos) > MAX_MEMBERS or total > MAX_UNPACKED_BYTES:
        return (
            f"its {len(infos)} members unpack to {total / 2**20:.0f} MiB, more than the "
            f"{MAX_UNPACKED_BYTES / 2**20:.0f} MiB (or {MAX_MEMBERS} members) a Phase II zip can need (a zip bomb?); "
            "not unpacked"
        )
    return None


def read_member(zf: zipfile.ZipFile, name: str, path: Path, limit: int) -> bytes | None:
    """The top-level member ``name`` (None if the zip has none), at most ``limit`` bytes."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        return None
    if info.file_size > limit:
        raise UserError(f"{path}: {name} is {info.file_size} bytes, more than {limit}")
    try:
        with zf.open(info) as fh:
            return fh.read(limit + 1)[:limit]
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read {name} from the zip ({type(exc).__name__}: {exc})") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _ints(v, lo: int, hi: int) -> bool:
    return isinstance(v, list) and len(v) == 4 and all(_is_int(d, lo, hi) for d in v)


def _three(v, positive: bool = False) -> bool:
    return (
        v is None or isinstance(v, list) and len(v) == 3 and all(_is_number(x) and (x > 0 or not positive) for x in v)
    )


def _flag(v) -> bool:
    return isinstance(v, bool)


# What the template's Model() reads of model.json, each with its check and what it must be.
SPEC_KEYS = {
    "arch": (lambda v: v == "convnext", "'convnext'"),
    "stem": (lambda v: v in ("patch", "overlap", "overlap_tiered"), "one of patch, overlap, overlap_tiered"),
    "depths": (lambda v: _ints(v, 1, 64), "4 integers 1..64"),
    "dims": (lambda v: _ints(v, 1, 8192), "4 integers 1..8192"),
    "kernel_size": (lambda v: _is_int(v, 1, 31) and v % 2 == 1, "an odd integer 1..31"),
    "mlp_ratio": (lambda v: _is_number(v) and 0 < v <= 16, "a number in (0, 16]"),
    "conv_mlp": (_flag, "true or false"),
    "norm_eps": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "gelu_tanh": (_flag, "true or false"),
    "layer_scale": (_flag, "true or false"),
    "num_classes": (lambda v: _is_int(v, 2, 100_000), "an integer 2..100000"),
    "image_size": (lambda v: _is_int(v, 16, 4096), "an integer 16..4096"),
    "channel_order": (lambda v: v in ("rgb", "bgr"), "rgb or bgr"),
    "mean": (_three, "null or 3 numbers"),
    "std": (lambda v: _three(v, positive=True), "null or 3 positive numbers"),
    "gcm": (_flag, "true or false"),
    "gcm_w": (_is_number, "a number"),
    "gcm_eps": (_is_number, "a number"),
    "random_pad": (_flag, "true or false"),
    "pad_min_ratio": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "pad_max_ratio": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a positive number"),
}


def check_spec(spec, where: str) -> dict:
    """``spec`` if it is a ``model.json`` the template can build; else one line naming the key."""
    if not isinstance(spec, dict):
        raise UserError(f"{where}: model.json is a JSON {type(spec).__name__}, not an object of settings")
    for key, (ok, what) in SPEC_KEYS.items():
        if key not in spec:
            raise UserError(f"{where}: model.json has no '{key}' (not written by ./run.sh export?)")
        if not ok(spec[key]):
            raise UserError(f"{where}: model.json '{key}' must be {what}, got {echo(spec[key])}")
    if spec["stem"] != "patch" and not _is_int(spec.get("stem_mid"), 1, 8192):
        raise UserError(f"{where}: model.json 'stem_mid' must be an integer 1..8192 with stem {spec['stem']}")
    if (spec["mean"] is None) != (spec["std"] is None) or spec["pad_min_ratio"] > spec["pad_max_ratio"]:
        raise UserError(
            f"{where}: model.json needs 'mean' and 'std' both or neither, and pad_min_ratio <= pad_max_ratio"
        )
    return spec


def read_spec(path: Path) -> dict | None:
    """The checked ``model.json`` of the zip at ``path`` (None if it holds none); nothing is unpacked."""
    with open_zip(path) as zf:
        data = read_member(zf, "model.json", path, MAX_TEXT_BYTES)
    if data is None:
        return None
    try:
        spec = parse_json(data)
    except ValueError as exc:
        raise UserError(f"{path}: model.json is not JSON ({exc})") from None
    return check_spec(spec, str(path))


def import_template(here: Path):
    """A fresh instance of this project's own :data:`TEMPLATE` module, reading its files from ``here``."""
    name = f"phase2_template_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(name, TEMPLATE)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    module.HERE = str(here)
    return module


def load_weights(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """``weights.pth`` unpickled as tensors and plain data only (a pickle that calls anything is refused)."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... on a bad file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: weights.pth is not a state dict of tensors ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{path}: weights.pth is not a state dict (names -> tensors)")
    return state


def check_weights_fit(template, spec: dict, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor of ``model.json``'s network in ``weights.pth`` with its shape, built on the meta
    device first (so a model.json of huge dims allocates nothing)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in template.ConvNeXt(spec).state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise UserError(f"{path}: weights.pth has no tensor '{key}', which model.json's network needs")
        if tuple(state[key].shape) != shape:
            raise UserError(
                f"{path}: weights.pth tensor '{key}' has shape {tuple(state[key].shape)}, model.json's network {shape}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{path}: weights.pth holds '{extra[0]}', which model.json's network has no place for")


def load_zip_model(path: str | Path) -> tuple[nn.Module, dict]:
    """The model of a zip ``./run.sh export`` wrote, built in this process without running its code.

    The zip's own ``model.py`` never runs here (``check-submission`` runs it as the organizers do,
    in a separate process): its ``model.json`` and ``weights.pth`` are read with bounded sizes and
    checked, and this project's own copy of the template (the same file, byte for byte) builds the
    model from them. A zip whose ``model.py`` is another file is refused: what it computes could not
    be known without running it.

    Raises:
        UserError: one line naming the zip and the first problem.
    """
    path = Path(path)
    with open_zip(path) as zf:
        texts = {name: read_member(zf, name, path, MAX_TEXT_BYTES) for name in ("model.py", "model.json")}
        weights = read_member(zf, "weights.pth", path, MAX_UNPACKED_BYTES)
    missing = [name for name, data in (*texts.items(), ("weights.pth", weights)) if data is None]
    if missing:
        raise UserError(
            f"{path}: no {', '.join(missing)} at the top level of the zip: not a zip ./run.sh export wrote "
            "(check-submission checks any zip the organizers accept)"
        )
    if texts["model.py"] != TEMPLATE.read_bytes():
        raise UserError(
            f"{path}: its model.py is not the one ./run.sh export writes ({TEMPLATE.name}); its code never runs in "
            "this process (check-submission runs it in a separate one): export again to attack it here"
        )
    try:
        spec = check_spec(parse_json(texts["model.json"]), str(path))
    except ValueError as exc:
        raise UserError(f"{path}: model.json is not JSON ({exc})") from None
    state = load_weights(weights, path)
    with tempfile.TemporaryDirectory(prefix="phase2_zip_") as folder:
        template = import_template(Path(folder))
        check_weights_fit(template, spec, state, path)
        (Path(folder) / "model.json").write_text(json.dumps(spec), encoding="utf-8")
        (Path(folder) / "weights.pth").write_bytes(weights)
        model = template.Model().float().eval()  # reads what it needs in its constructor
    return model, spec


def load_zip_bytes(data: bytes) -> tuple[nn.Module, dict]:
    """:func:`load_zip_model` of zip bytes not yet written to their final place."""
    with tempfile.TemporaryDirectory(prefix="phase2_zip_") as tmp:
        path = Path(tmp) / "model.zip"
        path.write_bytes(data)
        return load_zip_model(path)
