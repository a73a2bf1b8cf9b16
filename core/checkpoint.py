"""Exported models: weights as safetensors plus a JSON with everything needed to rebuild them.

``runs/<name>/best.safetensors`` + ``best.json`` is what ``submit``, ``evaluate`` and
``export`` load. Loading never unpickles: safetensors only, and the JSON is plain data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import UserError
from core.io import atomic_path, atomic_write_text
from core.model import ImageClassifier, create_backbone

FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(model: ImageClassifier, stem: Path, meta: dict[str, Any]) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` (each atomically) and return the weights path.

    ``meta`` must hold ``arch``, ``num_classes`` and ``image_size``; the mean/std and the
    weights' hash are added here.
    """
    for key in ("arch", "num_classes", "image_size"):
        if key not in meta:
            raise ValueError(f"export meta needs '{key}'")
    weights = Path(f"{stem}.safetensors")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"arch": str(meta["arch"])})
    norm = model.normalize
    info = {
        "format_version": FORMAT_VERSION,
        **meta,
        "normalize": bool(norm.enabled),
        "mean": norm.mean.flatten().tolist() if norm.enabled else None,
        "std": norm.std.flatten().tolist() if norm.enabled else None,
        "weights_file": weights.name,
        "sha256": file_sha256(weights),
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


def read_checkpoint_info(info_path: Path) -> dict[str, Any]:
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{info_path}: not a valid checkpoint JSON ({exc})") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_path}: not a checkpoint JSON (expected an object)")
    for key, kind in (("arch", str), ("num_classes", int), ("image_size", int)):
        if key not in info:
            raise UserError(f"{info_path}: checkpoint JSON lacks '{key}'")
        value = info[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise UserError(
                f"{info_path}: checkpoint JSON '{key}' is {value!r}, not a "
                f"{'positive integer' if kind is int else 'string'}"
            )
    return info


def load_model(path: str | Path, num_classes: int | None = None) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild an exported model in eval mode; returns ``(model, info)``.

    Args:
        path: run folder, stem, ``.safetensors`` or ``.json`` of an exported model.
        num_classes: when given, a checkpoint with another class count is an error.
    """
    weights, info_path = resolve_checkpoint_files(path)
    info = read_checkpoint_info(info_path)
    if num_classes is not None and int(info["num_classes"]) != num_classes:
        raise UserError(
            f"{weights}: checkpoint has {info['num_classes']} classes but data.num_classes is {num_classes}"
        )
    if info.get("sha256") and info["sha256"] != file_sha256(weights):
        raise UserError(f"{weights}: contents do not match the sha256 in {info_path.name} (file changed or torn)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights}: cannot read safetensors ({exc})") from None
    backbone = create_backbone(str(info["arch"]), int(info["num_classes"]), stem=str(info.get("stem", "patch")))
    model = ImageClassifier(backbone, info.get("mean"), info.get("std"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(
            f"{weights}: weights do not fit {info['arch']} with {info['num_classes']} classes ({first})"
        ) from None
    model.eval()
    return model, info


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU float32 copy of a state dict (for comparisons and exports)."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
