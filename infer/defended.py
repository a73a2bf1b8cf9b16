"""The defended model, built in one place for submit, evaluate, export and bench.

Input: a float batch in [0, 1] (N, 3, H, W). Pipeline::

    GCM (float32) -> random resize-pad (optional) -> for each member: resize to its input
    size -> TTA views batched into one forward -> temperature -> aggregation over views and
    members (mean probability or mean logit, member weights)

Output: log-probabilities, so ``argmax`` is the prediction, ``exp`` gives the probabilities the
Phase II interface asks for, and cross-entropy attacks work on it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import load_model
from core.config import Config
from gcm import DefendedModel, GradientConcealment, RandomResizePad


@dataclass(frozen=True)
class View:
    """One test-time view: resize by ``scale`` (then center crop / zero-pad back), optional flip."""

    scale: float = 1.0
    hflip: bool = False

    def __str__(self) -> str:
        return f"scale{self.scale:g}" + ("+hflip" if self.hflip else "")


def resolve_views(scales: Sequence[float], hflip: bool) -> list[View]:
    views = [View(float(s), False) for s in scales]
    if hflip:
        views += [View(float(s), True) for s in scales]
    return views


def resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def apply_view(x: torch.Tensor, scale: float, hflip: bool) -> torch.Tensor:
    """Zoom by ``scale`` around the center keeping the spatial size (crop if > 1, zero-pad if < 1)."""
    if scale != 1.0:
        h, w = x.shape[-2:]
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        z = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        if scale > 1.0:
            top, left = (nh - h) // 2, (nw - w) // 2
            x = z[..., top : top + h, left : left + w]
        else:
            top, left = (h - nh) // 2, (w - nw) // 2
            x = F.pad(z, (left, w - nw - left, top, h - nh - top))
    return x.flip(-1) if hflip else x


class EnsembleTTA(nn.Module):
    """Members x views -> aggregated log-probabilities.

    All views of one member go through a single forward (batched along the batch axis), so
    k views cost about one k-times-larger batch rather than k separate calls.
    """

    has_bpda = True  # its output temperature has a stand-in for the adaptive attacker (gcm.bpda_modules)

    def __init__(
        self,
        members: Sequence[nn.Module],
        image_sizes: Sequence[int],
        views: Sequence[View],
        weights: Sequence[float] | None = None,
        aggregate: str = "prob",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if aggregate not in ("prob", "logit"):
            raise ValueError(f"aggregate must be 'prob' or 'logit', not {aggregate!r}")
        self.members = nn.ModuleList(members)
        self.image_sizes = [int(s) for s in image_sizes]
        self.views = list(views) or [View()]
        w = [float(v) for v in (weights or [1.0] * len(members))]
        total = sum(w)
        self.weights = [v / total for v in w]
        self.aggregate = aggregate
        self.temperature = float(temperature)
        self.bpda = False  # switched by gcm.bpda / gcm.set_bpda for the adaptive attacker

    def member_logits(self, index: int, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Logits of one member for every view, divided by ``temperature``: (views, N, classes), float32."""
        xm = resize_to(x, self.image_sizes[index])
        batch = (
            torch.cat([apply_view(xm, v.scale, v.hflip) for v in self.views])
            if len(self.views) > 1
            else apply_view(xm, self.views[0].scale, self.views[0].hflip)
        )
        logits = self.members[index](batch).float() / temperature
        return logits.view(len(self.views), x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bpda and self.temperature != 1.0:
            # A temperature below 1 saturates the softmax: the gradient vanishes, and an attacker who
            # differentiates it scores the model as robust (RESULTS.md, issue 38). The adaptive
            # attacker's stand-in (BPDA) is the same stack at temperature 1: the forward value is
            # the real one, the gradient the stand-in's.
            with torch.no_grad():
                value = self.combine(x, self.temperature)
            stand_in = self.combine(x, 1.0)
            return value + (stand_in - stand_in.detach())
        return self.combine(x, self.temperature)

    def combine(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Log-probabilities of the stack with the members' logits divided by ``temperature``."""
        combined = None
        for i in range(len(self.members)):
            logits = self.member_logits(i, x, temperature)
            if self.aggregate == "prob":
                part = logits.softmax(-1).mean(0) * self.weights[i]
            else:
                part = logits.mean(0) * self.weights[i]
            combined = part if combined is None else combined + part
        if self.aggregate == "prob":
            return combined.clamp_min(1e-12).log()
        return combined.log_softmax(-1)


def load_members(paths: Sequence[str | Path], num_classes: int | None) -> tuple[list[nn.Module], list[dict]]:
    """Load exported checkpoints; every member must predict the same class count."""
    members, infos = [], []
    for path in paths:
        model, info = load_model(path, num_classes)
        members.append(model)
        infos.append(info)
    return members, infos


def resolve_member_paths(cfg: Config) -> list[str]:
    """``submit.checkpoints``, or the best model that ``./run.sh train`` wrote for this config."""
    return list(cfg.submit.checkpoints) or [str(cfg.run_dir / "best")]


def build_defended_model(
    members: Sequence[nn.Module], infos: Sequence[dict], cfg: Config, defense: bool = True
) -> DefendedModel:
    """The exact model ``submit`` predicts with. ``defense=False`` drops GCM and random pad
    (the undefended reference for evaluation), keeping ensemble and TTA identical."""
    ensemble = EnsembleTTA(
        members,
        [int(info["image_size"]) for info in infos],
        resolve_views(cfg.tta.scales, cfg.tta.hflip),
        weights=cfg.submit.weights or None,
        aggregate=cfg.submit.aggregate,
        temperature=cfg.submit.temperature,
    )
    gcm = GradientConcealment(cfg.gcm.w, cfg.gcm.eps, form=cfg.gcm.form) if defense and cfg.gcm.enabled else None
    pad = None
    if defense and cfg.random_pad.enabled:
        pad = RandomResizePad(cfg.random_pad.min_ratio, cfg.random_pad.max_ratio, seed=cfg.random_pad.seed)
    return DefendedModel(ensemble, gcm=gcm, random_pad=pad).eval()


def input_size_of(infos: Sequence[dict]) -> int:
    """The loader's image size: the largest member's, so no member sees an upscaled image."""
    return max(int(info["image_size"]) for info in infos)


def describe(model: DefendedModel) -> dict:
    """Settings recorded in the submission's meta file."""
    gcm, pad, ens = model.gcm, model.random_pad, model.model
    return {
        "gcm": {"enabled": gcm is not None, **({"w": gcm.w, "eps": gcm.eps} if gcm is not None else {})},
        "random_pad": {
            "enabled": pad is not None,
            **({"min_ratio": pad.min_ratio, "max_ratio": pad.max_ratio, "seed": pad.seed} if pad is not None else {}),
        },
        "tta_views": [str(v) for v in ens.views],
        "members": len(ens.members),
        "member_image_sizes": ens.image_sizes,
        "weights": ens.weights,
        "aggregate": ens.aggregate,
        "temperature": ens.temperature,
    }
