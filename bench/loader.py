"""Section ``loader``: images per second one loader worker (one core) makes at 224 px, and the cores
a GPU needs to be fed at a published convnext_tiny rate.

The training pipeline as ``train`` builds it (``core.datasets.ImageDataset`` with
``core.transforms.create_train_transform``: JPEG decode, RandomResizedCrop to 224, flip, the
configured corruptions; AugMix where asked), run in this process on one thread, which is what a
loader worker does. A GPU training at R images/s then needs R / rate workers, each on a core of
its own, plus one core for the training process itself.

The rates it is held against are timm's published benchmark figures for convnext_tiny at 224 px
with AMP (DESIGN.md, "GPU facts"): training 813 img/s on an RTX 3090 (torch 1.12), inference
6,482 img/s on an RTX PRO 6000 (eager). PGD-AT with k steps costs about (k + 1) training steps,
so it needs that many times fewer workers. No figure here is a GPU measurement: the "cores"
rows divide a published rate (an RTX 3090's for training, older than any GPU this project is lent)
by a rate measured on this CPU.

The phase recipe (``configs/cvpr22_phase1.yaml``'s augmentation: RandomResizedCrop, flip, the
corruption family at p=0.3, AugMix) is timmed per image on 500 x 375 JPEGs (an ImageNet-sized
photo), once as a GPU run makes it (``aug.augmix.device=auto`` with CUDA: AugMix on the device, so
a worker decodes, crops, flips and corrupts) and once with AugMix in the worker (timm's PIL ops, the
CPU path): the CPU milliseconds per 224-px image (the thread's own CPU time, so a busy machine's
waits do not count), goal <= 2.5 ms (16 cores then feed >= 6,000 img/s).
"""

from __future__ import annotations

import math
import statistics
import time

import cv2
import torch

from bench.measure import BenchContext, Row, measure_interleaved, median_rate
from core.config import DEFAULT_CONFIG, load_config
from core.datasets import ImageDataset, TestImageDataset
from core.labels import list_test_images, resolve_samples
from core.transforms import create_train_transform
from train.demo_data import generate_demo_data

# timm's published convnext_tiny throughputs at 224 px, AMP (img/s): what a GPU asks of its loader.
PUBLISHED_TRAIN_RATE = ("RTX 3090 training (timm benchmark, AMP, torch 1.12)", 813.0)
PUBLISHED_INFER_RATE = ("RTX PRO 6000 inference (timm benchmark, AMP, eager)", 6482.0)
PGD_STEPS = 2  # the recommended PGD-AT at 224 px: 2 steps, about 3 standard steps each

PIPELINES = {
    "standard augmentation (no corruptions)": ["aug.corruption_p=0"],
    "standard augmentation + the corruption family (default, p=0.3)": [],
    "standard augmentation + AugMix (one view)": ["aug.augmix.enabled=true"],
}


def create_data(ctx: BenchContext) -> tuple[object, list]:
    """A 10-class set of 256-px JPEG training images and 224-px PNG test images, and its test items."""
    data = ctx.workdir / "loader224"
    images = 8 if ctx.settings.quick else 40
    generate_demo_data(data, num_classes=10, train_per_class=images, test_per_class=images, image_size=256)
    return data, list_test_images(data / "test")


def create_dataset(
    ctx: BenchContext, data, overrides: list[str], config=None, augmix_on_device: bool = False
) -> ImageDataset:
    """The training set of a 224-px run (decode, crop, augmentations), as ``train`` builds it."""
    cfg = load_config(
        config,
        [
            *ctx.overrides,
            f"data.root={data}",
            "data.num_classes=10",
            "data.image_size=224",
            "data.val_fraction=0",
            *overrides,
        ],
    )
    samples, _ = resolve_samples(cfg.data)
    return ImageDataset(samples, create_train_transform(cfg.aug, cfg.data.image_size, augmix_on_device))


def images_per_second(dataset, count: int, offset: int) -> float:
    """Images/s of ``dataset[i]`` (decode + transform; a training pipeline seeded per sample) on this thread."""
    start = time.perf_counter()
    for i in range(count):
        if hasattr(dataset.transform, "set_random_seed"):
            dataset.transform.set_random_seed(offset + i)
        dataset[i % len(dataset)]
    return count / (time.perf_counter() - start)


def measure_like_a_worker(ctx: BenchContext, datasets: dict, measure, count: int) -> dict[str, list[float]]:
    """``measure(dataset, count, offset)`` of each dataset, interleaved, on one thread as a loader worker runs."""
    offsets = iter(range(0, 10**9, count))
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # a loader worker: one core, OpenCV without its own thread pool
    try:
        return measure_interleaved(
            {k: (lambda d=d: measure(d, count, next(offsets))) for k, d in datasets.items()},
            ctx.settings.repeats,
            warmup=True,
        )
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


def measure_rates(ctx: BenchContext, count: int) -> dict[str, list[float]]:
    """Images/s of each training pipeline and of submit's decode + resize, one thread each."""
    data, test_items = create_data(ctx)
    datasets = {label: create_dataset(ctx, data, overrides) for label, overrides in PIPELINES.items()}
    datasets[SUBMIT] = TestImageDataset(test_items, 224)
    return measure_like_a_worker(ctx, datasets, images_per_second, count)


