"""``./run.sh bench``: performance figures as ratios measured side by side on this machine.

Absolute times on a shared 2-core CPU drift by tens of percent from one minute to the next,
so every figure here is a *ratio* of two things measured in the same run, interleaved
(A, B, A, B, ... with the order rotated every round) and summarised by the median of the
per-round ratios. Each row says what was compared, the goal it is held to and PASS/FAIL.

Everything runs on the real code paths with real configs (``train.config.load_config``):

* ``submit``: ``infer.submit.run`` end to end (decode, resize, GCM, model, TTA, CSV/JSON/meta
  written and validated) against (a) the same model's forward on the same images already in
  memory as float tensors (the limit) and (b) a loop written the way timm's ``inference.py``
  does it (``create_dataset`` / ``create_loader`` with its prefetcher, ``inference_mode``,
  softmax + top-1, CSV) on the same checkpoint, images, batch size, workers and threads.
* ``train``: ``train.engine.train_one_epoch`` fed by the real loader (``create_train_loader``,
  decoding and the configured augmentations) against a model-only forward + backward +
  optimizer step loop on in-memory tensors, plus the peak memory of a training process.
* ``parts``: GCM against one forward; k TTA views batched against k single-view forwards; an
  ensemble of m members against the sum of its members.
* ``scaling``: submit and training throughput against batch size and DataLoader workers, and
  a 2-process CPU training run (``python -m train.launch train.main --num_processes 2``)
  against 1 process.

The data are the built-in demo set (generated into the work folder) and a randomly
initialised checkpoint of the demo model exported with ``train.checkpoint.export_model``:
throughput does not depend on the weights.

Usage::

    ./run.sh bench                          # full run (~5-8 min on 2 cores)
    ./run.sh bench --quick                  # tiny sizes, one round (what the test runs)
    ./run.sh bench --only submit,parts      # some sections
    ./run.sh bench --write BENCHMARKS.md    # also write the Markdown report
    ./run.sh bench model.channels_last=true # config overrides apply to every measurement
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import multiprocessing
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import timm
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("submit", "train", "parts", "scaling", "compile")
DEFAULT_SECTIONS = ("submit", "train", "parts", "scaling")  # compile: opt-in, ~1 min of compilation
MARK_BEGIN = "<!-- bench:begin -->"
MARK_END = "<!-- bench:end -->"


# --------------------------------------------------------------------------- settings


@dataclass
class BenchSettings:
    """Sizes of one bench run (``--quick`` shrinks all of them)."""

    quick: bool = False
    repeats: int = 3
    num_classes: int = 10
    image_size: int = 64
    train_per_class: int = 200
    test_per_class: int = 200
    train_steps: int = 20  # optimizer steps per timed training run
    batch_sizes: tuple = (16, 32, 64, 128)
    worker_counts: tuple = (0, 1, 2, 3)
    tta_views: int = 4  # scales [1.0, 0.9] x hflip
    members: int = 2
    model_overrides: tuple = ()  # config overrides that pick the model

    @classmethod
    def create(cls, quick: bool, repeats: int | None) -> "BenchSettings":
        if not quick:
            return cls(repeats=repeats or 3)
        return cls(quick=True, repeats=repeats or 1, num_classes=4, image_size=32, train_per_class=24,
                   test_per_class=24, train_steps=3, batch_sizes=(8, 16), worker_counts=(0, 1),
                   model_overrides=("model.name=test_convnext", "train.batch_size=16", "submit.batch_size=16"))


@dataclass
class Row:
    """One line of the report: a ratio, what it compares, and the goal it is held to."""

    section: str
    name: str
    value: float
    detail: str
    goal: tuple[str, float] | None = None  # (">=", 0.9), ("<", 0.01), ("<=", 1.05)
    unit: str = "x"  # "x" ratio, "%" percent, "MB" memory

    @property
    def passed(self) -> bool | None:
        if self.goal is None or self.value != self.value:  # NaN: not measured
            return None
        op, bound = self.goal
        return {">=": self.value >= bound, "<": self.value < bound, "<=": self.value <= bound}[op]

    def formatted_value(self) -> str:
        if self.value != self.value:
            return "n/a"
        if self.unit == "%":
            return f"{100 * self.value:.2f}%"
        if self.unit == "MB":
            return f"{self.value:.0f} MB"
        return f"{self.value:.3f}"

    def formatted_goal(self) -> str:
        if self.goal is None:
            return ""
        op, bound = self.goal
        return f"{op} {100 * bound:g}%" if self.unit == "%" else f"{op} {bound:g}"

    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: ""}[self.passed]


@dataclass
class BenchContext:
    """Everything the sections share: work folder, data, checkpoint, base overrides."""

    settings: BenchSettings
    workdir: Path
    overrides: list[str]  # base overrides (data, output folders) + the user's
    checkpoint: Path
    test_dir: Path
    rows: list[Row] = field(default_factory=list)

    def config(self, *extra: str):
        from train.config import load_config

        return load_config(None, [*self.overrides, *extra])


# --------------------------------------------------------------------------- measuring


def median_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    """Median over rounds of ``a / b``: each round's pair was measured side by side."""
    return statistics.median(a / b for a, b in pairs)


