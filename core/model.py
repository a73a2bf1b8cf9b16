"""Model factory: a timm ConvNeXt behind an input-normalization layer.

Every model in this project takes images in [0, 1]. Normalization lives inside the model (as
buffers saved with the weights) so that defenses like GCM and attacks with eps in pixel units
see the raw image, exactly as the challenge's Phase II model interface does.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from core.config import ModelConfig
from core.errors import UserError


def import_timm_without_wandb():
    """``import timm``, keeping wandb out: ``timm.utils.summary`` imports wandb when it is installed
    (0.6-1 s) for a logging helper this project never calls, and wandb is for tracked runs only.

    While timm loads, ``import wandb`` fails (timm catches the ImportError); afterwards it works
    again. The stages import timm through this module first (tests/test_startup.py checks them).
    """
    if "timm" in sys.modules or "wandb" in sys.modules:
        return importlib.import_module("timm")
    sys.modules["wandb"] = None  # type: ignore[assignment]  # None in sys.modules: ImportError
    try:
        return importlib.import_module("timm")
    finally:
        if "wandb" in sys.modules and sys.modules["wandb"] is None:
            del sys.modules["wandb"]


timm = import_timm_without_wandb()


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; identity when ``mean``/``std`` are None."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.enabled = mean is not None
        mean = mean if mean is not None else (0.0, 0.0, 0.0)
        std = std if std is not None else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}" if self.enabled else "off"


class ImageClassifier(nn.Module):
    """Normalize -> timm backbone. Input: float images in [0, 1], output: logits."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def resolve_mean_std(cfg: ModelConfig, backbone: nn.Module) -> tuple[list[float] | None, list[float] | None]:
    """Mean/std the model normalizes with: explicit config, else timm's pretrained config, else none."""
    if not cfg.normalize:
        return None, None
    if cfg.mean and cfg.std:
        return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]
    data_cfg = timm.data.resolve_model_data_config(backbone)
    return [float(v) for v in data_cfg["mean"]], [float(v) for v in data_cfg["std"]]


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_file: str = "",
    drop_path_rate: float = 0.0,
    stem: str = "patch",
) -> nn.Module:
    """Create a timm model; pretrained weights come from the hub or a local file.

    A local file goes through ``pretrained_cfg_overlay`` so timm re-initialises a head of a
    different class count (``checkpoint_path=`` would fail on the mismatch). ``stem`` is
    timm ConvNeXt's ``stem_type`` ("patch", its default, is passed to no model).
    """
    kwargs: dict = {"num_classes": num_classes, "drop_path_rate": drop_path_rate}
    if stem != "patch":
        kwargs["stem_type"] = stem
    if pretrained_file:
        path = Path(pretrained_file)
        if not path.is_file():
            raise UserError(f"model.pretrained_file: no such file: {path}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
        pretrained = True
    if stem != "patch" and "convnext" not in name:
        # Other timm models may take a stem_type of their own and ignore an unknown one silently.
        raise UserError(f"model.stem={stem}: '{name}' has no such stem (ConvNeXt models only)")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "loading state_dict" in str(exc):
            raise UserError(pretrained_mismatch(str(exc), name, stem, pretrained_file)) from None
        # timm raises RuntimeError for an unknown architecture name.
        if "Unknown model" in str(exc):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            raise UserError(
                f"model.name: unknown timm model '{name}' (e.g. {', '.join(close) or 'convnext_tiny'})"
            ) from None
        raise
    except (OSError, ValueError) as exc:
        if pretrained and not pretrained_file:
            raise UserError(
                f"model.pretrained: could not fetch weights for '{name}' from the hub ({type(exc).__name__}); "
                "offline? set model.pretrained_file=PATH or model.pretrained=false"
            ) from None
        raise


def pretrained_mismatch(message: str, name: str, stem: str, pretrained_file: str) -> str:
    """One line for pretrained weights that do not fit the model: the first keys torch names.

    A different class count never gets here (timm re-initialises the head); a different stem
    does: timm's pretrained ConvNeXts have the 4x4 patch stem, so ``model.stem=overlap`` needs
    weights trained with that stem, or no pretrained weights.
    """
    keys = re.findall(
        r"(?:size mismatch for |Missing key\(s\) in state_dict: |Unexpected key\(s\) in state_dict: )\"?([\w.]+)",
        message,
    )
    source = f"model.pretrained_file {pretrained_file}" if pretrained_file else "model.pretrained"
    hint = (
        f"; timm's pretrained weights have the patch stem, model.stem={stem} needs weights trained with it "
        "(or model.pretrained=false)"
        if stem != "patch" and any(k.startswith("stem") for k in keys)
        else ""
    )
    shown = ", ".join(dict.fromkeys(keys)) if keys else message.splitlines()[-1].strip()[:200]
    return f"{source}: the weights do not fit {name} (model.stem={stem}): {shown}{hint}"


def create_classifier(cfg: ModelConfig, num_classes: int) -> ImageClassifier:
    """Build the trainable model described by ``cfg``."""
    backbone = create_backbone(
        cfg.name, num_classes, cfg.pretrained, cfg.pretrained_file, cfg.drop_path_rate, stem=cfg.stem
    )
    mean, std = resolve_mean_std(cfg, backbone)
    return ImageClassifier(backbone, mean, std)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
