"""Output temperature of the defended model, tuned on the validation split (never on test labels).

The stack divides every member's logits by ``submit.temperature`` after GCM and before the
aggregation (:mod:`infer.defended`), so a temperature below 1 sharpens the output and one above 1
softens it, with GCM or without. Where it changes anything:

* one model (Phase II's single file): never its prediction (``argmax`` of ``logits / T`` is
  ``argmax`` of the logits for every T > 0), only its confidence: the log-probabilities an
  attacker's loss climbs. A small T saturates the softmax: the probabilities of all but the top
  class underflow, the output's log (clamped at 1e-12 under ``aggregate=prob``) goes flat, and
  every gradient of it vanishes, AutoAttack's scale-free DLR loss included (RESULTS.md, issue 38:
  47% under AutoAttack at T = 0.001 against 24% at T = 1, the same model). That is gradient
  masking, like the 5th-place team's ``softmax(logits * 10000)``: an attack on the logits, or a
  transfer from the same weights at T = 1, is not slowed by it, so the T = 1 figure is the real one.
* an ensemble averaging probabilities (``submit.aggregate=prob``): the weight each member's vote
  carries, so the prediction itself. ``aggregate=logit`` divides the mean logit: no change.

:func:`tune_temperature` picks the temperature of a grid by the stack's validation accuracy, ties
broken by the lower validation cross-entropy (the calibrated temperature, Guo et al. 2017), so on
one model it picks the calibrated one, never a sharpening that only masks gradients.

``python -m infer.temperature [--config F] [key=value ...]`` prints the table for the stack ``submit``
would build (``submit.checkpoints``, TTA, GCM, ``submit.aggregate``) over ``ablation.temperatures``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config
from core.datasets import ImageDataset
from core.errors import UserError
from core.images import to_float_images
from core.labels import resolve_samples
from core.transforms import create_eval_transform
from infer.defended import build_defended_model, input_size_of, load_members, resolve_member_paths


def validation_images(cfg: Config, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split ``train`` holds out (``data.*``), as float images in [0, 1] and labels."""
    _, samples = resolve_samples(cfg.data)
    if not samples:
        raise UserError("temperature tuning needs a validation split (data.val_fraction > 0, or data.val_labels)")
    dataset = ImageDataset(samples, create_eval_transform(image_size), bad_images=cfg.data.bad_images)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return to_float_images(torch.stack([torch.as_tensor(x) for x in images])), torch.as_tensor(labels)


def with_temperature(cfg: Config, temperature: float) -> Config:
    return dataclasses.replace(cfg, submit=dataclasses.replace(cfg.submit, temperature=float(temperature)))


@torch.inference_mode()
def stack_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """Accuracy (%) and mean cross-entropy of a log-probability model on ``x``."""
    device = next(model.parameters()).device
    outs = torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    return {
        "acc": 100.0 * float((outs.argmax(1) == y).float().mean()),
        "nll": float(-outs.gather(1, y.view(-1, 1)).mean()),
    }


def tune_temperature(
    members: Sequence[nn.Module],
    infos: Sequence[dict],
    cfg: Config,
    grid: Sequence[float],
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict:
    """The temperature of ``grid`` whose stack (``cfg``'s: members, TTA, GCM) scores best on the
    validation images ``x``, ``y``: highest accuracy, then lowest cross-entropy. Returns
    ``{"temperature": T, "table": [{"temperature", "acc", "nll"}, ...]}``."""
    if not grid:
        raise UserError("temperature tuning needs a grid of temperatures (each > 0)")
    table = []
    for t in grid:
        model = build_defended_model(members, infos, with_temperature(cfg, t))
        table.append({"temperature": float(t), **stack_scores(model, x, y, cfg.submit.batch_size)})
    best = max(table, key=lambda r: (round(r["acc"], 9), -r["nll"]))
    return {"temperature": best["temperature"], "table": table}


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    parser = create_parser("python -m infer.temperature", "Tune the output temperature on the validation split.")
    cfg = parse_config(parser.parse_args(argv))
    members, infos = load_members(resolve_member_paths(cfg), cfg.data.num_classes)
    x, y = validation_images(cfg, input_size_of(infos))
    result = tune_temperature(members, infos, cfg, cfg.ablation.temperatures, x, y)
    print(
        f"{len(members)} member(s), aggregate={cfg.submit.aggregate}, gcm={cfg.gcm.enabled}, {len(y)} validation images"
    )
    for row in result["table"]:
        print(f"  T={row['temperature']:g}: accuracy {row['acc']:.1f}%, cross-entropy {row['nll']:.3f}")
    print(f"picked T={result['temperature']:g}: set submit.temperature={result['temperature']:g}")
    return result


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