def measure_interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each function once per round, rotating the order every round; returns all results.

    Rotation spreads slow drifts (other jobs on the machine, thermal limits) over every
    candidate instead of always penalising the one that runs last.
    """
    names = list(fns)
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(fns[name]())
    return results


def time_call(fn: Callable[[], object], number: int = 1) -> float:
    """Seconds per call of ``fn`` (``number`` calls in a row)."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


@contextlib.contextmanager
def quiet() -> Iterable[None]:
    """Swallow the measured code's console output (progress bars, result lines)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def describe_machine() -> dict:
    """CPU model, cores, torch threads and versions: the context every ratio depends on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = float("nan")
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem_gb = kb / 2**20
    except (OSError, AttributeError):
        pass
    from train.launch import available_cores

    cores = available_cores()
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gb": round(mem_gb, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else (),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


# --------------------------------------------------------------------------- setup


def prepare_context(workdir: Path, settings: BenchSettings, user_overrides: Sequence[str]) -> BenchContext:
    """Generate the demo data and export a random checkpoint of the configured model."""
    from train.checkpoint import export_model
    from train.config import load_config
    from train.demo_data import generate_demo_data
    from train.model import create_classifier

    s = settings
    data = workdir / "data"
    generate_demo_data(data, num_classes=s.num_classes, train_per_class=s.train_per_class,
                       test_per_class=s.test_per_class, image_size=s.image_size)
    overrides = [
        f"data.root={data}", "data.demo=false", "data.train_dir=train", "data.train_labels=label.txt",
        "data.test_dir=test", "data.test_labels=test_labels.txt", f"data.num_classes={s.num_classes}",
        f"data.image_size={s.image_size}", f"out_dir={workdir / 'runs'}", "name=bench", "wandb.mode=disabled",
        f"submit.out_dir={workdir / 'submissions'}", *s.model_overrides, *user_overrides,
    ]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = create_classifier(cfg.model, cfg.data.num_classes).eval()
    stem = cfg.run_dir / "best"
    stem.parent.mkdir(parents=True, exist_ok=True)
    export_model(model, stem, {"arch": cfg.model.name, "num_classes": cfg.data.num_classes,
                               "image_size": cfg.data.image_size})
    return BenchContext(s, workdir, overrides, stem, data / "test")


# --------------------------------------------------------------------------- submit


def run_submit(ctx: BenchContext, *extra: str) -> float:
    """Images/s of ``infer.submit.run`` end to end (model load to validated files)."""
    from infer import submit

    cfg = ctx.config(*extra)
    start = time.perf_counter()
    with quiet():
        result = submit.run(cfg)
    return result["n_images"] / (time.perf_counter() - start)


def load_test_batches(test_dir: Path, image_size: int, batch_size: int) -> list[torch.Tensor]:
    """The test images decoded and resized exactly as submit does, as float batches in memory."""
    from infer.submit import TestImages
    from train.data import list_test_images
    from train.engine import to_float_images

    dataset = TestImages(list_test_images(test_dir), image_size)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return [to_float_images(chunk).clone() for chunk in images.split(batch_size)]


def create_model_only(checkpoint: Path, cfg) -> nn.Module:
    """The bare network (normalization + timm backbone) with the config's layout and compile."""
    from train.checkpoint import load_model

    model, _ = load_model(checkpoint)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.model.compile else model


