"""``./run.sh train``: fine-tune a timm ConvNeXt with accelerate.

Layout of a run folder (``runs/<name>/``): ``config.yaml`` (resolved), ``best``/``last``
exported models (``.safetensors`` + ``.json``), ``checkpoints/e<epoch>_b<batch>/`` full
training states for ``resume=auto``, ``augmented_samples.png`` and the W&B run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from safetensors.torch import load_file, save_file
from torch import nn

from train.checkpoint import export_model, state_dict_of
from train.cli import create_parser, parse_config, quiet_libraries, run_cli
from train.config import Config, ConfigError, config_to_dict, save_config
from train.data import ImageDataset, resolve_samples
from train.demo_data import generate_demo_data
from train.engine import Progress, TrainingDiverged, evaluate, train_one_epoch
from train.errors import UserError
from train.loaders import create_eval_loader, create_train_loader
from train.model import count_params, create_classifier
from train.tracking import init_tracking, resolve_wandb_mode
from train.transforms import create_eval_transform, create_train_transform

CHECKPOINT_PREFIX = "e"


def ensure_demo_data(cfg: Config) -> None:
    """Generate the offline demo data set when the config asks for it and it is missing."""
    if cfg.data.demo:
        generate_demo_data(Path(cfg.data.root), num_classes=cfg.data.num_classes, image_size=cfg.data.image_size)


def create_accelerator(cfg: Config, log_with: str | None) -> Accelerator:
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 on CPU")
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=log_with,
        project_dir=str(cfg.run_dir),
    )


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder up front so an unwritable ``out_dir`` fails before any training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"out_dir: cannot write to {run_dir} ({exc.strerror or exc})") from None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete full-state checkpoints, oldest first. A ``.tmp`` folder is a torn write."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                  and not p.name.endswith(".tmp"))


TRAIN_STATE = "train_state.json"
EMA_WEIGHTS = "ema.safetensors"


def save_extra_state(folder: Path, progress: Progress, scheduler, ema) -> None:
    """Our own state beside accelerate's, as JSON and safetensors.

    accelerate unpickles registered objects with ``weights_only=False``; keeping progress,
    scheduler and EMA out of it means a checkpoint is never loaded through pickle.
    """
    state = {"progress": progress.state_dict(), "scheduler": scheduler.state_dict()}
    (folder / TRAIN_STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    if ema is not None:
        save_file(state_dict_of(ema.module), str(folder / EMA_WEIGHTS))


def load_extra_state(folder: Path, progress: Progress, scheduler, ema) -> None:
    try:
        state = json.loads((folder / TRAIN_STATE).read_text(encoding="utf-8"))
        progress.load_state_dict(state["progress"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(load_file(str(folder / EMA_WEIGHTS), device=str(ema_device(ema))))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"resume: {folder} is not a complete checkpoint of this run ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def ema_device(ema) -> torch.device:
    return next(ema.module.parameters()).device


def save_checkpoint(accelerator: Accelerator, model: nn.Module, run_dir: Path, progress: Progress, keep: int,
                    scheduler, ema) -> Path:
    """Full training state into ``checkpoints/e<epoch>_b<batch>``, published by an atomic rename.

    A kill at any point leaves either the previous checkpoints or the new one complete, never
    a half-written folder under a final name; ``keep`` newest are kept.
    """
    if not all(bool(p.isfinite().all()) for p in accelerator.unwrap_model(model).parameters()):
        raise TrainingDiverged(f"weights became NaN/inf by step {progress.global_step}; stopped without "
                               "saving them (the last good checkpoint is kept: lower train.lr or use train.clip_grad)")
    root = run_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{progress.epoch:04d}_b{progress.batch:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            save_extra_state(tmp, progress, scheduler, ema)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {tmp}: {exc.strerror or exc}; earlier checkpoints are intact") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(cfg: Config) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = checkpoint_dirs(cfg.run_dir)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not path.is_dir():
        raise UserError(f"resume: no checkpoint folder {path}")
    return path


def export_current(accelerator: Accelerator, model: nn.Module, ema, cfg: Config, progress: Progress,
                   metrics: dict, improved: bool) -> None:
    """Write ``last`` (and ``best`` when improved) on the main process."""
    if not accelerator.is_main_process:
        return
    use_ema = ema is not None and metrics.get("ema_acc", -1) >= metrics["acc"]
    weights = ema.module if use_ema else accelerator.unwrap_model(model)
    meta = {
        "arch": cfg.model.name,
        "num_classes": cfg.data.num_classes,
        "image_size": cfg.data.image_size,
        "weights": "ema" if use_ema else "model",
        "epoch": progress.epoch,
        "global_step": progress.global_step,
        "val_acc": max(metrics["acc"], metrics.get("ema_acc", -1)),
        "val_n": metrics["n"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_to_dict(cfg),
    }
    try:
        export_model(weights, cfg.run_dir / "last", meta)
        if improved:
            export_model(weights, cfg.run_dir / "best", meta)
    except OSError as exc:
        raise UserError(f"cannot write the exported model in {cfg.run_dir}: {exc.strerror or exc}; "
                        "earlier exports and checkpoints are intact") from None


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


def create_model_and_optimizer(cfg: Config, updates_per_epoch: int) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """The network in its configured memory layout, timm's optimizer and per-step scheduler."""
    t = cfg.train
    model = create_classifier(cfg.model, cfg.data.num_classes)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model.backbone, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay,
                                    layer_decay=t.layer_decay or None)
    scheduler, _ = create_scheduler_v2(optimizer, sched=t.sched, num_epochs=t.epochs, warmup_epochs=t.warmup_epochs,
                                       warmup_lr=t.warmup_lr, min_lr=t.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    return model, optimizer, scheduler


def create_loss(cfg: Config) -> tuple[Mixup | None, nn.Module]:
    """Mixup/CutMix (``None`` when off) and the loss that matches its soft targets."""
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                         label_smoothing=t.label_smoothing, num_classes=cfg.data.num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)


