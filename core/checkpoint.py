"""Exported models: weights as safetensors plus a JSON with everything needed to rebuild them.

``runs/<name>/best.safetensors`` + ``best.json`` is what ``submit``, ``evaluate`` and
``export`` load. Loading never unpickles: safetensors only, and the JSON is plain data.

The two files are one unit: the JSON records the sha256 of the weights' bytes. ``train``
republishes ``best`` (weights, then JSON, each by an atomic rename) while other commands may be
reading it, so a reader reads each file's bytes once, hashes the very bytes it loads, and only
accepts a pair whose hashes agree; a pair caught mid-republish is read again.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from core.errors import UserError, echo
from core.io import atomic_write_bytes, atomic_write_text, parse_json, read_json
from core.model import ImageClassifier, create_backbone, timm  # timm as core.model imports it: without wandb

FORMAT_VERSION = 1
# A checkpoint names its network as timm registers it (a name and an optional pretrained tag):
# never a hub or path reference, which would make loading a file someone handed you fetch code.
_PLAIN_ARCH = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)?")
_STEMS = ("patch", "overlap", "overlap_tiered")  # core.config: model.stem
# A pair caught mid-republish (new weights, the JSON not yet renamed: milliseconds) is read again
# for this long before it is called torn; reads that overlap a republish succeed well within it.
_REREAD_PATIENCE = 2.0
_REREAD_SECONDS = 0.02


def export_model(model: ImageClassifier, stem: Path, meta: dict[str, Any]) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` (each atomically) and return the weights path.

    ``meta`` must hold ``arch``, ``num_classes`` and ``image_size``; the mean/std and the
    weights' hash are added here.
    """
    for key in ("arch", "num_classes", "image_size"):
        if key not in meta:
            raise ValueError(f"export meta needs '{key}'")
    weights = Path(f"{stem}.safetensors")
    data = save_safetensors(state_dict_of(model), metadata={"arch": str(meta["arch"])})
    atomic_write_bytes(weights, data)
    norm = model.normalize
    info = {
        "format_version": FORMAT_VERSION,
        **meta,
        "normalize": bool(norm.enabled),
        "mean": norm.mean.flatten().tolist() if norm.enabled else None,
        "std": norm.std.flatten().tolist() if norm.enabled else None,
        "weights_file": weights.name,
        "sha256": hashlib.sha256(data).hexdigest(),  # of the bytes written, not re-read from the path
    }
    atomic_write_text(Path(f"{stem}.json"), json.dumps(info, indent=2, sort_keys=False) + "\n")
    return weights


def resolve_checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """Find the (weights, json) pair for a run folder, a stem, a ``.safetensors`` or a ``.json``."""
    p = Path(path)
    if p.is_dir():
        p = p / "best"
    if p.suffix in {".safetensors", ".json"}:
        p = p.with_suffix("")
    weights, info = Path(f"{p}.safetensors"), Path(f"{p}.json")
    for f in (weights, info):
        if not f.is_file():
            raise UserError(f"checkpoint not found: {f} (train first, or set submit.checkpoints)")
    return weights, info


