"""An exported Phase II file (``.zip`` or ``.onnx``) as a model ``evaluate`` can attack.

The zip is loaded as the organizers load it (its own ``model.py``: :func:`infer.model_zip.load_zip_model`);
the ONNX file is converted back to PyTorch by ``onnx2pytorch``, as the organizers convert ONNX
submissions (:func:`infer.onnx_file.convert_to_torch`). Either way the file's own GCM stays in
the graph and carries the ``is_gcm`` / ``bpda`` switch that :func:`gcm.bpda` flips for the
adaptive rows.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from core.errors import UserError
from infer import model_zip, onnx_file


class FileModel(nn.Module):
    """RGB images in [0, 1] -> the file's log-probabilities, the file fed in its own channel order.

    Exposes what ``robust.runner`` asks of a model: ``randomized`` (the file's random pad) and
    ``reseed`` (the file draws from torch's global RNG, so reseeding seeds that).
    """

    def __init__(self, file_model: nn.Module, meta: dict, path: Path) -> None:
        super().__init__()
        self.file_model = file_model
        self.meta = meta
        self.path = path
        self.bgr = meta["channel_order"] == "bgr"
        self.randomized = bool(meta["random_pad"])

    def reseed(self, seed: int) -> None:
        if self.randomized:
            torch.manual_seed(int(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.file_model(x.flip(1) if self.bgr else x)


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value) == "True"


def load_phase2_file(path: str | Path) -> FileModel:
    """The model of an exported ``.zip`` or ``.onnx`` file, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval.file: no such file: {path}")
    if path.suffix == ".zip":
        model, spec = model_zip.load_zip_model(path)
        meta = {k: spec[k] for k in ("channel_order", "image_size", "num_classes", "gcm", "random_pad")}
        meta["format"] = "zip"
    elif path.suffix == ".onnx":
        proto = onnx.load(str(path))
        raw = onnx_file.read_metadata(proto)
        if "channel_order" not in raw:
            raise UserError(f"eval.file: {path} was not written by ./run.sh export (no channel_order in its metadata)")
        model = onnx_file.convert_to_torch(proto)
        meta = {
            "channel_order": raw["channel_order"],
            "image_size": int(raw["image_size"]),
            "num_classes": int(raw["num_classes"]),
            "gcm": _as_bool(raw["gcm"]),
            "random_pad": _as_bool(raw["random_pad"]),
            "format": "onnx (converted by onnx2pytorch)",
        }
    else:
        raise UserError(f"eval.file: {path} is neither a .zip nor an .onnx file")
    return FileModel(model, meta, path).eval()
