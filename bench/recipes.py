"""Section ``recipes`` (opt-in): the corruption-robust training options, per optimizer step, against plain PGD-AT.

Plain PGD-AT is ``train.adv.mode=pgd`` with 3 steps (``configs/robust.yaml``'s attack); each row
adds one option on top of it and times ``train_one_epoch`` on the same augmented batches held in
memory, so the ratio holds what the option adds on the training device (its augmentations, a
second attacked view) and not the loader. The scale follows the overrides: ``./run.sh bench --only
recipes model.name=convnext_tiny data.image_size=224 train.batch_size=16 --train-steps 3`` gives
the challenge's scale.
"""

from __future__ import annotations

from bench.measure import BenchContext, Row, median_rate, ratio_of
from bench.training import time_step_variants

PLAIN_PGD_AT = ["train.adv.mode=pgd", "train.adv.steps=3"]

# Each option's overrides on top of plain PGD-AT (train/batch_augment.py, train/adversarial.py).
RECIPE_OPTIONS = {
    "aug.prime (one view)": ["aug.prime.enabled=true"],
    "aug.fourier (one view)": ["aug.fourier.enabled=true"],
    "aug.prime + aug.fourier (one view)": ["aug.prime.enabled=true", "aug.fourier.enabled=true"],
    "aug.prime, aug.views=2, train.adv.consistency=1 (DAJAT-like)": [
        "aug.prime.enabled=true",
        "aug.views=2",
        "train.adv.consistency=1",
    ],
    "aug.fourier, aug.views=2 (AFA's auxiliary view)": ["aug.fourier.enabled=true", "aug.views=2"],
    "train.adv.eps=4/255": ["train.adv.eps=0.01568627"],
}


def bench_recipes(ctx: BenchContext) -> None:
    """One row per option: its time per optimizer step over plain PGD-AT's, on the same batches."""
    steps = ctx.settings.train_steps
    r = time_step_variants(ctx, PLAIN_PGD_AT, RECIPE_OPTIONS)
    cfg = ctx.config()
    scale = f"{cfg.model.name} at {cfg.data.image_size} px, batch {cfg.train.batch_size}, {steps} optimizer steps"
    for label in RECIPE_OPTIONS:
        ctx.rows.append(
            Row(
                "recipes",
                f"PGD-AT + {label} step / PGD-AT step (time)",
                ratio_of(r, "base", label),  # samples/s of plain PGD-AT over the option's: its cost per step
                f"{median_rate(r[label])} vs {median_rate(r['base'])} samples/s; {scale}",
            )
        )
