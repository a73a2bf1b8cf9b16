"""Section ``gpu``: convnext_tiny at 224 px on one CUDA GPU (``bench/gpu_check.sh`` runs it).

* Training images/s of a standard, an ``fgsm_rs`` and a 2-step PGD step, each with the real
  loader (decode, augment, copy to the GPU; its workers from the cores) against the same
  ``train_one_epoch`` fed batches already on the GPU (the limit). Goal: PGD-2 >= 0.9 of its limit.
* The switches, on batches already on the GPU: bf16 autocast against float32, channels_last
  against the default layout (bf16), ``model.compile`` against eager (bf16, channels_last; the
  compilation's seconds are reported, not counted).
* ``submit`` end to end (decode, resize, GCM, model, files written and validated) against the
  same network's forward on images already on the GPU. Goal: >= 0.9.

Everything runs through the stages' own functions and the run's defaults (``auto`` precision,
layout and workers). Without CUDA there is no GPU figure: the section adds one row saying so,
except with ``--quick``, where it runs its code on the CPU at the quick sizes so the tests cover
it; those rows say they are a CPU smoke run.
"""

from __future__ import annotations

import os
import time

import torch

from bench.measure import BenchContext, Row, measure_interleaved, median_rate, quiet, ratio_of
from bench.submit import create_model_only, load_test_batches, run_forward_only
from bench.training import collect_train_batches, create_training, run_train_epoch
from core.checkpoint import export_model
from core.devices import precision_name
from core.images import to_float_images
from core.model import create_classifier
from infer.submit import run as run_submit
from train.demo_data import generate_demo_data

MODES = {
    "standard": [],
    "fgsm_rs": ["train.adv.mode=fgsm_rs"],
    "pgd-2": ["train.adv.mode=pgd", "train.adv.steps=2"],
}
GOALS = {"pgd-2": (">=", 0.9)}
TEST_IMAGES = 10_000  # submit's test folder on the GPU
NOT_MEASURED = "not yet measured on a GPU: no CUDA device here (bench/gpu_check.sh runs this section on one)"


def create_gpu_data(ctx: BenchContext, on_gpu: bool) -> list[str]:
    """Overrides for the challenge-scale run (or the quick CPU smoke run): data, model, batch.

    The test folder repeats a few hundred generated PNGs (hard links) up to ``TEST_IMAGES``: submit
    then runs long enough that its fixed costs (model build, loader start, files) weigh as they
    would on the challenge's 20,000 images, without generating that many."""
    if on_gpu:
        classes, per_class, size, data_size, model, batch, tests = 100, 12, 224, 256, "convnext_tiny", 128, TEST_IMAGES
    else:
        classes, per_class, size, data_size, model, batch, tests = 4, 12, 32, 32, "test_convnext", 8, 96
    root = ctx.workdir / "gpu_data"
    generate_demo_data(root, num_classes=classes, train_per_class=per_class, test_per_class=5, image_size=data_size)
    made = sorted((root / "test").glob("*.png"))
    many = ctx.workdir / "gpu_test"
    if not many.is_dir():
        many.mkdir()
        for i in range(tests):
            os.link(made[i % len(made)], many / f"{i}.png")
    return [
        f"data.root={root}",
        f"data.test_dir={many}",
        "data.test_labels=",
        f"data.num_classes={classes}",
        f"data.image_size={size}",
        "data.val_fraction=0",
        f"model.name={model}",
        f"train.batch_size={batch}",
        f"submit.batch_size={batch}",
        "tta.hflip=false",
        "tta.scales=[1.0]",
    ]


