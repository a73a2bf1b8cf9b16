"""Section ``submit``: submit end to end against a model-only forward and against timm's inference loop."""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import timm
import torch
from safetensors.torch import load_file
from timm.data import create_dataset, create_loader, resolve_data_config
from torch import nn

from bench.measure import BenchContext, Row, measure_interleaved, median_rate, quiet, ratio_of, time_call
from core.checkpoint import export_model, load_model, read_checkpoint_info, resolve_checkpoint_files
from core.datasets import TestImageDataset
from core.devices import create_accelerator, resolve_channels_last
from core.images import to_float_images
from core.labels import list_test_images
from core.model import create_classifier
from infer.defended import input_size_of
from infer.submit import create_model, create_test_loader, predict, resolve_loader_workers
from infer.submit import run as submit_stage
from train.demo_data import generate_demo_data


def run_submit(ctx: BenchContext, *extra: str) -> float:
    """Images/s of ``infer.submit.run`` end to end (model load to validated files)."""
    cfg = ctx.config(*extra)
    start = time.perf_counter()
    with quiet():
        result = submit_stage(cfg)
    return result["n_images"] / (time.perf_counter() - start)


def load_test_batches(test_dir: Path, image_size: int, batch_size: int) -> list[torch.Tensor]:
    """The test images decoded and resized exactly as submit does, as float batches in memory."""
    dataset = TestImageDataset(list_test_images(test_dir), image_size)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return [to_float_images(chunk).clone() for chunk in images.split(batch_size)]


def create_model_only(checkpoint: Path, cfg) -> nn.Module:
    """The bare network (normalization + timm backbone) with the config's layout and compile."""
    model, _ = load_model(checkpoint)
    if resolve_channels_last(cfg.model.channels_last):
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.model.compile else model


