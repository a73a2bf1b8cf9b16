"""``./run.sh train``: fine-tune a timm ConvNeXt with accelerate.

Layout of a run folder (``runs/<name>/``): ``config.yaml`` (resolved), ``best``/``last``
exported models (``.safetensors`` + ``.json``), ``checkpoints/e<epoch>_b<batch>/`` full
training states for ``resume=auto``, ``augmented_samples.png`` and the W&B run.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config, save_config
from core.devices import precision_name
from core.model import count_params
from core.tracking import resolve_wandb_mode
from core.transforms import create_train_transform
from train.engine import DataWait, Progress, checkpoint_due, evaluate, evaluate_robust, train_one_epoch
from train.selection import describe_score_set, measure_score
from train.setup import Training, build_training, create_accelerator, ensure_demo_data, seed_process
from train.state import (
    checkpoint_dirs,
    export_models,
    pick_weights,
    restore,
    run_folder,
    save_checkpoint,
    selection_of,
)
from train.tracking import init_tracking, log_data_wait, log_model


def run(cfg: Config) -> dict:
    """Train as configured; returns the final metrics (also written to ``runs/<name>/``)."""
    # Building the augmentation pipeline checks the aug section: a bad entry is one line naming its
    # key before any folder, process group or download.
    create_train_transform(cfg.aug, cfg.data.image_size)
    mode, reason = resolve_wandb_mode(cfg.wandb.mode, cfg.wandb.timeout)
    accelerator = create_accelerator(cfg, log_with=None if mode == "disabled" else "wandb")
    set_seed(cfg.seed)
    with run_folder(cfg, accelerator):
        with accelerator.main_process_first():
            ensure_demo_data(cfg, accelerator)
        training = build_training(cfg, accelerator)
        seed_process(cfg.seed, accelerator.process_index)  # before restore: a resume brings back each one's state
        progress = Progress()
        restore(training, progress)
        if accelerator.is_main_process:
            save_config(cfg, cfg.run_dir / "config.yaml")
        tracking = init_tracking(accelerator, cfg, mode, reason, resumed=progress.global_step > 0)
        announce(training)

        metrics: dict = {}
        waits = DataWait()
        start = time.perf_counter()
        if nothing_left(cfg, progress, accelerator):
            return finish(training, progress, {}, 0.0, waits)
        for epoch in range(progress.epoch, cfg.train.epochs):
            grid = sample_grid_hook(training, progress, tracking)
            stats = fit_epoch(training, progress, epoch, on_first_batch=grid)
            waits.add(stats)
            metrics = validate(training)
            improved = record_epoch(training, progress, epoch, stats, metrics)
            export_models(training, progress, metrics, improved)
            save_checkpoint(training, progress)
            if stopped_early(cfg, progress):
                break
        if tracking != "disabled":
            publish_best(training)
            log_data_wait(accelerator, waits.seconds, waits.fraction)
        return finish(training, progress, metrics, time.perf_counter() - start, waits)


def announce(training: Training) -> None:
    cfg, accelerator = training.cfg, training.accelerator
    n_params = count_params(accelerator.unwrap_model(training.model))
    accelerator.print(
        f"train {cfg.model.name} ({n_params / 1e6:.2f}M params) on {training.train_size} images, "
        f"val {training.val_size}, {cfg.data.num_classes} classes, {cfg.data.image_size}px, "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type} ({torch.get_num_threads()} torch "
        f"threads, {training.workers} loader workers each), precision {precision_name(accelerator.mixed_precision)}"
        f"{', channels_last' if training.channels_last else ''}; {training.scaling.describe()}"
    )
    if training.teachers is not None:
        d = cfg.train.distill
        accelerator.print(
            f"distillation: RSLAD robust soft labels of {len(training.teachers.models)} frozen teacher(s) "
            f"(train.distill.teachers), weight {d.weight:g}, temperature {d.temperature:g}"
        )
    if training.score_set is not None:
        accelerator.print(describe_score_set(training.score_set, cfg))
    adv = cfg.train.adv
    if adv.mode != "none":
        steps = f", {adv.steps} steps" if adv.mode in ("pgd", "trades") else ""
        ramp = f", eps ramped over {adv.warmup_epochs:g} epochs" if adv.warmup_epochs else ""
        by = {"clean": "clean validation accuracy", "score": "the score"}.get(
            cfg.train.select, "robust validation accuracy"
        )
        accelerator.print(f"adversarial training: {adv.mode} at eps {adv.eps * 255:.3g}/255{steps}{ramp}; best by {by}")
        if adv.warmup_epochs > cfg.train.epochs:
            reached = adv.eps * cfg.train.epochs / adv.warmup_epochs
            accelerator.print(
                f"WARNING: train.adv.warmup_epochs={adv.warmup_epochs:g} is longer than "
                f"train.epochs={cfg.train.epochs}: "
                f"eps only reaches {reached * 255:.3g}/255 of {adv.eps * 255:.3g}/255 by the end; lower "
                "train.adv.warmup_epochs"
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
        if checkpoint_due(t, progress.global_step):
            save_checkpoint(training, progress)

    stats = train_one_epoch(training, loader, progress, epoch, on_optimizer_step=on_step, on_first_batch=on_first_batch)
    # When max_steps ends mid-epoch the position is kept so a resume continues from there.
    if not (stopped_early(training.cfg, progress) and progress.batch < len(training.train_loader)):
        progress.epoch, progress.batch = epoch + 1, 0
    return stats


def stopped_early(cfg: Config, progress: Progress) -> bool:
    return bool(cfg.train.max_steps) and progress.global_step >= cfg.train.max_steps


def nothing_left(cfg: Config, progress: Progress, accelerator: Accelerator) -> bool:
    """A resumed run that already reached ``train.max_steps`` or its last epoch: says so instead of
    training (the loop would otherwise take one more step before it checks ``max_steps``)."""
    if stopped_early(cfg, progress):
        accelerator.print(
            f"nothing to train: the run already stands at step {progress.global_step}, the limit "
            f"train.max_steps={cfg.train.max_steps}; raise it (0 = every epoch) to continue with resume=auto"
        )
    elif progress.epoch >= cfg.train.epochs:
        accelerator.print(
            f"nothing to train: the run already finished its train.epochs={cfg.train.epochs}; "
            f"raise train.epochs to continue with resume=auto; model: {cfg.run_dir}/best.safetensors"
        )
    else:
        return False
    return True


def validate(training: Training) -> dict:
    """Clean accuracy and loss of the model (and of its EMA), and under adversarial training their
    PGD accuracy on the fixed robust-validation subset; NaN without a validation set."""
    cfg, accelerator = training.cfg, training.accelerator
    if training.val_loader is None:
        return {"acc": float("nan"), "loss": float("nan"), "n": 0}
    channels_last = training.channels_last
    metrics = evaluate(training.model, training.val_loader, accelerator, channels_last)
    if training.ema is not None:
        metrics["ema_acc"] = evaluate(
            training.ema.module, training.val_loader, accelerator, channels_last, desc="eval ema"
        )["acc"]
    if training.robust_loader is not None:
        adv = cfg.train.adv
        for key, net in (
            ("robust_acc", accelerator.unwrap_model(training.model)),
            ("ema_robust_acc", training.ema.module if training.ema is not None else None),
        ):
            if net is not None:
                metrics[key] = evaluate_robust(
                    net, training.robust_loader, accelerator, adv.eps, adv.val_steps, cfg.seed, channels_last
                )
    if training.score_set is not None:
        for prefix, net in (("", accelerator.unwrap_model(training.model)), ("ema_", ema_module(training))):
            if net is not None:
                metrics.update(
                    {f"{prefix}{k}": v for k, v in measure_score(net, training.score_set, accelerator).items()}
                )
    return metrics


def ema_module(training: Training):
    return training.ema.module if training.ema is not None else None


def record_epoch(training: Training, progress: Progress, epoch: int, stats: dict, metrics: dict) -> bool:
    """Log and print the epoch, keep its record in ``progress``; returns whether ``best`` improved.

    Under adversarial training a collapse of the robust accuracy (catastrophic overfitting, the
    known failure of fast FGSM training) is reported loudly and remembered: ``best`` is picked by
    robust accuracy, so the collapsed weights never become it.
    """
    accelerator = training.accelerator
    _, best = pick_weights(metrics, selection_of(training.cfg, metrics))
    improved = best > progress.best_acc or math.isnan(best)  # no validation set: best = last
    if not math.isnan(best):
        progress.best_acc = max(progress.best_acc, best)
    robust = metrics.get("robust_acc")
    collapsed = robust is not None and progress.best_robust_acc >= 10.0 and robust < 0.5 * progress.best_robust_acc
    if robust is not None:
        progress.best_robust_acc = max(progress.best_robust_acc, robust)
    if collapsed and progress.collapse_epoch < 0:
        progress.collapse_epoch = epoch
    progress.history.append(
        {
            "epoch": epoch,
            "train_loss": stats["loss"],
            "samples_per_s": stats["samples_per_s"],
            "data_wait_frac": stats["data_wait_frac"],
            **{f"val_{k}": v for k, v in metrics.items()},
        }
    )
    logged = {
        "val/acc": metrics["acc"],
        "val/loss": metrics["loss"],
        "train/epoch_loss": stats["loss"],
        "train/epoch_data_wait_frac": stats["data_wait_frac"],
    }
    logged.update(
        {
            f"val/{k}": metrics[k]
            for k in ("ema_acc", "robust_acc", "ema_robust_acc", "score", "ema_score", "score_seconds")
            if k in metrics
        }
    )
    accelerator.log(logged, step=progress.global_step)
    text = f"epoch {epoch}: train loss {stats['loss']:.4f}, {stats['samples_per_s']:.0f} img/s"
    text += f", val acc {metrics['acc']:.2f}%"
    text += f", EMA {metrics['ema_acc']:.2f}%" if "ema_acc" in metrics else ""
    if robust is not None:
        eps = training.cfg.train.adv.eps
        text += f"; PGD-{training.cfg.train.adv.val_steps} at {eps * 255:.3g}/255: {robust:.2f}%"
        text += f", EMA {metrics['ema_robust_acc']:.2f}%" if "ema_robust_acc" in metrics else ""
    if "score" in metrics:
        parts = ", ".join(f"{k} {v:.2f}%" for k, v in metrics["score_parts"].items())
        text += f"; score {metrics['score']:.2f}% ({parts}; {metrics['score_seconds']:.1f}s)"
        text += f", EMA {metrics['ema_score']:.2f}%" if "ema_score" in metrics else ""
    accelerator.print(text)
    if collapsed:
        accelerator.print(
            f"WARNING: catastrophic overfitting: robust validation accuracy fell to {robust:.1f}% from "
            f"{progress.best_robust_acc:.1f}%; `best` keeps the weights from before the collapse (try "
            "train.adv.mode=pgd, a smaller train.adv.step_size or a longer train.adv.warmup_epochs)"
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

    nrow = 8
    if x.dim() == 5:  # AugMix views: each image's (clean, AugMix, AugMix) side by side, two images a row
        x, nrow = x[:10].flatten(0, 1), 2 * x.shape[1]
    grid = make_grid(x[:32].detach().float().cpu().clamp(0, 1), nrow=nrow)
    save_image(grid, str(path))
    if tracking != "disabled":
        import wandb

        accelerator.log({"train/augmented_samples": wandb.Image(grid)}, step=0)


def publish_best(training: Training) -> None:
    """Log ``best`` as the run's model artifact and its figures in the run summary (main process)."""
    cfg, accelerator = training.cfg, training.accelerator
    best = cfg.run_dir / "best"
    if not accelerator.is_main_process or not Path(f"{best}.json").is_file():
        return
    info = json.loads(Path(f"{best}.json").read_text(encoding="utf-8"))
    run = accelerator.get_tracker("wandb", unwrap=True)
    log_model(run, cfg, best, info)
    run.summary.update({f"best/{k}": info[k] for k in ("val_acc", "val_robust_acc", "val_score", "epoch") if k in info})