def run_forward_only(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Images/s of the bare model forward over batches already in memory (the limit)."""
    n = sum(b.shape[0] for b in batches)
    with torch.inference_mode():
        seconds = time_call(lambda: [model(b) for b in batches])
    return n / seconds


def create_predictor(cfg, checkpoint: Path, test_dir: Path):
    """``(model, loader, accelerator)`` built by the functions ``infer.submit.run`` uses."""
    from infer.defended import input_size_of
    from infer.submit import create_accelerator, create_model, create_test_loader
    from train.data import list_test_images

    accelerator = create_accelerator(cfg)
    model, infos = create_model(cfg, [checkpoint], accelerator)
    loader = create_test_loader(cfg, list_test_images(test_dir), input_size_of(infos), accelerator)
    return model, loader, accelerator


def run_predict_loop(predictor) -> float:
    """Images/s of ``infer.submit.predict`` alone: decode, resize, GCM, model, TTA, argmax."""
    from infer.submit import predict

    model, loader, accelerator = predictor
    start = time.perf_counter()
    with quiet():
        ids, _, _ = predict(model, loader, accelerator)
    return len(ids) / (time.perf_counter() - start)


def run_timm_style_inference(checkpoint: Path, test_dir: Path, out_csv: Path, batch_size: int,
                             num_workers: int, channels_last: bool = False) -> float:
    """Images/s of the loop timm's ``inference.py`` runs, on our checkpoint and test folder.

    As in that script: ``create_model`` + the weights, ``resolve_data_config``,
    ``create_dataset`` on the folder, ``create_loader`` with its prefetcher (uint8 collate,
    normalization on the device), ``inference_mode`` forward, softmax, top-1, and the
    results written as CSV (with the csv module: timm uses pandas, which is not installed).
    Normalization moves from our model into timm's loader, so the network work is the same.
    """
    from safetensors.torch import load_file
    from timm.data import create_dataset, create_loader, resolve_data_config

    from train.checkpoint import read_checkpoint_info, resolve_checkpoint

    start = time.perf_counter()
    weights, info_path = resolve_checkpoint(checkpoint)
    info = read_checkpoint_info(info_path)
    model = timm.create_model(info["arch"], num_classes=int(info["num_classes"]))
    state = load_file(str(weights))
    model.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = int(info["image_size"])
    data_config = resolve_data_config({
        "input_size": (3, size, size), "crop_pct": 1.0, "interpolation": "bilinear",
        "mean": tuple(info["mean"] or (0.0, 0.0, 0.0)), "std": tuple(info["std"] or (1.0, 1.0, 1.0)),
    }, model=model)
    dataset = create_dataset(name="", root=str(test_dir), split="")
    loader = create_loader(dataset, batch_size=batch_size, use_prefetcher=True, num_workers=num_workers,
                           device=torch.device("cpu"), **data_config)
    top1 = []
    with torch.inference_mode():
        for images, _ in loader:
            output = model(images).softmax(-1)
            _, indices = output.topk(1)
            top1.append(indices.cpu().numpy())
    names = loader.dataset.filenames(basename=True)
    with open(out_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "category_id"])
        for name, idx in zip(names, (int(i) for batch in top1 for i in batch[:, 0])):
            writer.writerow([Path(name).stem, idx])
    return len(names) / (time.perf_counter() - start)


def _img_s(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.0f}"


def bench_submit(ctx: BenchContext) -> None:
    cfg = ctx.config()
    bs = cfg.submit.batch_size
    from infer.submit import resolve_loader_workers

    batches = load_test_batches(ctx.test_dir, ctx.settings.image_size, bs)
    model = create_model_only(ctx.checkpoint, cfg)
    predictor = create_predictor(cfg, ctx.checkpoint, ctx.test_dir)
    used_workers = resolve_loader_workers(cfg, predictor[2])
    out_csv = ctx.workdir / "timm_inference.csv"

    def timm_loop(workers: int) -> Callable[[], float]:
        return lambda: run_timm_style_inference(ctx.checkpoint, ctx.test_dir, out_csv, bs, workers,
                                                cfg.model.channels_last)

    fns = {"submit": lambda: run_submit(ctx), "limit": lambda: run_forward_only(model, batches),
           "predict": lambda: run_predict_loop(predictor),
           "timm": timm_loop(cfg.submit.num_workers), "timm_same": timm_loop(used_workers)}
    for fn in fns.values():  # warm-up: lazy imports, oneDNN kernels, first-use allocations
        fn()
    r = measure_interleaved(fns, ctx.settings.repeats)
    n = sum(b.shape[0] for b in batches)
    common = (f"{n} images of {ctx.settings.image_size} px, batch {bs}, {torch.get_num_threads()} threads, "
              f"submit loader workers {used_workers}")
    ctx.rows.append(Row("submit", "submit end to end / model-only forward", median_ratio(list(zip(r["submit"], r["limit"]))),
                        f"{_img_s(r['submit'])} vs {_img_s(r['limit'])} img/s; {common}", (">=", 0.9)))
    ctx.rows.append(Row("submit", f"submit end to end / timm inference.py loop (-j {cfg.submit.num_workers})",
                        median_ratio(list(zip(r["submit"], r["timm"]))),
                        f"{_img_s(r['submit'])} vs {_img_s(r['timm'])} img/s; timm with its default "
                        f"{cfg.submit.num_workers} workers (= submit.num_workers)", (">=", 1.0)))
    if used_workers != cfg.submit.num_workers:
        ctx.rows.append(Row("submit", f"submit end to end / timm inference.py loop (-j {used_workers})",
                            median_ratio(list(zip(r["submit"], r["timm_same"]))),
                            f"{_img_s(r['submit'])} vs {_img_s(r['timm_same'])} img/s; timm with the worker "
                            "count submit uses here", (">=", 1.0)))
    ctx.rows.append(Row("submit", "predict loop (no set-up, no files) / model-only forward",
                        median_ratio(list(zip(r["predict"], r["limit"]))),
                        f"{_img_s(r['predict'])} vs {_img_s(r['limit'])} img/s: decode+resize+GCM+model+argmax"))
    if not ctx.settings.quick:
        bench_submit_at_scale(ctx)


def bench_submit_at_scale(ctx: BenchContext) -> None:
    """The predict loop at the challenge's scale: convnext_tiny on 224 px PNGs.

    The demo network is ~8x cheaper per pixel, which makes decoding look 8x dearer than it
    is in the challenge; this row shows the share at the real size (fewer images: a forward
    costs ~40 ms per image here).
    """
    from train.checkpoint import export_model
    from train.demo_data import generate_demo_data
    from train.model import create_classifier

    root = ctx.workdir / "data224"
    generate_demo_data(root, num_classes=10, train_per_class=1, test_per_class=8, image_size=224)
    cfg = ctx.config(f"data.root={root}", "data.image_size=224", "model.name=convnext_tiny", "submit.batch_size=16",
                     "tta.hflip=false", "tta.scales=[1.0]")
    torch.manual_seed(0)
    stem = ctx.workdir / "convnext_tiny_224"
    export_model(create_classifier(cfg.model, cfg.data.num_classes).eval(), stem,
                 {"arch": cfg.model.name, "num_classes": cfg.data.num_classes, "image_size": 224})
    batches = load_test_batches(root / "test", 224, cfg.submit.batch_size)
    model = create_model_only(stem, cfg)
    predictor = create_predictor(cfg, stem, root / "test")
    fns = {"predict": lambda: run_predict_loop(predictor), "limit": lambda: run_forward_only(model, batches)}
    for fn in fns.values():
        fn()
    r = measure_interleaved(fns, ctx.settings.repeats)
    ctx.rows.append(Row("submit", "predict loop / model-only forward, convnext_tiny at 224 px (challenge scale)",
                        median_ratio(list(zip(r["predict"], r["limit"]))),
                        f"{statistics.median(r['predict']):.1f} vs {statistics.median(r['limit']):.1f} img/s, "
                        f"{sum(b.shape[0] for b in batches)} PNGs, batch {cfg.submit.batch_size}", (">=", 0.9)))


# --------------------------------------------------------------------------- train


@dataclass
class TrainingParts:
    """What ``train.main.run`` builds before its epoch loop, built the same way."""

    accelerator: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: Callable
    loader: object
    mixup_fn: Callable | None
    ema: object
    cfg: object


def create_training(cfg) -> TrainingParts:
    """What ``train.main.run`` builds before its epoch loop, with its own functions (no run
    folder, tracking or checkpoints)."""
    from timm.utils import ModelEmaV3

    from train.data import ImageDataset, resolve_samples
    from train.loaders import create_train_loader
    from train.main import create_accelerator, create_loss, create_model_and_optimizer
    from train.transforms import create_train_transform

    t = cfg.train
    accelerator = create_accelerator(cfg, None)
    train_samples, _ = resolve_samples(cfg.data)
    dataset = ImageDataset(train_samples, create_train_transform(cfg.aug, cfg.data.image_size),
                           bad_images=cfg.data.bad_images, max_bad=cfg.data.max_bad_images)
    loader = create_train_loader(dataset, t.batch_size, cfg.seed, cfg.data.num_workers)
    torch.manual_seed(cfg.seed)
    model, optimizer, scheduler = create_model_and_optimizer(cfg, max(1, len(loader)))
    mixup_fn, loss_fn = create_loss(cfg)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=t.ema_decay, use_warmup=True,
                     device=accelerator.device) if t.ema else None
    return TrainingParts(accelerator, model, optimizer, scheduler, loss_fn, loader, mixup_fn, ema, cfg)


def run_train_epoch(parts: TrainingParts, loader, steps: int, epoch: int) -> float:
    """Samples/s of ``train_one_epoch`` for ``steps`` optimizer steps (its own timer)."""
    from train.engine import Progress, train_one_epoch

    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)  # new augmentations every run, as in training
    with quiet():
        stats = train_one_epoch(parts.model, loader, parts.optimizer, parts.scheduler, parts.loss_fn,
                                parts.accelerator, Progress(), epoch=epoch, mixup_fn=parts.mixup_fn, ema=parts.ema,
                                clip_grad=parts.cfg.train.clip_grad, adv_eps=parts.cfg.train.adv_eps,
                                adv_weight=parts.cfg.train.adv_weight, channels_last=parts.cfg.model.channels_last,
                                max_steps=steps)
    return stats["samples_per_s"]


def run_train_step_only(parts: TrainingParts, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        steps: int) -> float:
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


def collect_train_batches(parts: TrainingParts, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few real augmented batches from the real loader, kept as uint8 in memory."""
    batches = []
    for images, targets in parts.loader:
        batches.append((images.clone(), targets.clone()))
        if len(batches) == count:
            break
    return batches


def _memory_probe(overrides: list[str], steps: int, out: multiprocessing.Queue) -> None:
    """Child process: train ``steps`` steps with the real loader, report peak RSS (kB)."""
    from train.config import load_config

    parts = create_training(load_config(None, overrides))
    run_train_epoch(parts, parts.loader, steps, 0)
    del parts  # shuts the persistent workers down, so they count as waited-for children
    import gc

    gc.collect()
    out.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))


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


