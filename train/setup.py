"""Everything a training run is built from: data, loaders, model, optimizer, scheduler, loss, EMA.

``build_training`` is the one way to build it: ``train.main.run`` and the benchmark both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.data import Mixup
from timm.loss import JsdCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from core.config import Config
from core.datasets import ImageDataset, create_eval_loader
from core.demo_data import generate_demo_data
from core.labels import resolve_samples, select_subset
from core.model import align_kernel_strides, check_input_size, create_classifier
from core.transforms import create_eval_transform, create_train_transform
from train.batch_augment import BatchAugment, create_batch_augment
from train.loaders import create_train_loader


@dataclass
class Training:
    """The pieces of one training run, prepared for the accelerator."""

    cfg: Config
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: nn.Module
    mixup_fn: Mixup | None
    ema: ModelEmaV3 | None
    train_loader: object
    val_loader: object | None
    robust_loader: object | None  # the fixed validation subset attacked after every epoch (adversarial training)
    train_size: int
    val_size: int
    updates_per_epoch: int
    batch_augment: BatchAugment | None = None  # aug.prime / aug.fourier, made on the device (train/batch_augment.py)


def create_accelerator(cfg: Config, log_with: str | None = None) -> Accelerator:
    """CPU without CUDA (gloo across processes), the configured precision and accumulation."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=log_with,
        project_dir=str(cfg.run_dir),
    )


def ensure_demo_data(cfg: Config, accelerator: Accelerator) -> None:
    """Generate the offline demo data set when the config asks for it and it is missing (or was
    made for another class count or size: then say so, since it replaces the earlier one)."""
    if not cfg.data.demo:
        return
    made = generate_demo_data(Path(cfg.data.root), num_classes=cfg.data.num_classes, image_size=cfg.data.image_size)
    if made["created"]:
        was = made.get("replaced")
        before = f" (it held {was.get('num_classes')} classes at {was.get('image_size')} px)" if was else ""
        accelerator.print(
            f"demo data: {'regenerated' if was else 'generated'} {made['root']} for "
            f"data.num_classes={cfg.data.num_classes}, data.image_size={cfg.data.image_size}{before}"
        )


def create_model_and_optimizer(cfg: Config, updates_per_epoch: int) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """The network in its configured memory layout, timm's optimizer and per-step scheduler."""
    t = cfg.train
    model = create_classifier(cfg.model, cfg.data.num_classes)
    check_input_size(model, cfg.data.image_size, cfg.model.name)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    align_kernel_strides(model)  # else DDP warns "Grad strides do not match bucket view strides"
    optimizer = create_optimizer_v2(
        model.backbone, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay or None
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=t.sched,
        num_epochs=t.epochs,
        warmup_epochs=t.warmup_epochs,
        warmup_lr=t.warmup_lr,
        min_lr=t.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return model, optimizer, scheduler


def create_loss(cfg: Config) -> tuple[Mixup | None, nn.Module]:
    """Mixup/CutMix (``None`` when off) and the loss that matches its soft targets; with AugMix's
    consistency loss (``aug.augmix.jsd_weight``) timm's JsdCrossEntropy over the three views."""
    t = cfg.train
    if cfg.aug.augmix.enabled and cfg.aug.augmix.jsd_weight > 0:  # validate_config refuses it with mixup
        return None, JsdCrossEntropy(num_splits=3, alpha=cfg.aug.augmix.jsd_weight, smoothing=t.label_smoothing)
    if t.mixup > 0 or t.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=t.mixup,
            cutmix_alpha=t.cutmix,
            prob=t.mixup_prob,
            label_smoothing=t.label_smoothing,
            num_classes=cfg.data.num_classes,
        )
        return mixup_fn, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)


def build_training(cfg: Config, accelerator: Accelerator) -> Training:
    """Data, loaders, model, optimizer, scheduler, loss and EMA, prepared for ``accelerator``.

    Seed before calling it: the model's initial weights come from torch's global RNG.
    """
    t, d = cfg.train, cfg.data
    train_samples, val_samples = resolve_samples(d)
    train_set = ImageDataset(
        train_samples, create_train_transform(cfg.aug, d.image_size), bad_images=d.bad_images, max_bad=d.max_bad_images
    )
    val_set = ImageDataset(
        val_samples, create_eval_transform(d.image_size), bad_images=d.bad_images, max_bad=d.max_bad_images
    )
    train_loader = create_train_loader(train_set, t.batch_size, cfg.seed, d.num_workers)
    val_loader = create_eval_loader(val_set, t.batch_size, d.num_workers) if len(val_set) else None
    robust_loader = None
    if t.adv.mode != "none" and len(val_set):
        # A fixed, seeded part of the validation set: every epoch meets the same images.
        chosen = [val_set.samples[i] for i in select_subset(len(val_set), t.adv.val_images, d.split_seed)]
        robust_set = ImageDataset(chosen, create_eval_transform(d.image_size), bad_images=d.bad_images)
        robust_loader = create_eval_loader(robust_set, t.batch_size, d.num_workers)

    updates_per_epoch = max(1, len(train_loader) // accelerator.num_processes // t.grad_accum_steps)
    model, optimizer, scheduler = create_model_and_optimizer(cfg, updates_per_epoch)
    mixup_fn, loss_fn = create_loss(cfg)

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    if robust_loader is not None:
        robust_loader = accelerator.prepare(robust_loader)
    if cfg.model.compile:
        model = torch.compile(model)
    ema = None
    if t.ema:
        # Warm-up keeps the EMA useful on short runs (decay ramps up to ema_decay).
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=t.ema_decay, use_warmup=True, device=accelerator.device)
    return Training(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        loss_fn,
        mixup_fn,
        ema,
        train_loader,
        val_loader,
        robust_loader,
        len(train_set),
        len(val_set),
        updates_per_epoch,
        create_batch_augment(cfg.aug, cfg.seed, accelerator.process_index, accelerator.num_processes),
    )