def run(cfg: Config) -> dict:
    """Train as configured; returns the final metrics (also written to ``runs/<name>/``)."""
    t = cfg.train
    mode, reason = ("disabled", "") if cfg.wandb.mode == "disabled" else resolve_wandb_mode(cfg.wandb.mode, cfg.wandb.timeout)
    accelerator = create_accelerator(cfg, "wandb" if mode != "disabled" else None)
    set_seed(cfg.seed)
    run_dir = cfg.run_dir
    if accelerator.is_main_process:
        prepare_run_dir(run_dir)
    with accelerator.main_process_first():
        ensure_demo_data(cfg)
    train_samples, val_samples = resolve_samples(cfg.data)
    if (t.mixup > 0 or t.cutmix > 0) and t.batch_size % 2:
        raise ConfigError("train.batch_size must be even with mixup/cutmix")

    train_set = ImageDataset(train_samples, create_train_transform(cfg.aug, cfg.data.image_size),
                             bad_images=cfg.data.bad_images, max_bad=cfg.data.max_bad_images)
    val_set = ImageDataset(val_samples, create_eval_transform(cfg.data.image_size),
                           bad_images=cfg.data.bad_images, max_bad=cfg.data.max_bad_images)
    train_loader = create_train_loader(train_set, t.batch_size, cfg.seed, cfg.data.num_workers)
    val_loader = create_eval_loader(val_set, t.batch_size, cfg.data.num_workers) if len(val_set) else None

    updates_per_epoch = max(1, len(train_loader) // accelerator.num_processes // t.grad_accum_steps)
    model, optimizer, scheduler = create_model_and_optimizer(cfg, updates_per_epoch)
    mixup_fn, loss_fn = create_loss(cfg)

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    if cfg.model.compile:
        model = torch.compile(model)
    ema = None
    if t.ema:
        # Warm-up keeps the EMA useful on short runs (decay ramps up to ema_decay).
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=t.ema_decay, use_warmup=True,
                         device=accelerator.device)
    progress = Progress()

    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        load_extra_state(resume_from, progress, scheduler, ema)
        accelerator.print(f"resumed from {resume_from} (epoch {progress.epoch}, batch {progress.batch}, "
                          f"step {progress.global_step})")
    elif cfg.resume == "auto":
        accelerator.print(f"resume=auto: no checkpoint in {run_dir}/checkpoints, starting fresh")
    elif accelerator.is_main_process and checkpoint_dirs(run_dir):
        # A fresh run under an old name: old states would otherwise be picked by a later resume.
        accelerator.print(f"starting fresh: removing earlier checkpoints in {run_dir}/checkpoints "
                          "(use resume=auto to continue them)")
        shutil.rmtree(run_dir / "checkpoints")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    tracking = init_tracking(accelerator, cfg, mode, reason)
    n_params = count_params(accelerator.unwrap_model(model))
    accelerator.print(
        f"train {cfg.model.name} ({n_params / 1e6:.2f}M params) on {len(train_samples)} images, "
        f"val {len(val_samples)}, {cfg.data.num_classes} classes, {cfg.data.image_size}px, "
        f"{accelerator.num_processes} process(es) on {accelerator.device} ({torch.get_num_threads()} torch threads "
        f"each), precision {cfg.train.mixed_precision}"
    )

    def on_step() -> None:
        if t.checkpoint_every and progress.global_step % t.checkpoint_every == 0:
            save_checkpoint(accelerator, model, run_dir, progress, t.keep_checkpoints, scheduler, ema)

    def on_first_batch(x: torch.Tensor) -> None:
        if progress.global_step == 0:
            save_sample_grid(x, run_dir / "augmented_samples.png", accelerator, tracking)

    metrics: dict = {}
    start = time.perf_counter()
    for epoch in range(progress.epoch, t.epochs):
        train_loader.set_epoch(epoch)
        loader = train_loader
        if progress.batch:
            loader = accelerator.skip_first_batches(train_loader, progress.batch)
            loader.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, loader, optimizer, scheduler, loss_fn, accelerator, progress, epoch=epoch,
            mixup_fn=mixup_fn, ema=ema, clip_grad=t.clip_grad, adv_eps=t.adv_eps, adv_weight=t.adv_weight,
            channels_last=cfg.model.channels_last, log_every=t.log_every, max_steps=t.max_steps,
            on_optimizer_step=on_step, on_first_batch=on_first_batch,
        )
        stopped_early = bool(t.max_steps) and progress.global_step >= t.max_steps
        # When max_steps ends mid-epoch the position is kept so a resume continues from there.
        if not (stopped_early and progress.batch < len(train_loader)):
            progress.epoch, progress.batch = epoch + 1, 0
        metrics = _evaluate_all(model, ema, val_loader, accelerator, cfg)
        best = max(metrics["acc"], metrics.get("ema_acc", -1.0))
        improved = best > progress.best_acc or math.isnan(best)  # no validation set: best = last
        if not math.isnan(best):
            progress.best_acc = max(progress.best_acc, best)
        record = {"epoch": epoch, "train_loss": train_stats["loss"], "samples_per_s": train_stats["samples_per_s"],
                  **{f"val_{k}": v for k, v in metrics.items()}}
        progress.history.append(record)
        accelerator.log({"val/acc": metrics["acc"], "val/loss": metrics["loss"], "train/epoch_loss": train_stats["loss"],
                         **({"val/ema_acc": metrics["ema_acc"]} if "ema_acc" in metrics else {})},
                        step=progress.global_step)
        ema_txt = f", EMA {metrics['ema_acc']:.2f}%" if "ema_acc" in metrics else ""
        accelerator.print(f"epoch {epoch}: train loss {train_stats['loss']:.4f}, "
                          f"{train_stats['samples_per_s']:.0f} img/s, val acc {metrics['acc']:.2f}%{ema_txt}")
        export_current(accelerator, model, ema, cfg, progress, metrics, improved)
        save_checkpoint(accelerator, model, run_dir, progress, t.keep_checkpoints, scheduler, ema)
        if stopped_early:
            break

    result = {
        "val_acc": metrics.get("acc", float("nan")),
        "val_ema_acc": metrics.get("ema_acc", float("nan")),
        "best_acc": progress.best_acc,
        "epochs": progress.epoch,
        "global_step": progress.global_step,
        "seconds": time.perf_counter() - start,
        "num_processes": accelerator.num_processes,
        "run_dir": str(run_dir),
        "chance_acc": 100.0 / cfg.data.num_classes,
    }
    if metrics:
        accelerator.print(f"done: best val acc {progress.best_acc:.2f}% (chance {result['chance_acc']:.1f}%) "
                          f"in {result['seconds']:.0f}s; model: {run_dir}/best.safetensors")
    accelerator.end_training()
    return result


def _evaluate_all(model, ema, val_loader, accelerator, cfg: Config) -> dict:
    if val_loader is None:
        return {"acc": float("nan"), "loss": float("nan"), "n": 0}
    metrics = evaluate(model, val_loader, accelerator, cfg.model.channels_last)
    if ema is not None:
        metrics["ema_acc"] = evaluate(ema.module, val_loader, accelerator, cfg.model.channels_last, desc="eval ema")["acc"]
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh train", "Fine-tune a timm ConvNeXt with accelerate.").parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