def on_device(training, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` real augmented batches, kept on the training's device (the loader's output there)."""
    device = training.accelerator.device
    return [(x.to(device), y.to(device)) for x, y in collect_train_batches(training, count)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate_of(training, batches, epoch: int = 0) -> float:
    """Samples/s of ``train_one_epoch`` over ``batches`` (a loader, or batches on the device)."""
    value = run_train_epoch(training, batches, epoch)
    synchronize()
    return value


def bench_modes(ctx: BenchContext, base: list[str], steps: int, tag: str) -> None:
    """Per training mode: the real loader against batches already on the GPU."""
    for mode, overrides in MODES.items():
        training = create_training(ctx.config(*base, f"train.max_steps={steps}", *overrides))
        held = on_device(training, min(steps, len(training.train_loader)))
        epochs = iter(range(1, 10**6))
        r = measure_interleaved(
            {
                "loader": lambda t=training: rate_of(t, t.train_loader, next(epochs)),
                "limit": lambda t=training, h=held: rate_of(t, h),
            },
            ctx.settings.repeats,
            warmup=True,
        )
        precision = precision_name(training.accelerator.mixed_precision)
        ctx.rows.append(
            Row(
                "gpu",
                f"train {mode} step: real loader / batches already on the device{tag}",
                ratio_of(r, "loader", "limit"),
                f"{median_rate(r['loader'])} vs {median_rate(r['limit'])} img/s; batch "
                f"{training.cfg.train.batch_size}, {training.workers} loader workers, {precision}, "
                f"channels_last {training.channels_last}, {steps} steps",
                GOALS.get(mode),
            )
        )


def bench_switch(ctx: BenchContext, base: list[str], steps: int, label: str, a: list[str], b: list[str], tag: str):
    """Samples/s with overrides ``a`` over ``b`` (a standard step on batches already on the device)."""
    trainings = {k: create_training(ctx.config(*base, f"train.max_steps={steps}", *o)) for k, o in (("a", a), ("b", b))}
    held = on_device(trainings["b"], min(steps, len(trainings["b"].train_loader)))
    warm = {}
    for k, t in trainings.items():  # the first call compiles (model.compile): time it, outside the rounds
        start = time.perf_counter()
        rate_of(t, held)
        warm[k] = time.perf_counter() - start
    r = measure_interleaved({k: (lambda t=t: rate_of(t, held)) for k, t in trainings.items()}, ctx.settings.repeats)
    ctx.rows.append(
        Row(
            "gpu",
            f"{label}{tag}",
            ratio_of(r, "a", "b"),
            f"{median_rate(r['a'])} vs {median_rate(r['b'])} img/s (> 1 is faster); first call {warm['a']:.1f} vs "
            f"{warm['b']:.1f} s; {steps} steps of batch {trainings['a'].cfg.train.batch_size}",
        )
    )


def step_rate(training, batches, steps: int, dtype: torch.dtype | None) -> float:
    """Samples/s of a bare forward + backward + optimizer step loop, under autocast to ``dtype``
    (None: float32), on batches already on the device."""
    model, optimizer, loss_fn = training.model, training.optimizer, training.loss_fn
    device = training.accelerator.device
    model.train()
    n = 0
    synchronize()
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n += x.shape[0]
    synchronize()
    return n / (time.perf_counter() - start)


def bench_precision(ctx: BenchContext, base: list[str], steps: int, tag: str) -> None:
    """bf16 autocast against float32: the same model and batches in a bare step loop (one process
    holds one accelerate precision, so the two cannot be two trainings side by side)."""
    training = create_training(ctx.config(*base, f"train.max_steps={steps}", "train.mixed_precision=no"))
    held = [
        (to_float_images(x, training.channels_last), y)
        for x, y in on_device(training, min(steps, len(training.train_loader)))
    ]
    r = measure_interleaved(
        {
            "bf16": lambda: step_rate(training, held, steps, torch.bfloat16),
            "fp32": lambda: step_rate(training, held, steps, None),
        },
        ctx.settings.repeats,
        warmup=True,
    )
    ctx.rows.append(
        Row(
            "gpu",
            f"bf16 autocast / float32 (standard step){tag}",
            ratio_of(r, "bf16", "fp32"),
            f"{median_rate(r['bf16'])} vs {median_rate(r['fp32'])} img/s (> 1 is faster; float32 with TF32 matmuls); "
            f"bare fwd+bwd+step, {steps} steps of batch {training.cfg.train.batch_size}",
        )
    )


def bench_submit_gpu(ctx: BenchContext, base: list[str], tag: str) -> None:
    """``submit`` end to end against the network's forward over images already on the device."""
    cfg = ctx.config(*base)
    torch.manual_seed(0)
    stem = ctx.workdir / "gpu_model"
    export_model(
        create_classifier(cfg.model, cfg.data.num_classes).eval(),
        stem,
        {"arch": cfg.model.name, "num_classes": cfg.data.num_classes, "image_size": cfg.data.image_size},
    )
    test_dir = ctx.workdir / "gpu_test"
    submit_cfg = ctx.config(*base, f"submit.checkpoints=[{stem}]")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model_only(stem, cfg).to(device)
    batches = [b.to(device) for b in load_test_batches(test_dir, cfg.data.image_size, cfg.submit.batch_size)]
    n = sum(b.shape[0] for b in batches)

    def submit() -> float:
        start = time.perf_counter()
        with quiet():
            result = run_submit(submit_cfg)
        return result["n_images"] / (time.perf_counter() - start)

    def limit() -> float:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast:
            rate = run_forward_only(model, batches)
        synchronize()
        return rate

    r = measure_interleaved({"submit": submit, "limit": limit}, ctx.settings.repeats, warmup=True)
    ctx.rows.append(
        Row(
            "gpu",
            f"submit end to end / model-only forward{tag}",
            ratio_of(r, "submit", "limit"),
            f"{median_rate(r['submit'])} vs {median_rate(r['limit'])} img/s; {n} PNGs of {cfg.data.image_size} px, "
            f"batch {cfg.submit.batch_size}; model-only: the network alone on the device"
            f"{' in bf16 autocast' if device.type == 'cuda' else ''}",
            (">=", 0.9),
        )
    )


def bench_gpu(ctx: BenchContext) -> None:
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not ctx.settings.quick:
        ctx.rows.append(Row("gpu", "GPU figures", float("nan"), NOT_MEASURED))
        return
    tag = "" if on_gpu else " (CPU smoke run: not a GPU figure)"
    base = create_gpu_data(ctx, on_gpu)
    steps = 20 if on_gpu else 2
    bench_modes(ctx, base, steps, tag)
    bench_precision(ctx, base, steps, tag)
    bench_switch(
        ctx, base, steps, "channels_last / default layout (standard step)", ["model.channels_last=true"],
        ["model.channels_last=false"], tag,
    )  # fmt: skip
    if on_gpu:  # compiling on a CPU takes minutes and says nothing about a GPU
        bench_switch(
            ctx, base, steps, "model.compile / eager (standard step)", ["model.compile=true"], ["model.compile=false"],
            tag,
        )  # fmt: skip
    bench_submit_gpu(ctx, base, tag)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
        ctx.rows.append(Row("gpu", "peak GPU memory (max_memory_allocated)", peak, "every run above", unit="MB"))