def time_training(parts: TrainingParts, steps: int, repeats: int, engine: bool = False) -> dict[str, list[float]]:
    """Samples/s per round of the real pipeline (``pipeline``), of a bare fwd+bwd+step loop on
    the same batches already in memory (``limit``) and, with ``engine``, of ``train_one_epoch``
    on those in-memory batches (``engine``), measured interleaved after one warm-up each."""
    from train.engine import to_float_images

    raw = collect_train_batches(parts, min(steps, len(parts.loader)))
    floats = [(to_float_images(x, parts.cfg.model.channels_last), y) for x, y in raw]
    epoch = iter(range(1, 10**6))
    fns = {"pipeline": lambda: run_train_epoch(parts, parts.loader, steps, next(epoch)),
           "limit": lambda: run_train_step_only(parts, floats, steps)}
    if engine:
        fns["engine"] = lambda: run_train_epoch(parts, raw, steps, 0)
    for fn in fns.values():
        fn()
    return measure_interleaved(fns, repeats)


def bench_train_variant(ctx: BenchContext, label: str, *overrides: str) -> None:
    """The pipeline / model-only comparison again with ``overrides`` (e.g. a costlier augmentation)."""
    r = time_training(create_training(ctx.config(*overrides)), ctx.settings.train_steps, ctx.settings.repeats)
    ctx.rows.append(Row("train", f"train {label} / model-only fwd+bwd+step",
                        median_ratio(list(zip(r["pipeline"], r["limit"]))),
                        f"{_img_s(r['pipeline'])} vs {_img_s(r['limit'])} samples/s"))