def run_forward_only(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Images/s of the bare model forward over batches already in memory (the limit)."""
    n = sum(b.shape[0] for b in batches)
    with torch.inference_mode():
        seconds = time_call(lambda: [model(b) for b in batches])
    return n / seconds


TIMM_WORKERS = 2  # timm inference.py's default --workers


def create_predictor(cfg, checkpoint: Path, test_dir: Path):
    """``(model, loader, accelerator)`` built by the functions ``infer.submit.run`` uses."""
    accelerator = create_accelerator(cfg.train.mixed_precision)
    model, infos = create_model(cfg, [checkpoint], accelerator)
    loader = create_test_loader(cfg, list_test_images(test_dir), input_size_of(infos), accelerator)
    return model, loader, accelerator


def run_predict_loop(predictor) -> float:
    """Images/s of ``infer.submit.predict`` alone: decode, resize, GCM, model, TTA, argmax."""
    model, loader, accelerator = predictor
    start = time.perf_counter()
    with quiet():
        ids, _, _ = predict(model, loader, accelerator)
    return len(ids) / (time.perf_counter() - start)


def run_timm_style_inference(
    checkpoint: Path, test_dir: Path, out_csv: Path, batch_size: int, num_workers: int, channels_last: bool = False
) -> float:
    """Images/s of the loop timm's ``inference.py`` runs, on our checkpoint and test folder.

    As in that script: ``create_model`` + the weights, ``resolve_data_config``,
    ``create_dataset`` on the folder, ``create_loader`` with its prefetcher (uint8 collate,
    normalization on the device), ``inference_mode`` forward, softmax, top-1, and the
    results written as CSV (with the csv module: timm uses pandas, which is not installed).
    Normalization moves from our model into timm's loader, so the network work is the same.
    """
    start = time.perf_counter()
    weights, info_path = resolve_checkpoint_files(checkpoint)
    info = read_checkpoint_info(info_path)
    model = timm.create_model(info["arch"], num_classes=int(info["num_classes"]))
    state = load_file(str(weights))
    model.load_state_dict({k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")})
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = int(info["image_size"])
    data_config = resolve_data_config(
        {
            "input_size": (3, size, size),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": tuple(info["mean"] or (0.0, 0.0, 0.0)),
            "std": tuple(info["std"] or (1.0, 1.0, 1.0)),
        },
        model=model,
    )
    dataset = create_dataset(name="", root=str(test_dir), split="")
    loader = create_loader(
        dataset,
        batch_size=batch_size,
        use_prefetcher=True,
        num_workers=num_workers,
        device=torch.device("cpu"),
        **data_config,
    )
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


def bench_submit(ctx: BenchContext) -> None:
    """submit end to end against the model alone, timm's inference loop and its own predict loop."""
    cfg = ctx.config()
    bs = cfg.submit.batch_size
    batches = load_test_batches(ctx.test_dir, ctx.settings.image_size, bs)
    model = create_model_only(ctx.checkpoint, cfg)
    predictor = create_predictor(cfg, ctx.checkpoint, ctx.test_dir)
    used_workers = resolve_loader_workers(cfg, predictor[2])
    out_csv = ctx.workdir / "timm_inference.csv"

    def timm_loop(workers: int) -> Callable[[], float]:
        return lambda: run_timm_style_inference(
            ctx.checkpoint, ctx.test_dir, out_csv, bs, workers, resolve_channels_last(cfg.model.channels_last)
        )

    fns = {
        "submit": lambda: run_submit(ctx),
        "limit": lambda: run_forward_only(model, batches),
        "predict": lambda: run_predict_loop(predictor),
        "timm": timm_loop(TIMM_WORKERS),
        "timm_same": timm_loop(used_workers),
    }
    r = measure_interleaved(fns, ctx.settings.repeats, warmup=True)
    n = sum(b.shape[0] for b in batches)
    common = (
        f"{n} images of {ctx.settings.image_size} px, batch {bs}, {torch.get_num_threads()} threads, "
        f"submit loader workers {used_workers}"
    )
    add_submit_rows(ctx, r, common, used_workers)
    if not ctx.settings.quick:
        bench_submit_at_scale(ctx)


def add_submit_rows(ctx: BenchContext, r: dict, common: str, used_workers: int) -> None:
    """The rows of :func:`bench_submit` from its interleaved rates ``r``."""
    rate = {k: median_rate(v) for k, v in r.items()}
    timm_rows = [("timm", TIMM_WORKERS, f"timm with its default {TIMM_WORKERS} workers")]
    if used_workers != TIMM_WORKERS:
        timm_rows.append(("timm_same", used_workers, "timm with the worker count submit uses here"))
    ctx.rows.append(
        Row(
            "submit",
            "submit end to end / model-only forward",
            ratio_of(r, "submit", "limit"),
            f"{rate['submit']} vs {rate['limit']} img/s; {common}",
            (">=", 0.9),
        )
    )
    for key, workers, text in timm_rows:
        ctx.rows.append(
            Row(
                "submit",
                f"submit end to end / timm inference.py loop (-j {workers})",
                ratio_of(r, "submit", key),
                f"{rate['submit']} vs {rate[key]} img/s; {text}",
                (">=", 1.0),
            )
        )
    ctx.rows.append(
        Row(
            "submit",
            "predict loop (no set-up, no files) / model-only forward",
            ratio_of(r, "predict", "limit"),
            f"{rate['predict']} vs {rate['limit']} img/s: decode+resize+GCM+model+argmax",
        )
    )


def bench_submit_at_scale(ctx: BenchContext) -> None:
    """The predict loop at the challenge's scale: convnext_tiny on 224 px PNGs.

    The demo network is several times cheaper per pixel, which makes decoding look that much
    dearer than it is in the challenge; this row shows the share at the real size (on fewer
    images, since a forward at this size is slow on a CPU).
    """
    root = ctx.workdir / "data224"
    generate_demo_data(root, num_classes=10, train_per_class=1, test_per_class=8, image_size=224)
    cfg = ctx.config(
        f"data.root={root}",
        "data.image_size=224",
        "model.name=convnext_tiny",
        "submit.batch_size=16",
        "tta.hflip=false",
        "tta.scales=[1.0]",
    )
    torch.manual_seed(0)
    stem = ctx.workdir / "convnext_tiny_224"
    export_model(
        create_classifier(cfg.model, cfg.data.num_classes).eval(),
        stem,
        {"arch": cfg.model.name, "num_classes": cfg.data.num_classes, "image_size": 224},
    )
    batches = load_test_batches(root / "test", 224, cfg.submit.batch_size)
    model = create_model_only(stem, cfg)
    predictor = create_predictor(cfg, stem, root / "test")
    fns = {"predict": lambda: run_predict_loop(predictor), "limit": lambda: run_forward_only(model, batches)}
    r = measure_interleaved(fns, ctx.settings.repeats, warmup=True)
    ctx.rows.append(
        Row(
            "submit",
            "predict loop / model-only forward, convnext_tiny at 224 px (challenge scale)",
            ratio_of(r, "predict", "limit"),
            f"{statistics.median(r['predict']):.1f} vs {statistics.median(r['limit']):.1f} img/s, "
            f"{sum(b.shape[0] for b in batches)} PNGs, batch {cfg.submit.batch_size}",
            (">=", 0.9),
        )
    )
