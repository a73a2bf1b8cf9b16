"""``./run.sh train``: fine-tune a timm ConvNeXt with accelerate.

Layout of a run folder (``runs/<name>/``): ``config.yaml`` (resolved), ``best``/``last``
exported models (``.safetensors`` + ``.json``), ``checkpoints/e<epoch>_b<batch>/`` full
training states for ``resume=auto``, ``augmented_samples.png`` and the W&B run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config, save_config
from core.model import count_params
from core.tracking import init_tracking, resolve_wandb_mode
from train.engine import Progress, evaluate, train_one_epoch
from train.setup import Training, build_training, create_accelerator, ensure_demo_data
from train.state import export_models, prepare_run_dir, restore, save_checkpoint


def run(cfg: Config) -> dict:
    """Train as configured; returns the final metrics (also written to ``runs/<name>/``)."""
    mode, reason = resolve_wandb_mode(cfg.wandb.mode, cfg.wandb.timeout)
    accelerator = create_accelerator(cfg, log_with=None if mode == "disabled" else "wandb")
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        prepare_run_dir(cfg.run_dir)
    with accelerator.main_process_first():
        ensure_demo_data(cfg)
    training = build_training(cfg, accelerator)
    progress = Progress()
    restore(training, progress)
    if accelerator.is_main_process:
        save_config(cfg, cfg.run_dir / "config.yaml")
    tracking = init_tracking(accelerator, cfg, mode, reason)
    announce(training)

    metrics: dict = {}
    start = time.perf_counter()
    for epoch in range(progress.epoch, cfg.train.epochs):
        stats = fit_epoch(training, progress, epoch, on_first_batch=sample_grid_hook(training, progress, tracking))
        metrics = validate(training)
        improved = record_epoch(training, progress, epoch, stats, metrics)
        export_models(training, progress, metrics, improved)
        save_checkpoint(training, progress)
        if stopped_early(cfg, progress):
            break
    return finish(training, progress, metrics, time.perf_counter() - start)


def announce(training: Training) -> None:
    cfg, accelerator = training.cfg, training.accelerator
    n_params = count_params(accelerator.unwrap_model(training.model))
    accelerator.print(
        f"train {cfg.model.name} ({n_params / 1e6:.2f}M params) on {training.train_size} images, "
        f"val {training.val_size}, {cfg.data.num_classes} classes, {cfg.data.image_size}px, "
        f"{accelerator.num_processes} process(es) on {accelerator.device} ({torch.get_num_threads()} torch threads "
        f"each), precision {cfg.train.mixed_precision}"
    )


def fit_epoch(
    training: Training, progress: Progress, epoch: int, on_first_batch: Callable[[torch.Tensor], None] | None = None
) -> dict:
    """One epoch from where ``progress`` stands (mid-epoch after a resume), checkpointing every
    ``train.checkpoint_every`` optimizer steps; then ``progress`` points at the next epoch."""
    t, loader = training.cfg.train, training.train_loader
    loader.set_epoch(epoch)
    if progress.batch:
        loader = training.accelerator.skip_first_batches(training.train_loader, progress.batch)
        loader.set_epoch(epoch)

    def on_step() -> None:
        if t.checkpoint_every and progress.global_step % t.checkpoint_every == 0:
            save_checkpoint(training, progress)

    stats = train_one_epoch(training, loader, progress, epoch, on_optimizer_step=on_step, on_first_batch=on_first_batch)
    # When max_steps ends mid-epoch the position is kept so a resume continues from there.
    if not (stopped_early(training.cfg, progress) and progress.batch < len(training.train_loader)):
        progress.epoch, progress.batch = epoch + 1, 0
    return stats


def stopped_early(cfg: Config, progress: Progress) -> bool:
    return bool(cfg.train.max_steps) and progress.global_step >= cfg.train.max_steps


def validate(training: Training) -> dict:
    """Validation accuracy and loss of the model (and of its EMA); NaN without a validation set."""
    if training.val_loader is None:
        return {"acc": float("nan"), "loss": float("nan"), "n": 0}
    channels_last = training.cfg.model.channels_last
    metrics = evaluate(training.model, training.val_loader, training.accelerator, channels_last)
    if training.ema is not None:
        metrics["ema_acc"] = evaluate(
            training.ema.module, training.val_loader, training.accelerator, channels_last, desc="eval ema"
        )["acc"]
    return metrics


def record_epoch(training: Training, progress: Progress, epoch: int, stats: dict, metrics: dict) -> bool:
    """Log and print the epoch, keep its record in ``progress``; returns whether ``best`` improved."""
    accelerator = training.accelerator
    best = max(metrics["acc"], metrics.get("ema_acc", -1.0))
    improved = best > progress.best_acc or math.isnan(best)  # no validation set: best = last
    if not math.isnan(best):
        progress.best_acc = max(progress.best_acc, best)
    progress.history.append(
        {
            "epoch": epoch,
            "train_loss": stats["loss"],
            "samples_per_s": stats["samples_per_s"],
            **{f"val_{k}": v for k, v in metrics.items()},
        }
    )
    accelerator.log(
        {
            "val/acc": metrics["acc"],
            "val/loss": metrics["loss"],
            "train/epoch_loss": stats["loss"],
            **({"val/ema_acc": metrics["ema_acc"]} if "ema_acc" in metrics else {}),
        },
        step=progress.global_step,
    )
    ema_txt = f", EMA {metrics['ema_acc']:.2f}%" if "ema_acc" in metrics else ""
    accelerator.print(
        f"epoch {epoch}: train loss {stats['loss']:.4f}, "
        f"{stats['samples_per_s']:.0f} img/s, val acc {metrics['acc']:.2f}%{ema_txt}"
    )
    return improved


def sample_grid_hook(training: Training, progress: Progress, tracking: str) -> Callable[[torch.Tensor], None]:
    """Called with the first batch: on the run's first step, save the augmented inputs as a grid."""

    def hook(x: torch.Tensor) -> None:
        if progress.global_step == 0:
            save_sample_grid(x, training.cfg.run_dir / "augmented_samples.png", training.accelerator, tracking)

    return hook


def save_sample_grid(x: torch.Tensor, path: Path, accelerator: Accelerator, tracking: str) -> None:
    """Augmented inputs as one PNG (and in W&B) so users can see what the model trains on."""
    if not accelerator.is_main_process:
        return
    from torchvision.utils import make_grid, save_image

    grid = make_grid(x[:32].detach().float().cpu().clamp(0, 1), nrow=8)
    save_image(grid, str(path))
    if tracking != "disabled":
        import wandb

        accelerator.log({"train/augmented_samples": wandb.Image(grid)}, step=0)


def finish(training: Training, progress: Progress, metrics: dict, seconds: float) -> dict:
    cfg, accelerator = training.cfg, training.accelerator
    result = {
        "val_acc": metrics.get("acc", float("nan")),
        "val_ema_acc": metrics.get("ema_acc", float("nan")),
        "best_acc": progress.best_acc,
        "epochs": progress.epoch,
        "global_step": progress.global_step,
        "seconds": seconds,
        "num_processes": accelerator.num_processes,
        "run_dir": str(cfg.run_dir),
        "chance_acc": 100.0 / cfg.data.num_classes,
    }
    if metrics:
        accelerator.print(
            f"done: best val acc {progress.best_acc:.2f}% (chance {result['chance_acc']:.1f}%) "
            f"in {result['seconds']:.0f}s; model: {cfg.run_dir}/best.safetensors"
        )
    accelerator.end_training()
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh train", "Fine-tune a timm ConvNeXt with accelerate.").parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
