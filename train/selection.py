"""``train.select=score``: ``best`` picked by the Phase-II-like score on the validation split.

The final round scores one model file on images that are mostly clean and corrupted, the rest
attacked white-box with settings drawn per submission. After every epoch this module scores the
weights (and their EMA) on a fixed, seeded part of the validation split (``train.score.images``,
chosen with ``data.split_seed``) three ways, and mixes them by ``train.score.weights``:

* clean accuracy;
* accuracy on ImageNet-C's ``train.score.corruptions`` (default the four held out for validation,
  so the score never rewards training on the test corruptions) at ``train.score.severities``,
  each image corrupted once at the start under :func:`core.imagenet_c.corruption_seed` of its
  path, the cell and ``eval.seed``, as ``evaluate`` corrupts;
* mean accuracy under the first ``train.score.draws`` attacks that ``evaluate eval.file=FILE
  phase2.draws=k`` draws (``phase2.attack`` at ``phase2.seed``: :func:`attacks.draw_attacks`),
  each seeded by its draw, so every epoch meets the same attacks.

The attacks run on the network itself: that is the adaptive attacker's view of the defended
model (BPDA passes the gradient straight through GCM, and GCM's forward moves a pixel by
``gcm.eps``, 1e-8 by default, which changes no prediction). The naive attacker, who
differentiates through GCM, scores the clean accuracy by construction and picks nothing.

Each process scores its own share of the images; the counts are summed through the Accelerator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from attacks import craft_attack, draw_attacks, eval_mode
from core.config import Config
from core.datasets import ImageDataset
from core.imagenet_c import corrupt, corruption_seed
from core.images import to_float_images
from core.labels import select_subset
from core.transforms import create_eval_transform

PARTS = ("clean", "corruption", "attack")


@dataclass
class ScoreSet:
    """This process's share of the scored images, their corrupted copies and the attack draws."""

    x: torch.Tensor  # uint8 N x 3 x H x W
    y: torch.Tensor
    corrupted: torch.Tensor  # uint8 (N * cells) x 3 x H x W
    corrupted_y: torch.Tensor
    draws: list[dict]
    weights: tuple[float, float, float]
    batch_size: int
    total: int  # images over all processes
    setup_seconds: float = 0.0


def create_score_set(cfg: Config, val_samples: list[tuple[Path, int]], process: int = 0, processes: int = 1):
    """The :class:`ScoreSet` of ``train.score`` for process ``process`` of ``processes``; None
    unless ``train.select=score`` and there is a validation split."""
    t = cfg.train
    if t.select != "score" or not val_samples:
        return None
    start = time.perf_counter()
    chosen = [val_samples[i] for i in select_subset(len(val_samples), t.score.images, cfg.data.split_seed)]
    mine = chosen[process::processes]
    images = ImageDataset(mine, create_eval_transform(cfg.data.image_size), bad_images=cfg.data.bad_images)
    x = torch.stack([images[i][0] for i in range(len(images))]) if len(images) else torch.zeros(0, 3, 1, 1)
    y = torch.tensor([label for _, label in mine], dtype=torch.long)
    corrupted, corrupted_y = corrupt_images(x, y, [str(p) for p, _ in mine], cfg)
    return ScoreSet(
        x,
        y,
        corrupted,
        corrupted_y,
        draws_of(cfg),
        tuple(float(w) for w in t.score.weights),
        t.batch_size,
        len(chosen),
        time.perf_counter() - start,
    )


def draws_of(cfg: Config) -> list[dict]:
    """The first ``train.score.draws`` of the Phase-II-like score's attacks."""
    return draw_attacks(cfg.phase2.seed, cfg.phase2.attack, cfg.train.score.draws)


def corrupt_images(x: torch.Tensor, y: torch.Tensor, keys: list[str], cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image through every (corruption, severity) cell of ``train.score``, once."""
    s = cfg.train.score
    cells = [(name, int(sev)) for name in s.corruptions for sev in s.severities]
    if not cells or not len(x):
        return x[:0], y[:0]
    hwc = x.permute(0, 2, 3, 1).contiguous().numpy()
    out = [
        torch.from_numpy(corrupt(image, name, sev, corruption_seed(key, name, sev, cfg.eval.seed))).permute(2, 0, 1)
        for name, sev in cells
        for image, key in zip(hwc, keys)
    ]
    return torch.stack(out), y.repeat(len(cells))


@torch.no_grad()
def count_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(x), batch_size):
        xb = to_float_images(x[i : i + batch_size].to(device))
        correct += (model(xb).argmax(1) == y[i : i + batch_size].to(device)).sum()
    return correct


def count_attacked(model: nn.Module, s: ScoreSet, device, process: int) -> torch.Tensor:
    """Correct predictions under each draw, summed over the draws (each draw seeded by its own seed)."""
    correct = torch.zeros((), dtype=torch.long, device=device)
    for d in s.draws:
        generator = torch.Generator().manual_seed(d["seed"] + process)
        for i in range(0, len(s.x), s.batch_size):
            xb, yb = to_float_images(s.x[i : i + s.batch_size].to(device)), s.y[i : i + s.batch_size].to(device)
            adv = craft_attack(d["kind"], model, xb, yb, d["eps"], d["norm"], d["steps"], generator)
            with torch.no_grad():
                correct += (model(adv).argmax(1) == yb).sum()
    return correct


def measure_score(model: nn.Module, s: ScoreSet, accelerator) -> dict:
    """``{"score", "score_parts", "score_seconds"}`` of ``model`` (the unwrapped network or the EMA's),
    accuracies in %; a part without images (no corruptions, no draws) is left out of the mix."""
    start = time.perf_counter()
    device = accelerator.device
    with eval_mode(model):  # float32: a coarser gradient would be a weaker attack
        counts = torch.stack(
            [
                count_correct(model, s.x, s.y, s.batch_size, device),
                count_correct(model, s.corrupted, s.corrupted_y, s.batch_size, device),
                count_attacked(model, s, device, accelerator.process_index),
            ]
        )
    sizes = torch.tensor([len(s.x), len(s.corrupted), len(s.x) * len(s.draws)], device=device)
    both = torch.stack([counts, sizes])
    if accelerator.num_processes > 1:
        both = accelerator.reduce(both, reduction="sum")
    counts, sizes = both.tolist()
    parts = {name: 100.0 * c / n for name, c, n in zip(PARTS, counts, sizes) if n}
    weights = {name: w for name, w in zip(PARTS, s.weights) if name in parts and w > 0}
    total = sum(weights.values())
    score = sum(parts[name] * w for name, w in weights.items()) / total if total else parts["clean"]
    return {"score": score, "score_parts": parts, "score_seconds": time.perf_counter() - start}


def describe_score_set(s: ScoreSet, cfg: Config) -> str:
    """The start-up line: what the score measures and what setting it up cost."""
    c = cfg.train.score
    cells = len(c.corruptions) * len(c.severities)
    draws = ", ".join(f"{d['kind']} {d['norm']} eps {d['eps']:.3g} x{d['steps']}" for d in s.draws) or "none"
    mix = "/".join(f"{w:g}" for w in s.weights)
    return (
        f"best by the Phase-II-like validation score on {s.total} images: clean, {cells} held-out corruption "
        f"cells, {len(s.draws)} attack draws ({draws}); mix clean/corruption/attack {mix} "
        f"(corrupted once in {s.setup_seconds:.1f}s)"
    )