def with_random_fog(cfg) -> str | None:
    """An ``aug.corruptions`` override with A.RandomFog in place of the default fog, or None.

    The default family used A.RandomFog until the bench showed its cost: in albumentations
    2.0.8 it draws each fog particle with its own ``cv2.addWeighted`` (~17 ms per 64 px image,
    ~70x any other corruption). The row keeps that cost visible next to the default.
    """
    import yaml

    names = [c.get("name") for c in cfg.aug.corruptions]
    if "PlasmaBrightnessContrast" not in names:
        return None
    swapped = [c if c.get("name") != "PlasmaBrightnessContrast" else {"name": "RandomFog", "fog_coef_range": [0.1, 0.3]}
               for c in cfg.aug.corruptions]
    return "aug.corruptions=" + yaml.safe_dump(swapped, default_flow_style=True, width=10**6).strip()


def bench_train(ctx: BenchContext) -> None:
    cfg = ctx.config()
    steps = ctx.settings.train_steps
    r = time_training(create_training(cfg), steps, ctx.settings.repeats, engine=True)
    common = (f"batch {cfg.train.batch_size}, {cfg.data.num_workers} workers, {steps} steps, "
              f"{torch.get_num_threads()} threads")
    ctx.rows.append(Row("train", "train (real loader + augmentations) / model-only fwd+bwd+step",
                        median_ratio(list(zip(r["pipeline"], r["limit"]))),
                        f"{statistics.median(r['pipeline']):.0f} vs {statistics.median(r['limit']):.0f} samples/s; {common}",
                        (">=", 0.9)))
    ctx.rows.append(Row("train", "train_one_epoch on in-memory batches / model-only (engine: EMA, sync, sched)",
                        median_ratio(list(zip(r["engine"], r["limit"]))),
                        f"{statistics.median(r['engine']):.0f} vs {statistics.median(r['limit']):.0f} samples/s"))
    ctx.rows.append(Row("train", "train (real loader) / train_one_epoch on in-memory batches (data loading)",
                        median_ratio(list(zip(r["pipeline"], r["engine"]))),
                        f"{statistics.median(r['pipeline']):.0f} vs {statistics.median(r['engine']):.0f} samples/s"))
    fog = with_random_fog(cfg)
    if fog is not None:
        bench_train_variant(ctx, "with A.RandomFog as the fog corruption (the earlier default)", fog)
    main_mb, worker_mb = measure_train_peak_memory(ctx)
    ctx.rows.append(Row("train", "peak RSS of a training process (ru_maxrss, main)", main_mb,
                        f"fresh process, {steps} steps; largest loader worker {worker_mb:.0f} MB (RUSAGE_CHILDREN)",
                        unit="MB"))


# --------------------------------------------------------------------------- parts


def time_module(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, number: int) -> float:
    with torch.inference_mode():
        return time_call(lambda: module(x), number)


