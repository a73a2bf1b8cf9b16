"""Section ``train``: training with its real loader against a model-only step loop, and peak memory."""

from __future__ import annotations

import gc
import multiprocessing
import resource
import statistics
import time
from typing import Sequence

import torch
import yaml

from bench.measure import BenchContext, Row, measure_interleaved, median_rate, quiet, ratio_of
from core.config import load_config
from core.images import to_float_images
from train.engine import Progress, train_one_epoch
from train.setup import Training, build_training, create_accelerator


def create_training(cfg) -> Training:
    """What ``train.main.run`` trains with, built by its own ``build_training`` (no run folder,
    tracking or checkpoints); ``train.max_steps`` bounds each timed run."""
    torch.manual_seed(cfg.seed)
    return build_training(cfg, create_accelerator(cfg))


def run_train_epoch(training: Training, loader, epoch: int) -> float:
    """Samples/s of ``train_one_epoch`` for ``train.max_steps`` optimizer steps (its own timer)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)  # new augmentations every run, as in training
    with quiet():
        stats = train_one_epoch(training, loader, Progress(), epoch)
    return stats["samples_per_s"]


def run_train_step_only(parts: Training, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int) -> float:
    """Samples/s of a bare forward + backward + optimizer step loop on in-memory tensors."""
    model, optimizer, loss_fn = parts.model, parts.optimizer, parts.loss_fn
    model.train()
    n = 0
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def collect_train_batches(parts: Training, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few real augmented batches from the real loader, kept as uint8 in memory."""
    batches = []
    for images, targets in parts.train_loader:
        batches.append((images.clone(), targets.clone()))
        if len(batches) == count:
            break
    return batches


def _memory_probe(overrides: list[str], steps: int, out: multiprocessing.Queue) -> None:
    """Child process: train ``steps`` steps with the real loader, report peak RSS (kB)."""
    parts = create_training(load_config(None, [*overrides, f"train.max_steps={steps}"]))
    run_train_epoch(parts, parts.train_loader, 0)
    del parts  # shuts the persistent workers down, so they count as waited-for children

    gc.collect()
    out.put(
        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    )


def measure_train_peak_memory(ctx: BenchContext) -> tuple[float, float]:
    """Peak resident memory (MB) of a fresh training process and of its largest loader worker."""
    mp = multiprocessing.get_context("spawn")
    queue = mp.Queue()
    proc = mp.Process(target=_memory_probe, args=(ctx.overrides, ctx.settings.train_steps, queue))
    proc.start()
    try:
        main_kb, child_kb = queue.get(timeout=600)
    finally:
        proc.join(timeout=60)
    return main_kb / 1024, child_kb / 1024


def time_training(parts: Training, steps: int, repeats: int, engine: bool = False) -> dict[str, list[float]]:
    """Samples/s per round of the real pipeline (``pipeline``), of a bare fwd+bwd+step loop on
    the same batches already in memory (``limit``) and, with ``engine``, of ``train_one_epoch``
    on those in-memory batches (``engine``), measured interleaved after one warm-up each."""
    raw = collect_train_batches(parts, min(steps, len(parts.train_loader)))
    floats = [(to_float_images(x, parts.channels_last), y) for x, y in raw]
    epoch = iter(range(1, 10**6))
    fns = {
        "pipeline": lambda: run_train_epoch(parts, parts.train_loader, next(epoch)),
        "limit": lambda: run_train_step_only(parts, floats, steps),
    }
    if engine:
        fns["engine"] = lambda: run_train_epoch(parts, raw, 0)
    return measure_interleaved(fns, repeats, warmup=True)


def bench_train_variant(ctx: BenchContext, label: str, *overrides: str) -> None:
    """The pipeline / model-only comparison again with ``overrides`` (e.g. a costlier augmentation)."""
    steps = ctx.settings.train_steps
    r = time_training(create_training(ctx.config(*overrides, f"train.max_steps={steps}")), steps, ctx.settings.repeats)
    ctx.rows.append(
        Row(
            "train",
            f"train {label} / model-only fwd+bwd+step",
            ratio_of(r, "pipeline", "limit"),
            f"{median_rate(r['pipeline'])} vs {median_rate(r['limit'])} samples/s",
        )
    )


def with_random_fog(cfg) -> str | None:
    """An ``aug.corruptions`` override with A.RandomFog in place of the default fog, or None.

    The default family used A.RandomFog until the bench showed its cost: in albumentations
    2.0.8 it draws each fog particle with its own ``cv2.addWeighted``, far dearer than any other
    corruption. The row keeps that cost visible next to the default.
    """
    names = [c.get("name") for c in cfg.aug.corruptions]
    if "PlasmaBrightnessContrast" not in names:
        return None
    swapped = [
        c if c.get("name") != "PlasmaBrightnessContrast" else {"name": "RandomFog", "fog_coef_range": [0.1, 0.3]}
        for c in cfg.aug.corruptions
    ]
    return "aug.corruptions=" + yaml.safe_dump(swapped, default_flow_style=True, width=10**6).strip()