def finish(training: Training, progress: Progress, metrics: dict, seconds: float, waits: DataWait) -> dict:
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
        "val_robust_acc": metrics.get("robust_acc", float("nan")),
        "best_robust_acc": progress.best_robust_acc,
        "collapse_epoch": progress.collapse_epoch,
        "data_wait_s": waits.seconds,
        "data_wait_frac": waits.fraction,
    }
    if metrics:
        what = {"robust": "robust val acc", "score": "val score"}.get(selection_of(cfg, metrics), "val acc")
        limit = stopped_early(cfg, progress) and progress.epoch < cfg.train.epochs
        ended = (
            f"stopped by train.max_steps={cfg.train.max_steps} ({progress.epoch} of {cfg.train.epochs} epochs complete)"
            if limit
            else "done"
        )
        accelerator.print(
            f"{ended}: best {what} {progress.best_acc:.2f}% (chance {result['chance_acc']:.1f}%) "
            f"in {result['seconds']:.0f}s, data wait {waits.fraction:.0%} of step time; "
            f"model: {cfg.run_dir}/best.safetensors"
        )
    if progress.collapse_epoch >= 0:
        accelerator.print(
            f"WARNING: robust accuracy collapsed at epoch {progress.collapse_epoch} (catastrophic overfitting); "
            "best.safetensors holds the weights with the best robust accuracy, last.safetensors may be collapsed"
        )
    accelerator.end_training()
    return result


def next_step(cfg: Config, argv: Sequence[str]) -> str:
    """What to type after a run of ``./run.sh train ARGV`` ended early (the launcher's stop, crash and
    killed lines): resume from its newest complete checkpoint, or start it again."""
    if checkpoint_dirs(cfg.run_dir):
        kept = [a for a in argv if not a.startswith(("resume=", "overwrite="))]
        return f"continue it with {shlex.join(['./run.sh', 'train', *kept, 'resume=auto'])}"
    again = shlex.join(["./run.sh", "train", *argv])
    return f"it had written no checkpoint yet, so there is nothing to resume: start it again with {again}"


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh train", "Fine-tune a timm ConvNeXt with accelerate.").parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
