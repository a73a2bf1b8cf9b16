"""Everything a training run is built from: data, loaders, model, optimizer, scheduler, loss, EMA.

``build_training`` is the one way to build it: ``train.main.run`` and the benchmark both call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.data import Mixup
from timm.loss import JsdCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from core import devices
from core.config import Config
from core.datasets import ImageDataset, create_eval_loader
from core.devices import (
    fit_workers_to_shared_memory,
    local_processes,
    resolve_channels_last,
    resolve_num_workers,
    shared_memory_free,
)
from core.labels import resolve_samples, select_subset
from core.model import create_classifier
from core.transforms import create_eval_transform, create_train_transform, resolve_augmix_device
from train.batch_augment import BatchAugment, create_batch_augment
from train.demo_data import generate_demo_data, hold_demo_data
from train.distill import Teachers, load_teachers
from train.loaders import create_train_loader
from train.network import align_kernel_strides, check_input_size
from train.selection import ScoreSet, create_score_set


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
    scaling: BatchScaling | None = None  # the lr and EMA decay for this run's global batch
    channels_last: bool = False  # model.channels_last resolved on this device
    workers: int = 0  # loader worker processes of this process
    # aug.prime / aug.fourier, and AugMix with aug.augmix.device on: made on the device (train/batch_augment.py)
    batch_augment: BatchAugment | None = None
    teachers: Teachers | None = None  # train.distill.teachers: frozen, on this process's device (train/distill.py)
    score_set: ScoreSet | None = None  # train.select=score: the images the score is measured on (train/selection.py)


def create_accelerator(cfg: Config, log_with: str | None = None) -> Accelerator:
    """:func:`core.devices.create_accelerator` with training's settings: ``train.mixed_precision``,
    the accumulation, the tracker and the run folder.

    The prepared loaders copy their batches to the device without blocking: from the pinned
    memory the loaders ask for on a GPU, the copy overlaps the step before it (accelerate's
    ``non_blocking``; on the CPU there is nothing to copy).
    """
    return devices.create_accelerator(
        cfg.train.mixed_precision,
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=log_with,
        project_dir=str(cfg.run_dir),
    )


def seed_process(seed: int, process_index: int) -> None:
    """After the model is built (its initial weights drawn alike on every process from ``seed``):
    torch's, numpy's and Python's global generators per process, so the random draws of the
    training step (PGD's and FGSM's random starts, TRADES' noise, drop-path, Mixup) differ between
    the GPUs instead of repeating the same noise on every shard. Process 0 keeps its stream, so a
    single-process run draws what it always did. Data order and augmentations come from their own
    generators (``train.loaders``, ``train.batch_augment``), the same on every process."""
    if process_index:
        set_seed(seed + process_index)


@dataclass(frozen=True)
class BatchScaling:
    """``train.lr``, ``train.warmup_epochs`` and ``train.ema_decay`` as this run uses them
    (see :func:`scale_for_batch`)."""

    global_batch: int
    lr: float
    ema_decay: float
    rule: str  # how lr was scaled, for the start-up line
    warmup_epochs: float = 0.0

    def describe(self) -> str:
        warmup = f", warm-up {self.warmup_epochs:.3g} epochs" if self.warmup_epochs else ""
        return f"global batch {self.global_batch}, lr {self.lr:.3g}{self.rule}{warmup}, EMA decay {self.ema_decay:.6g}"


def scale_for_batch(t, processes: int) -> BatchScaling:
    """The learning rate, warm-up and EMA decay for a global batch of ``batch_size x processes x grad_accum_steps``.

    timm's rule (its train.py, ``--lr-base``/``--lr-base-size``/``--lr-base-scale``): ``train.lr`` is
    the rate at ``train.base_batch_size`` images and grows with the ratio of the global batch to it,
    by its square root for adaptive optimizers (a name with "ada" or "lamb": AdamW) and linearly
    otherwise (SGD). The warm-up grows by the same factor (at most half of ``train.epochs``): the rate
    then climbs by as much per training image as at the base batch, where a warm-up fixed in epochs
    would reach the higher rate in fewer, larger steps (8 GPUs of the phase configs: lr 2.8e-3 after
    ~44 steps). The EMA decay is raised to the batch ratio: each update then weighs the same number
    of images as at the base batch, whatever the number of processes.
    """
    batch = t.batch_size * processes * t.grad_accum_steps
    if not t.base_batch_size or batch == t.base_batch_size:
        return BatchScaling(batch, t.lr, t.ema_decay, "", t.warmup_epochs)
    ratio = batch / t.base_batch_size
    rule = t.lr_scale
    if rule == "auto":
        rule = "sqrt" if any(name in t.opt.lower() for name in ("ada", "lamb")) else "linear"
    factor = math.sqrt(ratio) if rule == "sqrt" else ratio
    text = f" (train.lr {t.lr:g} x {'sqrt' if rule == 'sqrt' else ''}({batch}/{t.base_batch_size}), {rule} rule)"
    warmup = min(t.warmup_epochs * factor, t.epochs / 2) if factor > 1 else t.warmup_epochs
    return BatchScaling(batch, t.lr * factor, t.ema_decay**ratio, text, warmup)


def ensure_demo_data(cfg: Config, accelerator: Accelerator) -> None:
    """Generate the offline demo data set when the config asks for it and it is missing (or was
    made for another class count or size: then say so, since it replaces the earlier one). A demo
    set the run reads is held (``hold_demo_data``): demo-data never replaces it under the run."""
    if not cfg.data.demo:
        hold_demo_data(Path(cfg.data.root))
        return
    made = generate_demo_data(Path(cfg.data.root), num_classes=cfg.data.num_classes, image_size=cfg.data.image_size)
    hold_demo_data(Path(cfg.data.root))
    if made["created"]:
        was = made.get("replaced")
        before = f" (it held {was.get('num_classes')} classes at {was.get('image_size')} px)" if was else ""
        accelerator.print(
            f"demo data: {'regenerated' if was else 'generated'} {made['root']} for "
            f"data.num_classes={cfg.data.num_classes}, data.image_size={cfg.data.image_size}{before}"
        )


def create_model_and_optimizer(
    cfg: Config,
    updates_per_epoch: int,
    lr: float | None = None,
    channels_last: bool | None = None,
    warmup_epochs: float | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """The network in its memory layout, timm's optimizer at ``lr`` and its per-step scheduler
    (defaults: ``train.lr`` and ``train.warmup_epochs`` as given, ``model.channels_last`` resolved
    on this machine)."""
    t = cfg.train
    lr = t.lr if lr is None else lr
    warmup_epochs = t.warmup_epochs if warmup_epochs is None else warmup_epochs
    channels_last = resolve_channels_last(cfg.model.channels_last) if channels_last is None else channels_last
    model = create_classifier(cfg.model, cfg.data.num_classes)
    check_input_size(model, cfg.data.image_size, cfg.model.name)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    align_kernel_strides(model)  # else DDP warns "Grad strides do not match bucket view strides"
    optimizer = create_optimizer_v2(
        model.backbone, opt=t.opt, lr=lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay or None
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=t.sched,
        num_epochs=t.epochs,
        warmup_epochs=warmup_epochs,
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


@dataclass
class Loaders:
    train: object
    val: object | None
    robust: object | None  # the fixed validation subset attacked after every epoch (adversarial training)
    train_size: int
    val_size: int
    val_samples: list = field(default_factory=list)


# Validation runs between epochs, while the training loader's workers wait: a few workers of its
# own, started for each pass and gone after it, rather than another persistent pool per loader.
EVAL_WORKERS = 4


@dataclass(frozen=True)
class WorkerSplit:
    """Loader worker processes of one process: the training loader's (persistent) and the
    validation loaders' (started per pass); ``warning``: one line when shared memory cut them."""

    train: int
    eval: int
    warning: str = ""


def split_workers(
    cfg: Config, workers: int, local: int = 1, free_shm: int | None = None, augmix_on_device: bool = False
) -> WorkerSplit:
    """The training loader gets ``workers`` (it is the one that must keep up), validation at most
    ``EVAL_WORKERS``, both only as many as this process's share of ``/dev/shm`` holds
    (``free_shm``: measured when None; ``local``: processes sharing it on this machine)."""
    # AugMix on the device makes its views there: the loader ships one
    views = 3 if cfg.aug.augmix.enabled and cfg.aug.augmix.jsd_weight > 0 and not augmix_on_device else 1
    batch_bytes = cfg.train.batch_size * views * 3 * cfg.data.image_size**2  # uint8 images
    free = shared_memory_free() if free_shm is None else free_shm
    train, warning = fit_workers_to_shared_memory(workers, batch_bytes, None if free is None else free // local)
    return WorkerSplit(train, min(EVAL_WORKERS, train), warning)


def create_loaders(cfg: Config, workers: WorkerSplit, augmix_on_device: bool = False) -> Loaders:
    """The training, validation and robust-validation loaders, not yet prepared for the accelerator."""
    t, d = cfg.train, cfg.data
    train_samples, val_samples = resolve_samples(d)
    train_transform = create_train_transform(cfg.aug, d.image_size, augmix_on_device)
    train_set = ImageDataset(train_samples, train_transform, bad_images=d.bad_images, max_bad=d.max_bad_images)
    val_set = ImageDataset(
        val_samples, create_eval_transform(d.image_size), bad_images=d.bad_images, max_bad=d.max_bad_images
    )
    train_loader = create_train_loader(train_set, t.batch_size, cfg.seed, workers.train)
    val_loader = create_eval_loader(val_set, t.batch_size, workers.eval, persistent=False) if len(val_set) else None
    robust_loader = None
    if t.adv.mode != "none" and len(val_set):
        # A fixed, seeded part of the validation set: every epoch meets the same images.
        chosen = [val_set.samples[i] for i in select_subset(len(val_set), t.adv.val_images, d.split_seed)]
        robust_set = ImageDataset(chosen, create_eval_transform(d.image_size), bad_images=d.bad_images)
        robust_loader = create_eval_loader(robust_set, t.batch_size, workers.eval, persistent=False)
    return Loaders(train_loader, val_loader, robust_loader, len(train_set), len(val_set), val_set.samples)


def build_training(cfg: Config, accelerator: Accelerator) -> Training:
    """Data, loaders, model, optimizer, scheduler, loss and EMA, prepared for ``accelerator``.

    Seed before calling it: the model's initial weights come from torch's global RNG.
    """
    t = cfg.train
    on_gpu = accelerator.device.type == "cuda"
    local = local_processes(accelerator.num_processes)
    augmix_on_device = resolve_augmix_device(cfg.aug, on_gpu)
    workers = split_workers(
        cfg, resolve_num_workers(cfg.data.num_workers, on_gpu, local), local, augmix_on_device=augmix_on_device
    )
    if workers.warning:
        accelerator.print(workers.warning)
    channels_last = resolve_channels_last(cfg.model.channels_last, on_gpu)
    scaling = scale_for_batch(t, accelerator.num_processes)
    loaders = create_loaders(cfg, workers, augmix_on_device)

    updates_per_epoch = max(1, len(loaders.train) // accelerator.num_processes // t.grad_accum_steps)
    model, optimizer, scheduler = create_model_and_optimizer(
        cfg, updates_per_epoch, scaling.lr, channels_last, scaling.warmup_epochs
    )
    mixup_fn, loss_fn = create_loss(cfg)

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, loaders.train)
    val_loader = accelerator.prepare(loaders.val) if loaders.val is not None else None
    robust_loader = accelerator.prepare(loaders.robust) if loaders.robust is not None else None
    if cfg.model.compile:
        model = torch.compile(model)
    ema = None
    if t.ema:
        # Warm-up keeps the EMA useful on short runs (decay ramps up to the scaled ema_decay).
        ema = ModelEmaV3(
            accelerator.unwrap_model(model), decay=scaling.ema_decay, use_warmup=True, device=accelerator.device
        )
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
        loaders.train_size,
        loaders.val_size,
        updates_per_epoch,
        scaling=scaling,
        channels_last=channels_last,
        workers=workers.train,
        batch_augment=create_batch_augment(
            cfg.aug,
            cfg.seed,
            accelerator.process_index,
            accelerator.num_processes,
            augmix_on_device,
            cfg.data.image_size,
        ),
        teachers=load_teachers(cfg, accelerator.device, channels_last),
        score_set=create_score_set(cfg, loaders.val_samples, accelerator.process_index, accelerator.num_processes),
    )