SUBMIT = "submit's decode + resize (PNG 256 px -> 224)"


PHASE_CONFIG = DEFAULT_CONFIG.parent / "cvpr22_phase1.yaml"
PHASE_PATHS = {  # label -> AugMix on the device (what a GPU run does with aug.augmix.device=auto)
    "AugMix on the device (aug.augmix.device=auto on a GPU)": True,
    "AugMix in the loader (timm's PIL ops, the CPU path)": False,
}
PHOTO = (500, 375)  # an ImageNet-sized JPEG
CORES = 16  # the GPU machine's cores
GOAL_MS = 2.5


def create_photos(ctx: BenchContext, data) -> object:
    """The demo training images as 500 x 375 JPEGs (quality 90), with their label file."""
    from PIL import Image

    photos = ctx.workdir / "loader_photos"
    (photos / "train").mkdir(parents=True, exist_ok=True)
    for path in sorted((data / "train").iterdir()):
        out = photos / "train" / path.name
        if not out.exists():
            with Image.open(path) as img:
                img.convert("RGB").resize(PHOTO, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
    (photos / "label.txt").write_text((data / "label.txt").read_text())
    return photos


def cpu_ms_per_image(dataset, count: int, offset: int) -> float:
    """CPU milliseconds per ``dataset[i]`` (decode + transform, seeded per sample), this thread's own CPU
    time (``time.thread_time``): what a loader worker spends, not counting waits for a busy core."""
    start = time.thread_time()
    for i in range(count):
        dataset.transform.set_random_seed(offset + i)
        dataset[i % len(dataset)]
    return (time.thread_time() - start) * 1000 / count


def measure_phase_recipe(ctx: BenchContext, data, count: int) -> dict[str, list[float]]:
    """CPU ms per image of the phase recipe's loader on one thread, AugMix on the device and in the loader."""
    photos = create_photos(ctx, data)
    shape = [f"data.root={photos}", "data.train_dir=train", "data.train_labels=label.txt", "data.test_dir=train"]
    datasets = {
        label: create_dataset(ctx, photos, shape, PHASE_CONFIG, on_device) for label, on_device in PHASE_PATHS.items()
    }
    return measure_like_a_worker(ctx, datasets, cpu_ms_per_image, count)


def bench_phase_recipe(ctx: BenchContext, data, count: int) -> None:
    """The rows of the phase recipe's CPU cost per image (see the module docstring)."""

    r = measure_phase_recipe(ctx, data, count)
    ms = {label: statistics.median(values) for label, values in r.items()}
    cpu_path = ms[next(k for k, v in PHASE_PATHS.items() if not v)]
    for label, on_device in PHASE_PATHS.items():
        detail = (
            f"{1000 / ms[label]:.0f} img/s per core, {CORES} cores: {CORES * 1000 / ms[label]:,.0f} img/s; "
            f"the thread's CPU time, {count} images a round (JPEG {PHOTO[0]}x{PHOTO[1]} -> 224)"
        )
        if on_device:
            detail += f"; AugMix in the loader: {cpu_path:.2f} ms"
        ctx.rows.append(
            Row(
                "loader",
                f"CPU ms per 224-px image, phase recipe (configs/cvpr22_phase1.yaml), {label}",
                ms[label],
                detail,
                goal=("<=", GOAL_MS) if on_device else None,
                unit="ms",
            )
        )


def bench_loader(ctx: BenchContext) -> None:
    count = 16 if ctx.settings.quick else 200
    bench_phase_recipe(ctx, create_data(ctx)[0], count)
    r = measure_rates(ctx, count)
    for label, (published, rate_of_gpu, divisor) in NEEDS.items():
        rate = float(median_rate(r[label]))
        ctx.rows.append(
            Row(
                "loader",
                f"images/s per loader worker at 224 px, {label}",
                rate,
                f"one thread, {count} images a round ({'PNG' if label == SUBMIT else 'JPEG'} 256 px -> 224)",
                unit="img/s",
            )
        )
        workers = math.ceil(rate_of_gpu / divisor / rate)
        text = f"{published} at {rate_of_gpu:.0f} img/s"
        if divisor > 1:
            text += f", PGD-AT with {PGD_STEPS} steps at about 1/{divisor} of it"
        ctx.rows.append(
            Row(
                "loader",
                f"cores a GPU at a published timm rate would need (arithmetic, not a GPU measurement), {label}",
                float(workers + 1),
                f"{text}: {workers} workers + 1 core for the process",
                unit="cores",
            )
        )


# What each pipeline is asked to feed: (published figure, its img/s, divisor for the training mode).
NEEDS = {
    "standard augmentation (no corruptions)": (*PUBLISHED_TRAIN_RATE, 1),
    "standard augmentation + the corruption family (default, p=0.3)": (*PUBLISHED_TRAIN_RATE, 1),
    "standard augmentation + AugMix (one view)": (*PUBLISHED_TRAIN_RATE, PGD_STEPS + 1),
    SUBMIT: (*PUBLISHED_INFER_RATE, 1),
}