def bench_train(ctx: BenchContext) -> None:
    cfg = ctx.config()
    steps = ctx.settings.train_steps
    training = create_training(ctx.config(f"train.max_steps={steps}"))
    r = time_training(training, steps, ctx.settings.repeats, engine=True)
    threads = torch.get_num_threads()
    common = f"batch {cfg.train.batch_size}, {training.workers} workers, {steps} steps, {threads} threads"
    ctx.rows.append(
        Row(
            "train",
            "train (real loader + augmentations) / model-only fwd+bwd+step",
            ratio_of(r, "pipeline", "limit"),
            f"{statistics.median(r['pipeline']):.0f} vs {statistics.median(r['limit']):.0f} samples/s; {common}",
            (">=", 0.9),
        )
    )
    ctx.rows.append(
        Row(
            "train",
            "train_one_epoch on in-memory batches / model-only (engine: EMA, sync, sched)",
            ratio_of(r, "engine", "limit"),
            f"{statistics.median(r['engine']):.0f} vs {statistics.median(r['limit']):.0f} samples/s",
        )
    )
    ctx.rows.append(
        Row(
            "train",
            "train (real loader) / train_one_epoch on in-memory batches (data loading)",
            ratio_of(r, "pipeline", "engine"),
            f"{statistics.median(r['pipeline']):.0f} vs {statistics.median(r['engine']):.0f} samples/s",
        )
    )
    fog = with_random_fog(cfg)
    if fog is not None:
        bench_train_variant(ctx, "with A.RandomFog as the fog corruption (the earlier default)", fog)
    bench_adversarial(ctx)
    bench_augmix_loader(ctx)
    main_mb, worker_mb = measure_train_peak_memory(ctx)
    ctx.rows.append(
        Row(
            "train",
            "peak RSS of a training process (ru_maxrss, main)",
            main_mb,
            f"fresh process, {steps} steps; largest loader worker {worker_mb:.0f} MB (RUSAGE_CHILDREN)",
            unit="MB",
        )
    )


# The adversarial modes timed against standard training, with their goals (k = PGD steps).
ADVERSARIAL_MODES = {
    "fgsm_reg": (["train.adv.mode=fgsm_reg"], None),
    "fgsm_rs": (["train.adv.mode=fgsm_rs"], ("<=", 2.2)),
    "pgd": (["train.adv.mode=pgd", "train.adv.steps=3"], ("<=", 1.1 * (3 + 1))),
    "trades": (["train.adv.mode=trades", "train.adv.steps=3"], None),
}


def bench_adversarial(ctx: BenchContext) -> None:
    """Time per optimizer step of each ``train.adv.mode`` / standard training, on the same batches.

    ``train_one_epoch`` on augmented batches held in memory, so the loader (the same for every
    mode) does not blur the ratio; robust validation runs once per epoch and is not in it.
    """
    steps = ctx.settings.train_steps
    r = time_step_variants(ctx, [], {mode: overrides for mode, (overrides, _) in ADVERSARIAL_MODES.items()})
    for mode, (overrides, goal) in ADVERSARIAL_MODES.items():
        ctx.rows.append(
            Row(
                "train",
                f"train.adv.mode={mode} step / standard step (time)",
                ratio_of(r, "base", mode),  # samples/s of standard over the mode's: its cost per step
                f"{median_rate(r[mode])} vs {median_rate(r['base'])} samples/s; "
                + "".join(f"{o.split('.')[-1]}, " for o in overrides[1:])
                + f"{steps} optimizer steps on the same batches",
                goal,
            )
        )


def time_step_variants(ctx: BenchContext, base: list[str], variants: dict[str, list[str]]) -> dict[str, list[float]]:
    """Samples/s of ``train_one_epoch`` with ``base`` (key ``base``) and with each variant's overrides
    on top of it, interleaved, on the same augmented batches held in memory (the loader is out of
    the ratio; what a variant does on the device, its device augmentations included, is in it)."""
    steps = ctx.settings.train_steps
    first = create_training(ctx.config(f"train.max_steps={steps}", *base))
    raw = collect_train_batches(first, min(steps, len(first.train_loader)))
    trainings = {"base": first}
    for name, overrides in variants.items():
        trainings[name] = create_training(ctx.config(f"train.max_steps={steps}", *base, *overrides))
    return measure_interleaved(
        {k: (lambda t=t: run_train_epoch(t, raw, 0)) for k, t in trainings.items()}, ctx.settings.repeats, warmup=True
    )


def run_loader(training: Training, batches: int, epoch: int) -> float:
    """Samples/s of the training loader alone (decode + augmentations, no model) over ``batches`` batches."""
    loader = training.train_loader
    loader.set_epoch(epoch)
    n = 0
    start = time.perf_counter()
    for i, (images, _) in enumerate(loader):
        n += images.shape[0]
        if i + 1 == batches:
            break
    return n / (time.perf_counter() - start)


# AugMix's loaders timed against the standard one (aug.augmix); the model is not in the ratio.
AUGMIX_LOADERS = {
    "AugMix (one view)": ["aug.augmix.enabled=true"],
    "AugMix + JSD (clean + 2 views)": ["aug.augmix.enabled=true", "aug.augmix.jsd_weight=12"],
}


def bench_augmix_loader(ctx: BenchContext) -> None:
    """Time per image of the training loader with AugMix / without, same data, workers and batch size."""
    steps = ctx.settings.train_steps
    trainings = {"standard": create_training(ctx.config(f"train.max_steps={steps}"))}
    for label, overrides in AUGMIX_LOADERS.items():
        trainings[label] = create_training(ctx.config(f"train.max_steps={steps}", *overrides))
    epochs = iter(range(1, 10**6))
    r = measure_interleaved(
        {k: (lambda t=t: run_loader(t, steps, next(epochs))) for k, t in trainings.items()},
        ctx.settings.repeats,
        warmup=True,
    )
    standard = trainings["standard"]
    for label, overrides in AUGMIX_LOADERS.items():
        ctx.rows.append(
            Row(
                "train",
                f"training loader with {label} / standard loader (time per image)",
                ratio_of(r, "standard", label),  # samples/s of the standard loader over AugMix's
                f"{median_rate(r[label])} vs {median_rate(r['standard'])} samples/s; loader only, "
                f"{standard.workers} workers, batch {standard.cfg.train.batch_size}, {steps} batches",
            )
        )
