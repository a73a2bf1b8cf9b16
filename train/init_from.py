"""``train.init_from``: start a run from another run's exported weights (two-stage training).

A run that starts fresh (no checkpoint to resume) loads ``train.init_from`` (a run folder or a
checkpoint stem, as ``submit`` and ``export`` take: ``runs/X/best``) into its model and its EMA,
with the optimizer, scheduler and epoch count of its own config: "clean for N epochs, then
PGD-AT for M" is two ``./run.sh train`` commands. Once the new run has checkpoints, ``resume``
continues it and ``init_from`` is not read again.

The file must describe the network this config builds (``model.name``, ``model.stem``,
``data.num_classes``); ``data.image_size`` may differ (ConvNeXt takes any multiple of its
stride): a low-resolution first stage is how a resolution schedule is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.checkpoint import read_checkpoint, resolve_checkpoint_files, state_mismatch
from core.config import Config
from core.errors import UserError


def read_init_weights(cfg: Config) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """``(info, state, weights path)`` of ``train.init_from``, checked against this config's network."""
    try:
        weights, info_path = resolve_checkpoint_files(cfg.train.init_from)
    except UserError:
        raise UserError(
            f"train.init_from={cfg.train.init_from}: no exported model there (expected <stem>.safetensors "
            "and <stem>.json, e.g. runs/NAME/best)"
        ) from None
    info, state = read_checkpoint(weights, info_path)
    for key, file_key, want in (
        ("model.name", "arch", cfg.model.name),
        ("model.stem", "stem", cfg.model.stem),
        ("data.num_classes", "num_classes", cfg.data.num_classes),
    ):
        have = info.get(file_key, "patch" if file_key == "stem" else None)
        if have != want:
            raise UserError(
                f"train.init_from: {info_path} holds {file_key}={have}, this config has {key}={want}; "
                f"set {key}={have} or start from a checkpoint of this network"
            )
    return info, state, weights


def apply_init_from(model: torch.nn.Module, ema, cfg: Config) -> str:
    """Load ``train.init_from`` into ``model`` (unwrapped) and reset ``ema`` to the same weights;
    returns the line that says so."""
    info, state, weights = read_init_weights(cfg)
    problem = state_mismatch(state, model.state_dict())
    if problem:
        raise UserError(f"train.init_from: {weights} does not fit {cfg.model.name}: {problem}")
    model.load_state_dict(state, strict=True)
    if ema is not None:
        ema.module.load_state_dict(state, strict=True)
    was = f"{info.get('weights', 'model')} weights of epoch {info.get('epoch', '?')}"
    size = f", trained at {info['image_size']} px" if info["image_size"] != cfg.data.image_size else ""
    return f"init_from: {weights} ({was}{size}); fresh optimizer and schedule"
