"""An exported Phase II file (``.zip`` or ``.onnx``) as a model ``evaluate`` can attack.

The zip's model is built from its ``model.json`` and ``weights.pth`` by this project's own copy
of the template its ``model.py`` is (:func:`phase2.model_zip.load_zip_model`: the zip's code never
runs in this process, and a zip whose ``model.py`` is another file is refused); the ONNX file is
converted back to PyTorch by ``onnx2pytorch``, as the organizers convert ONNX submissions
(:func:`phase2.onnx_file.convert_to_torch`). Either way the file's own GCM stays in the graph and
carries the ``is_gcm`` / ``bpda`` switch that :func:`gcm.bpda` flips for the adaptive rows. A
file whose stem's budget JSON records another sha256 is refused (it is not the file export
checked), and so is every malformed file, in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from phase2 import model_zip, onnx_file
from phase2.export import recorded_file_problem


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


def load_phase2_file(path: str | Path) -> FileModel:
    """The model of an exported ``.zip`` or ``.onnx`` file, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval.file: no such file: {path}")
    if path.suffix not in (".zip", ".onnx"):
        raise UserError(f"eval.file: {path} is neither a .zip nor an .onnx file")
    _, problem = recorded_file_problem(path)
    if problem:
        raise UserError(f"eval.file: {problem}")
    try:
        model, meta = load_zip(path) if path.suffix == ".zip" else load_onnx(path)
    except UserError as exc:
        raise UserError(f"eval.file: {exc}") from None
    return FileModel(model, meta, path).eval()


def load_zip(path: Path) -> tuple[nn.Module, dict]:
    model, spec = model_zip.load_zip_model(path)
    meta = {k: spec[k] for k in ("channel_order", "image_size", "num_classes", "gcm", "random_pad")}
    return model, {**meta, "format": "zip"}


def load_onnx(path: Path) -> tuple[nn.Module, dict]:
    proto = onnx_file.load_onnx(path)
    meta = onnx_file.read_file_metadata(proto, str(path))
    return onnx_file.convert_to_torch(proto), {**meta, "format": "onnx (converted by onnx2pytorch)"}