def read_checkpoint_info(info_path: Path, text: str | None = None) -> dict[str, Any]:
    """The checkpoint JSON at ``info_path`` (or its ``text``, already read), checked key by key."""
    try:
        info = read_json(info_path) if text is None else parse_json(text)
    except ValueError as exc:
        raise UserError(f"{info_path}: not a valid checkpoint JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"{info_path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_path}: not a checkpoint JSON (expected an object)")
    for key, kind in (("arch", str), ("num_classes", int), ("image_size", int)):
        if key not in info:
            raise UserError(f"{info_path}: checkpoint JSON lacks '{key}'")
        value = info[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise UserError(
                f"{info_path}: checkpoint JSON '{key}' is {echo(value)}, not a "
                f"{'positive integer' if kind is int else 'string'}"
            )
    check_checkpoint_arch(info, info_path)
    for key in ("mean", "std"):
        value = info.get(key)
        if value is not None and not (
            isinstance(value, list) and len(value) == 3 and all(type(v) in (int, float) for v in value)
        ):
            raise UserError(f"{info_path}: checkpoint JSON '{key}' is {echo(value)}, not null or 3 numbers")
    return info


def check_checkpoint_arch(info: dict[str, Any], info_path: Path) -> None:
    """The network a checkpoint names must be a plain timm model of this timm, with a known stem."""
    arch = info["arch"]
    if not _PLAIN_ARCH.fullmatch(arch):
        raise UserError(
            f"{info_path}: checkpoint JSON 'arch' is {echo(arch)}: not a plain timm model name (a hub or path "
            "reference would make loading this file fetch code or weights)"
        )
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:3]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise UserError(f"{info_path}: checkpoint JSON 'arch' {arch!r} is not a model of timm {timm.__version__}{hint}")
    stem = info.get("stem", "patch")
    if stem not in _STEMS:
        raise UserError(f"{info_path}: checkpoint JSON 'stem' is {echo(stem)}, not one of {', '.join(_STEMS)}")


def read_checkpoint(weights: Path, info_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(info, state)`` of one consistent pair: the JSON and the weights whose sha256 it records.

    Each file is read once and the weights are loaded from the very bytes that were hashed, so the
    info always describes the weights returned. A pair caught while ``train`` republishes it
    (new weights, old JSON) is read again until it agrees; a pair still inconsistent after
    ``_REREAD_PATIENCE`` seconds is torn or swapped, and refused.
    """
    deadline = time.monotonic() + _REREAD_PATIENCE
    while True:
        info = read_checkpoint_info(info_path, _read_text(info_path))
        data = _read_bytes(weights)
        if not info.get("sha256") or info["sha256"] == hashlib.sha256(data).hexdigest():
            return info, _load_state(weights, data)
        if time.monotonic() > deadline:
            break
        time.sleep(_REREAD_SECONDS)
    raise UserError(f"{weights}: contents do not match the sha256 in {info_path.name} (file changed or torn)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a valid checkpoint JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _load_state(weights: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: cannot read safetensors ({exc})") from None


def load_model(path: str | Path, num_classes: int | None = None) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild an exported model in eval mode; returns ``(model, info)`` (see :func:`read_checkpoint`).

    Args:
        path: run folder, stem, ``.safetensors`` or ``.json`` of an exported model.
        num_classes: when given, a checkpoint with another class count is an error.
    """
    weights, info_path = resolve_checkpoint_files(path)
    info, state = read_checkpoint(weights, info_path)
    if num_classes is not None and int(info["num_classes"]) != num_classes:
        raise UserError(
            f"{weights}: checkpoint has {info['num_classes']} classes but data.num_classes is {num_classes}"
        )
    backbone = create_backbone(str(info["arch"]), int(info["num_classes"]), stem=str(info.get("stem", "patch")))
    model = ImageClassifier(backbone, info.get("mean"), info.get("std"))
    problem = state_mismatch(state, model.state_dict())
    if problem:
        raise UserError(f"{weights}: weights do not fit {info['arch']} with {info['num_classes']} classes: {problem}")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, info


def state_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first difference between a file's tensors and a model's, named, or None."""
    for key, tensor in expected.items():
        if key not in state:
            missing = sum(k not in state for k in expected)
            return f"the file lacks tensor '{key}' (shape {tuple(tensor.shape)}; {missing} missing in all)"
        if state[key].shape != tensor.shape:
            return (
                f"tensor '{key}' has shape {tuple(state[key].shape)} in the file, the model's is {tuple(tensor.shape)}"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        return f"the file has tensor '{extra[0]}' that the model lacks ({len(extra)} such)"
    return None


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU float32 copy of a state dict in the standard (contiguous) layout: what safetensors
    writes, and what every file of ours holds.

    A ``channels_last`` model (``model.channels_last``, on by default on a GPU) has NHWC
    convolution weights; ``.clone()`` keeps that layout and safetensors refuses the tensor
    ("non contiguous"), so the copy asks for the contiguous format explicitly.
    """
    return {
        k: v.detach().to("cpu", torch.float32, memory_format=torch.contiguous_format, copy=True)
        for k, v in model.state_dict().items()
    }