def interleaved_seconds(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds per candidate, measured interleaved."""
    return {k: statistics.median(v) for k, v in measure_interleaved(fns, repeats).items()}


def bench_gcm(ctx: BenchContext, model: nn.Module, x: torch.Tensor, label: str) -> None:
    from gcm import GradientConcealment

    gcm = GradientConcealment()
    reps = max(5, ctx.settings.repeats * 3)
    for _ in range(2):
        time_module(model, x, 1), time_module(gcm, x, 5)
    pairs = []
    for _ in range(reps):
        pairs.append((time_module(gcm, x, 20), time_module(model, x, 1)))
    ratio = median_ratio(pairs)
    ctx.rows.append(Row("parts", f"GCM / one forward ({label})", ratio,
                        f"{statistics.median(p[0] for p in pairs) * 1e3:.2f} ms vs "
                        f"{statistics.median(p[1] for p in pairs) * 1e3:.1f} ms, batch {x.shape[0]}",
                        ("<", 0.01), unit="%"))


def whole_vs_parts(whole: nn.Module, parts: Sequence[nn.Module], x: torch.Tensor,
                   rounds: int) -> list[tuple[float, float]]:
    """Per round, (seconds of ``whole(x)``, summed seconds of each part on ``x``), interleaved."""
    fns = {"whole": lambda: time_module(whole, x, 1)}
    fns.update({f"part{i}": (lambda m=m: time_module(m, x, 1)) for i, m in enumerate(parts)})
    for fn in fns.values():
        fn()
    pairs = []
    for _ in range(rounds):
        t = interleaved_seconds(fns, 1)
        pairs.append((t["whole"], sum(v for k, v in t.items() if k != "whole")))
    return pairs


def bench_parts(ctx: BenchContext) -> None:
    from infer.defended import EnsembleTTA, View, resolve_views
    from train.checkpoint import load_model
    from train.config import ModelConfig
    from train.model import create_classifier

    cfg = ctx.config()
    s = ctx.settings
    bs = cfg.submit.batch_size
    parts_rounds = max(3, 3 * s.repeats)  # each round takes well under a second: buy robustness
    member, _ = load_model(ctx.checkpoint)
    if cfg.model.channels_last:
        member = member.to(memory_format=torch.channels_last)
    x = torch.rand(bs, 3, s.image_size, s.image_size)
    bench_gcm(ctx, member, x, f"{cfg.model.name} at {s.image_size} px")
    if not s.quick:
        # The challenge's model and resolution: a forward costs ~8x more per pixel than the demo's.
        tiny = create_classifier(ModelConfig(name="convnext_tiny", drop_path_rate=0.0), cfg.data.num_classes).eval()
        bench_gcm(ctx, tiny, torch.rand(8, 3, 224, 224), "convnext_tiny at 224 px")
        del tiny

    views = resolve_views([1.0, 0.9], hflip=True)[: s.tta_views]
    size = s.image_size
    batched = EnsembleTTA([member], [size], views).eval()
    singles = [EnsembleTTA([member], [size], [v]).eval() for v in views]
    pairs = whole_vs_parts(batched, singles, x, parts_rounds)
    ctx.rows.append(Row("parts", f"{len(views)} TTA views batched / {len(views)} single-view forwards",
                        median_ratio(pairs),
                        f"{statistics.median(p[0] for p in pairs) * 1e3:.0f} vs "
                        f"{statistics.median(p[1] for p in pairs) * 1e3:.0f} ms, batch {bs}, views "
                        f"{', '.join(map(str, views))}", ("<=", 1.05)))

    others = []
    for i in range(1, s.members):
        torch.manual_seed(i)
        other = create_classifier(cfg.model, cfg.data.num_classes).eval()
        others.append(other.to(memory_format=torch.channels_last) if cfg.model.channels_last else other)
    members = [member, *others]
    ensemble = EnsembleTTA(members, [size] * len(members), [View()]).eval()
    alone = [EnsembleTTA([m], [size], [View()]).eval() for m in members]
    pairs = whole_vs_parts(ensemble, alone, x, parts_rounds)
    ctx.rows.append(Row("parts", f"ensemble of {len(members)} / sum of its members", median_ratio(pairs),
                        f"{statistics.median(p[0] for p in pairs) * 1e3:.0f} vs "
                        f"{statistics.median(p[1] for p in pairs) * 1e3:.0f} ms, batch {bs}", ("<=", 1.05)))

    # CPU view of the GPU switches: channels_last layout and bf16 autocast against the default.
    plain, _ = load_model(ctx.checkpoint)
    cl, _ = load_model(ctx.checkpoint)
    cl = cl.to(memory_format=torch.channels_last)

    def bf16_forward() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return time_module(plain, x, 1)

    fns = {"cl": lambda: time_module(cl, x, 1), "plain": lambda: time_module(plain, x, 1), "bf16": bf16_forward}
    for fn in fns.values():
        fn()
    r = measure_interleaved(fns, parts_rounds)
    for key, label in (("cl", "channels_last forward / default layout forward (time)"),
                       ("bf16", "bf16 autocast forward / float32 forward (time)")):
        ctx.rows.append(Row("parts", label, median_ratio(list(zip(r[key], r["plain"]))),
                            f"{statistics.median(r[key]) * 1e3:.1f} vs {statistics.median(r['plain']) * 1e3:.1f} ms, "
                            f"batch {bs}, CPU; < 1 is faster"))


def bench_compile(ctx: BenchContext) -> None:
    """``model.compile=true`` on CPU: the forward, and submit end to end with compilation."""
    cfg = ctx.config()
    compiled_cfg = ctx.config("model.compile=true")
    batches = load_test_batches(ctx.test_dir, ctx.settings.image_size, cfg.submit.batch_size)
    eager = create_model_only(ctx.checkpoint, cfg)
    start = time.perf_counter()
    compiled = create_model_only(ctx.checkpoint, compiled_cfg)
    run_forward_only(compiled, batches)
    first = time.perf_counter() - start
    fns = {"compiled": lambda: run_forward_only(compiled, batches), "eager": lambda: run_forward_only(eager, batches)}
    for fn in fns.values():
        fn()
    r = measure_interleaved(fns, ctx.settings.repeats)
    ctx.rows.append(Row("compile", "compiled forward / eager forward (img/s)", median_ratio(list(zip(r["compiled"], r["eager"]))),
                        f"{_img_s(r['compiled'])} vs {_img_s(r['eager'])} img/s; first call (compilation) {first:.0f} s"))
    fns = {"compiled": lambda: run_submit(ctx, "model.compile=true"), "eager": lambda: run_submit(ctx)}
    r = measure_interleaved(fns, ctx.settings.repeats)
    ctx.rows.append(Row("compile", "submit model.compile=true / eager, end to end incl. compilation",
                        median_ratio(list(zip(r["compiled"], r["eager"]))),
                        f"{_img_s(r['compiled'])} vs {_img_s(r['eager'])} img/s on "
                        f"{sum(b.shape[0] for b in batches)} images (compiled kernels cached on disk after the first run)"))


# --------------------------------------------------------------------------- scaling


def run_launched_training(ctx: BenchContext, num_processes: int, extra: Sequence[str],
                          launch_flags: Sequence[str] = ()) -> float:
    """Samples/s a launched training run reports for its epoch (``epoch 0: ..., N img/s``).

    That figure is ``train_one_epoch``'s own: all processes' samples over the epoch's wall
    time, so process start-up, validation and checkpointing are not in it.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "train.launch", "train.main", "--num_processes", str(num_processes), *launch_flags,
           *ctx.overrides, f"out_dir={ctx.workdir / f'runs_p{num_processes}'}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    found = re.findall(r"epoch \d+: .*?, ([0-9.]+) img/s", proc.stdout)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"launched training failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return float(found[-1])


def bench_scaling(ctx: BenchContext) -> None:
    s = ctx.settings
    cfg = ctx.config()
    # On CPU submit reads submit.cpu_num_workers (see infer.submit.create_test_loader).
    workers_key = "submit.cpu_num_workers" if not torch.cuda.is_available() else "submit.num_workers"
    base_bs, base_workers = cfg.submit.batch_size, getattr(cfg.submit, workers_key.split(".", 1)[1])
    run_submit(ctx)  # warm-up

    def base_label(key: str, base: int) -> str:
        if key != "submit.cpu_num_workers" or base >= 0:
            return str(base)
        from accelerate import Accelerator

        from infer.submit import resolve_loader_workers

        return f"{base} (auto: {resolve_loader_workers(cfg, Accelerator(cpu=True))})"

    def submit_at(key: str, values: Sequence[int], base: int) -> None:
        fns = {v: (lambda v=v: run_submit(ctx, f"{key}={v}")) for v in values}
        if base not in fns:
            fns[base] = lambda: run_submit(ctx)
        r = measure_interleaved(fns, s.repeats)
        for v in (v for v in values if v != base):
            ctx.rows.append(Row("scaling", f"submit img/s, {key}={v} / {key}={base_label(key, base)}",
                                median_ratio(list(zip(r[v], r[base]))), f"{statistics.median(r[v]):.0f} img/s"))

    # What `accelerate launch` alone gives a CPU run: OMP_NUM_THREADS=1 (train.launch sets the cores).
    threads = torch.get_num_threads()
    if threads > 1:
        def submit_with_threads(n: int) -> float:
            torch.set_num_threads(n)
            try:
                return run_submit(ctx)
            finally:
                torch.set_num_threads(threads)

        r = measure_interleaved({1: lambda: submit_with_threads(1), threads: lambda: run_submit(ctx)}, s.repeats)
        ctx.rows.append(Row("scaling", f"submit img/s, 1 torch thread / {threads} threads",
                            median_ratio(list(zip(r[1], r[threads]))),
                            f"{_img_s(r[1])} img/s; 1 thread is what accelerate launch alone gives a CPU run "
                            "(train.launch passes --num_cpu_threads_per_process = cores)"))
    submit_at("submit.batch_size", s.batch_sizes, base_bs)
    submit_at(workers_key, s.worker_counts, base_workers)

    # Training against its loader workers and batch size (one timed run each, same steps).
    base_train_workers, base_train_bs = cfg.data.num_workers, cfg.train.batch_size

    def train_at(key: str, values: Sequence[int], base: int) -> None:
        builders = {}
        for v in sorted(set(values) | {base}):
            builders[v] = create_training(ctx.config(f"{key}={v}"))
        epochs = iter(range(1, 10**6))
        fns = {v: (lambda p=p: run_train_epoch(p, p.loader, s.train_steps, next(epochs))) for v, p in builders.items()}
        for fn in fns.values():
            fn()
        r = measure_interleaved(fns, s.repeats)
        for v in (v for v in values if v != base):
            ctx.rows.append(Row("scaling", f"train samples/s, {key}={v} / {key}={base}",
                                median_ratio(list(zip(r[v], r[base]))), f"{statistics.median(r[v]):.0f} samples/s"))
        builders.clear()

    train_at("data.num_workers", s.worker_counts[:3], base_train_workers)
    train_at("train.batch_size", s.batch_sizes[1:], base_train_bs)

    # 2 CPU processes against 1, the same data (one epoch), through the real launcher.
    extra = ["train.epochs=1", "train.warmup_epochs=0", "train.ema=false"] if s.quick else ["train.epochs=1"]
    from train.launch import available_cores

    cores = available_cores()
    fns = {n: (lambda n=n: run_launched_training(ctx, n, extra)) for n in (2, 1)}
    # accelerate launch alone would export OMP_NUM_THREADS=1, even for one CPU process
    fns["one_thread"] = lambda: run_launched_training(ctx, 1, extra, ["--num_cpu_threads_per_process", "1"])
    r = measure_interleaved(fns, max(1, min(2, s.repeats)))
    ctx.rows.append(Row("scaling", f"train, 1 process: launcher's {cores} threads (= cores) / 1 thread "
                                   "(accelerate's own default)", median_ratio(list(zip(r[1], r["one_thread"]))),
                        f"{statistics.median(r[1]):.0f} vs {statistics.median(r['one_thread']):.0f} samples/s; "
                        "train.launch passes --num_cpu_threads_per_process unless it or OMP_NUM_THREADS is set"))
    ctx.rows.append(Row("scaling", "train, 2 CPU processes / 1 process (samples/s)", median_ratio(list(zip(r[2], r[1]))),
                        f"{statistics.median(r[2]):.0f} vs {statistics.median(r[1]):.0f} samples/s, one epoch each "
                        f"(python -m train.launch train.main --num_processes N; the cores split between the "
                        f"processes), batch {cfg.train.batch_size} per process, {cfg.data.num_workers} loader "
                        "workers each", (">=", 0.9)))


# --------------------------------------------------------------------------- report


def describe_busy_machine(machine: dict) -> str:
    """A warning when other work competed for the CPU during the run ("" otherwise)."""
    if not hasattr(os, "getloadavg"):
        return ""
    load = os.getloadavg()[1]  # 5-minute average, mostly covering this run
    own = 1.0  # this process keeps about one core busy on average
    if load - own > 0.5 * machine["cores"]:
        return (f"the 5-minute load average was {load:.1f} on {machine['cores']} cores: other processes competed "
                "for the CPU, so these ratios are less reliable than usual (run again on an idle machine)")
    return ""


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table for the console."""
    header = ("section", "figure", "value", "goal", "", "measured")
    lines = [header] + [(r.section, r.name, r.formatted_value(), r.formatted_goal(), r.verdict(), r.detail) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line[:5], widths)) + "  " + line[5])
        if i == 0:
            out.append("-" * (sum(widths) + 2 * 5 + len(header[5])))
    return "\n".join(out)


def format_machine(machine: dict) -> str:
    load = ", ".join(f"{v:.2f}" for v in machine["load_avg"])
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB RAM, GPU: {machine['gpu']}; "
            f"torch {machine['torch']} with {machine['torch_threads']} threads, timm {machine['timm']}, "
            f"Python {machine['python']}; load average at start {load}")


def format_markdown(rows: Sequence[Row], machine: dict, command: str, seconds: float, busy: str = "") -> str:
    lines = [
        f"Machine: {format_machine(machine)}.",
        "",
        *([f"Warning: {busy}.", ""] if busy else []),
        f"Command: `{command}` ({seconds:.0f} s, {time.strftime('%Y-%m-%d')}).",
        "",
        "| section | figure | value | goal | result | measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.section} | {r.name} | {r.formatted_value()} | {r.formatted_goal()} | {r.verdict()} | "
                     f"{r.detail} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, body: str) -> None:
    """Put ``body`` between the bench markers of ``path``, keeping the hand-written rest."""
    from train.io import atomic_write_text

    block = f"{MARK_BEGIN}\n{body}{MARK_END}\n"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if MARK_BEGIN in text and MARK_END in text:
            head, rest = text.split(MARK_BEGIN, 1)
            tail = rest.split(MARK_END, 1)[1].lstrip("\n")
            atomic_write_text(path, head + block + ("\n" + tail if tail else ""))
            return
        atomic_write_text(path, text.rstrip("\n") + "\n\n" + block)
        return
    atomic_write_text(path, "# Benchmarks\n\n" + block)


# --------------------------------------------------------------------------- entry point


RUNNERS = {"submit": bench_submit, "train": bench_train, "parts": bench_parts, "scaling": bench_scaling,
           "compile": bench_compile}


def resolve_sections(only: str) -> list[str]:
    from train.errors import UserError

    if not only:
        return list(DEFAULT_SECTIONS)
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise UserError(f"--only: unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    return wanted


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.sh bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one round (seconds, for tests)")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per comparison (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--write", default="", metavar="FILE", help="also write the Markdown report to FILE")
    parser.add_argument("--workdir", default="", help="keep data and checkpoints here (default: a temp folder)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every measurement")
    return parser


def main(argv: Sequence[str] | None = None) -> list[Row]:
    from train.cli import quiet_libraries

    quiet_libraries()
    args = create_parser().parse_args(argv)
    sections = resolve_sections(args.only)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings.create(args.quick, args.repeats)
    machine = describe_machine()
    print(f"machine: {format_machine(machine)}", flush=True)
    start = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench-")
        workdir = Path(tmp)
    try:
        ctx = prepare_context(workdir, settings, args.overrides)
        for name in sections:
            print(f"[{name}] measuring...", flush=True)
            before = len(ctx.rows)
            RUNNERS[name](ctx)
            for row in ctx.rows[before:]:
                print(f"  {row.name}: {row.formatted_value()} {row.verdict()}", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    print()
    print(format_table(ctx.rows))
    busy = describe_busy_machine(machine)
    if busy:
        print(f"\nwarning: {busy}")
    failed = [r for r in ctx.rows if r.passed is False]
    print(f"\n{sum(r.passed is True for r in ctx.rows)} goal(s) met, {len(failed)} missed, in {seconds:.0f} s "
          f"(ratios: median over {settings.repeats} interleaved round(s))")
    if args.write:
        command = "./run.sh bench " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        write_markdown(Path(args.write), format_markdown(ctx.rows, machine, command.strip(), seconds, busy))
        print(f"wrote {args.write}")
    return ctx.rows


if __name__ == "__main__":
    from train.cli import run_cli

    raise SystemExit(run_cli(main))
