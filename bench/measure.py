"""Measuring side by side: settings, rows, interleaved rounds, the shared work folder and checkpoint."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import timm
import torch

from core.checkpoint import export_model
from core.config import load_config
from core.devices import available_cores
from core.model import create_classifier
from train.demo_data import generate_demo_data

ROOT = Path(__file__).resolve().parent.parent


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
    def create(cls, quick: bool, repeats: int | None, train_steps: int = 0) -> "BenchSettings":
        if not quick:
            return cls(repeats=repeats or 3, train_steps=train_steps or 20)
        return cls(
            quick=True,
            repeats=repeats or 1,
            num_classes=4,
            image_size=32,
            train_per_class=24,
            test_per_class=24,
            train_steps=train_steps or 3,
            batch_sizes=(8, 16),
            worker_counts=(0, 1),
            model_overrides=("model.name=test_convnext", "train.batch_size=16", "submit.batch_size=16"),
        )


@dataclass
class Row:
    """One line of the report: a ratio, what it compares, and the goal it is held to."""

    section: str
    name: str
    value: float
    detail: str
    goal: tuple[str, float] | None = None  # (">=", 0.9), ("<", 0.01), ("<=", 1.05)
    unit: str = "x"  # "x" ratio, "%" percent, "MB" memory, "img/s", "cores"

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
        if self.unit == "ms":
            return f"{self.value:.2f} ms"
        if self.unit != "x":  # MB, img/s, cores: whole numbers
            return f"{self.value:.0f} {self.unit}"
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
    baseline: Path | None = None  # another checkout whose commands the ``commands`` section also times

    def config(self, *extra: str):

        return load_config(None, [*self.overrides, *extra])


def ratio_of(results: dict, a, b) -> float:
    """Median ratio of candidate ``a`` to ``b`` over the rounds of :func:`measure_interleaved`."""
    return median_ratio(list(zip(results[a], results[b])))


def median_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    """Median over rounds of ``a / b``: each round's pair was measured side by side."""
    return statistics.median(a / b for a, b in pairs)


def measure_interleaved(
    fns: dict[str, Callable[[], float]], repeats: int, warmup: bool = False
) -> dict[str, list[float]]:
    """Call each function once per round, rotating the order every round; returns all results.

    Rotation spreads slow drifts (other jobs on the machine, thermal limits) over every
    candidate instead of always penalising the one that runs last. ``warmup`` calls each
    function once first, uncounted (lazy imports, oneDNN kernels, first-use allocations).
    """
    names = list(fns)
    for fn in fns.values() if warmup else ():
        fn()
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


def prepare_context(workdir: Path, settings: BenchSettings, user_overrides: Sequence[str]) -> BenchContext:
    """Generate the demo data and export a random checkpoint of the configured model."""
    s = settings
    data = workdir / "data"
    generate_demo_data(
        data,
        num_classes=s.num_classes,
        train_per_class=s.train_per_class,
        test_per_class=s.test_per_class,
        image_size=s.image_size,
    )
    overrides = [
        f"data.root={data}",
        "data.demo=false",
        "data.train_dir=train",
        "data.train_labels=label.txt",
        "data.test_dir=test",
        "data.test_labels=test_labels.txt",
        f"data.num_classes={s.num_classes}",
        f"data.image_size={s.image_size}",
        f"out_dir={workdir / 'runs'}",
        "name=bench",
        "wandb.mode=disabled",
        f"submit.out_dir={workdir / 'submissions'}",
        *s.model_overrides,
        *user_overrides,
    ]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = create_classifier(cfg.model, cfg.data.num_classes).eval()
    stem = cfg.run_dir / "best"
    stem.parent.mkdir(parents=True, exist_ok=True)
    export_model(
        model, stem, {"arch": cfg.model.name, "num_classes": cfg.data.num_classes, "image_size": cfg.data.image_size}
    )
    return BenchContext(s, workdir, overrides, stem, data / "test")


def time_module(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, number: int) -> float:
    with torch.inference_mode():
        return time_call(lambda: module(x), number)


def interleaved_seconds(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds per candidate, measured interleaved."""
    return {k: statistics.median(v) for k, v in measure_interleaved(fns, repeats).items()}


def median_rate(values: Sequence[float]) -> str:
    """The median of a throughput series, as a whole number (images or samples per second)."""
    return f"{statistics.median(values):.0f}"
