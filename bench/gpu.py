"""Section ``gpu``: a phase config's training and ``submit`` on one CUDA GPU (``bench/gpu_check.sh``).

* ``modes``: training images/s of a standard, an ``fgsm_rs`` and a 2-step PGD step, each with the
  real loader (decode, the config's augmentation, AugMix in the phase configs; workers from the
  cores) against the same ``train_one_epoch`` fed batches already on the GPU (the limit). Each
  timed run is ``BATCHES_PER_WORKER`` batches per loader worker, so the workers' start-up (one
  batch each before the first step) weighs little: the steady state. Goal: PGD-2 >= 0.9.
* ``precision`` and ``layout``: on batches already on the GPU, bf16 autocast against float32 (a
  training in float32, the bare step under each autocast), channels_last against the default
  layout (bf16). Two processes: a float32 and a bf16 ``Accelerator`` cannot share one.
* ``compile`` (opt-in, ``--compile``): ``model.compile`` against eager; the compilation's
  seconds are reported, not counted.
* ``submit``: ``submit`` end to end (decode, resize, GCM, model, files written and validated)
  against the same network's forward on images already on the GPU. Goal: >= 0.9.

Each part runs in a process of its own, under a time box: one process holds one accelerate
precision (a second ``Accelerator`` with another one is refused), and a crash or a timeout loses
that part alone. Every row is appended to a JSON-lines file and the Markdown report is rewritten
as soon as it is measured. ``--device cpu`` runs every part on the CPU at tiny sizes, with what
``auto`` turns on for a GPU (bf16 autocast, channels_last) forced: the rehearsal of
``bench/gpu_check.sh --rehearse``, and what the tests run; those rows say they are not GPU figures.

    python -m bench.gpu --write runs/gpu.md                    # on a CUDA machine
    python -m bench.gpu --device cpu --workdir /tmp/g           # the rehearsal sizes, on the CPU
    python -m bench.gpu --config configs/cvpr22_phase1.yaml --compile --timeout modes=200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from bench.measure import ROOT, BenchContext, Row, describe_machine, measure_interleaved, median_rate, quiet, ratio_of
from bench.report import format_machine, format_markdown, format_table, write_markdown
from bench.submit import create_model_only, load_test_batches, run_forward_only
from bench.training import collect_train_batches, create_training, run_train_epoch
from core.checkpoint import export_model
from core.config import load_config
from core.devices import precision_name, resolve_num_workers
from core.images import to_float_images
from core.io import publishing
from core.model import create_classifier
from infer.submit import run as run_submit
from train.demo_data import generate_demo_data

MODES = {
    "standard": ["train.adv.mode=none"],
    "fgsm_rs": ["train.adv.mode=fgsm_rs"],
    "pgd-2": ["train.adv.mode=pgd", "train.adv.steps=2"],
}
GOALS = {"pgd-2": (">=", 0.9)}
PARTS = ("modes", "precision", "layout", "compile", "submit")
DEFAULT_PARTS = ("modes", "precision", "layout", "submit")  # compile: opt-in (--compile)
# Seconds each part may take on one H100 before it is stopped (bench/gpu_check.sh's budget, where
# the arithmetic is written out); --timeout NAME=S changes one.
TIMEOUTS = {"modes": 85, "precision": 30, "layout": 30, "compile": 150, "submit": 40}
PHASE_CONFIG = "configs/cvpr22_phase2.yaml"
NOT_MEASURED = "not yet measured on a GPU: no CUDA device here (bench/gpu_check.sh runs this section on one)"
CPU_TAG = " (CPU rehearsal: not a GPU figure)"
# What `auto` turns on with CUDA, forced on the CPU so the rehearsal runs the GPU's code paths.
GPU_AUTO = ["train.mixed_precision=bf16", "model.channels_last=true"]


@dataclass
class GpuPlan:
    """Sizes and settings of one run of the section, shared by its part processes (as JSON)."""

    device: str  # "cuda", or "cpu" for the rehearsal
    workdir: str
    config: str  # the phase config whose model, batch and augmentation the parts train with
    repeats: int = 2
    overrides: list[str] = field(default_factory=list)  # the user's, after everything else
    rows: str = ""  # JSON-lines file every row is appended to
    write: str = ""  # Markdown report rewritten after every row ("" none)
    command: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def tag(self) -> str:
        return "" if self.on_gpu else CPU_TAG

    def sizes(self) -> dict:
        """GPU sizes: the phase config's 224 px and batch; CPU rehearsal: the tests' tiny ones."""
        if self.on_gpu:
            return {"classes": 100, "data_size": 256, "test_images": 10_000, "batches_per_worker": 6, "steps": 20}
        return {"classes": 4, "data_size": 32, "test_images": 48, "batches_per_worker": 3, "steps": 2}

    def base_overrides(self) -> list[str]:
        if self.on_gpu:
            return []
        return [
            "data.image_size=32",
            "model.name=test_convnext",
            "train.batch_size=8",
            "submit.batch_size=8",
            *GPU_AUTO,
        ]


# --------------------------------------------------------------------------- data and rows


def create_gpu_data(plan: GpuPlan, min_train_images: int) -> list[str]:
    """Overrides that point the plan's config at generated data: a training folder of at least
    ``min_train_images`` (a few hundred generated JPEGs repeated as hard links, so every timed run
    finds fresh items without generating thousands) and a test folder of ``test_images`` PNGs."""
    s = plan.sizes()
    work = Path(plan.workdir)
    base = work / "gpu_data"
    generate_demo_data(base, num_classes=s["classes"], train_per_class=3, test_per_class=2, image_size=s["data_size"])
    train = link_repeated(base / "train", work / f"gpu_train_{min_train_images}", min_train_images, base / "label.txt")
    test = link_repeated(base / "test", work / f"gpu_test_{s['test_images']}", s["test_images"])
    return [
        f"data.root={train}",
        "data.train_dir=train",
        "data.train_labels=label.txt",
        f"data.test_dir={test}",
        "data.test_labels=",
        f"data.num_classes={s['classes']}",
        "data.val_fraction=0",
        "data.demo=false",
        f"out_dir={work / 'runs'}",
        f"submit.out_dir={work / 'submissions'}",
        "wandb.mode=disabled",
        "tta.hflip=false",
        "tta.scales=[1.0]",
        "train.adv.warmup_epochs=0",  # the phase configs ramp eps: time the full attack from the first step
    ]


def link_repeated(source: Path, out: Path, count: int, labels: Path | None = None) -> Path:
    """``out`` holds ``count`` hard links cycling over ``source``'s files (and a label file for
    them when ``labels`` is given: the training layout ``out/train`` + ``out/label.txt``)."""
    if out.is_dir():
        return out
    with publishing(out) as tmp:
        folder = tmp / "train" if labels else tmp
        folder.mkdir(exist_ok=True)
        if labels:
            items = [line.split() for line in labels.read_text().splitlines() if line.strip()]
            lines = []
            for i in range(count):
                name, label = items[i % len(items)]
                os.link(source / name, folder / f"{i}{Path(name).suffix}")
                lines.append(f"{i}{Path(name).suffix} {label}")
            (tmp / "label.txt").write_text("\n".join(lines) + "\n")
        else:
            files = sorted(source.iterdir())
            for i in range(count):
                os.link(files[i % len(files)], folder / f"{i}{files[i % len(files)].suffix}")
    return out


def row_to_json(row: Row) -> str:
    return json.dumps(dataclasses.asdict(row))


def row_from_json(line: str) -> Row:
    data = json.loads(line)
    data["goal"] = tuple(data["goal"]) if data["goal"] else None
    return Row(**data)


def read_rows(path: str) -> list[Row]:
    if not path or not Path(path).is_file():
        return []
    return [row_from_json(line) for line in Path(path).read_text().splitlines() if line.strip()]


def record_row(plan: GpuPlan, row: Row, started: float) -> None:
    """Print ``row``, append it to the rows file and rewrite the Markdown report at once."""
    print(f"  {row.name}: {row.formatted_value()} {row.verdict()}  ({row.detail})", flush=True)
    if plan.rows:
        with open(plan.rows, "a", encoding="utf-8") as fh:
            fh.write(row_to_json(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    write_report(plan, time.perf_counter() - started)


def write_report(plan: GpuPlan, seconds: float) -> None:
    if plan.write:
        body = format_markdown(read_rows(plan.rows), describe_machine(), plan.command, seconds)
        write_markdown(Path(plan.write), body)


# --------------------------------------------------------------------------- the parts


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def on_device(training, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` real augmented batches, kept on the training's device (the loader's output there)."""
    device = training.accelerator.device
    return [(x.to(device), y.to(device)) for x, y in collect_train_batches(training, count)]


def rate_of(training, batches, epoch: int = 0) -> float:
    """Samples/s of ``train_one_epoch`` over ``batches`` (a loader, or batches on the device)."""
    value = run_train_epoch(training, batches, epoch)
    synchronize()
    return value


def steady_steps(plan: GpuPlan, cfg) -> tuple[int, int]:
    """``(steps, workers)``: a timed run of ``batches_per_worker`` batches per loader worker."""
    workers = resolve_num_workers(cfg.data.num_workers, plan.on_gpu)
    return plan.sizes()["batches_per_worker"] * max(1, workers), workers


def part_modes(plan: GpuPlan, base: list[str], emit: Callable[[Row], None]) -> None:
    """Per training mode: the real loader against batches already on the device."""
    steps, _ = steady_steps(plan, load_config(ROOT / plan.config, base))
    held_steps = min(steps, plan.sizes()["steps"])
    for mode, overrides in MODES.items():
        training = create_training(load_config(ROOT / plan.config, [*base, *overrides, f"train.max_steps={steps}"]))
        held = on_device(training, held_steps)
        epochs = iter(range(1, 10**6))
        r = measure_interleaved(
            {
                "loader": lambda t=training: rate_of(t, t.train_loader, next(epochs)),
                "limit": lambda t=training, h=held: rate_of(t, h),
            },
            plan.repeats,
            warmup=True,
        )
        emit(
            Row(
                "gpu",
                f"train {mode} step: real loader / batches already on the device{plan.tag}",
                ratio_of(r, "loader", "limit"),
                f"{median_rate(r['loader'])} vs {median_rate(r['limit'])} img/s; {plan.config}, batch "
                f"{training.cfg.train.batch_size}, {training.workers} loader workers, {steps} steps (loader) / "
                f"{held_steps} (limit), {precision_name(training.accelerator.mixed_precision)}, "
                f"channels_last {training.channels_last}",
                GOALS.get(mode),
            )
        )
        del training, held


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


def part_precision(plan: GpuPlan, base: list[str], emit: Callable[[Row], None]) -> None:
    """bf16 autocast against float32: one training (accelerate precision ``no``), its model and
    batches in a bare step loop under each autocast setting."""
    steps = plan.sizes()["steps"]
    cfg = load_config(ROOT / plan.config, [*base, f"train.max_steps={steps}", "train.mixed_precision=no"])
    training = create_training(cfg)
    held = [(to_float_images(x, training.channels_last), y) for x, y in on_device(training, steps)]
    r = measure_interleaved(
        {
            "bf16": lambda: step_rate(training, held, steps, torch.bfloat16),
            "fp32": lambda: step_rate(training, held, steps, None),
        },
        plan.repeats,
        warmup=True,
    )
    emit(
        Row(
            "gpu",
            f"bf16 autocast / float32 (standard step){plan.tag}",
            ratio_of(r, "bf16", "fp32"),
            f"{median_rate(r['bf16'])} vs {median_rate(r['fp32'])} img/s (> 1 is faster; float32 with TF32 matmuls); "
            f"bare fwd+bwd+step, {steps} steps of batch {training.cfg.train.batch_size}",
        )
    )


def compare_trainings(plan: GpuPlan, base: list[str], label: str, a: list[str], b: list[str], emit) -> None:
    """Samples/s with overrides ``a`` over ``b`` (a standard step on batches already on the device);
    both trainings keep the run's precision, so they can share one process."""
    steps = plan.sizes()["steps"]
    common = [*base, "train.adv.mode=none", f"train.max_steps={steps}"]
    trainings = {k: create_training(load_config(ROOT / plan.config, [*common, *o])) for k, o in (("a", a), ("b", b))}
    held = on_device(trainings["b"], steps)
    warm = {}
    for k, t in trainings.items():  # the first call compiles (model.compile): time it, outside the rounds
        start = time.perf_counter()
        rate_of(t, held)
        warm[k] = time.perf_counter() - start
    r = measure_interleaved({k: (lambda t=t: rate_of(t, held)) for k, t in trainings.items()}, plan.repeats)
    emit(
        Row(
            "gpu",
            f"{label}{plan.tag}",
            ratio_of(r, "a", "b"),
            f"{median_rate(r['a'])} vs {median_rate(r['b'])} img/s (> 1 is faster); first call {warm['a']:.1f} vs "
            f"{warm['b']:.1f} s; {steps} steps of batch {trainings['a'].cfg.train.batch_size}",
        )
    )


def part_layout(plan: GpuPlan, base: list[str], emit: Callable[[Row], None]) -> None:
    compare_trainings(
        plan, base, "channels_last / default layout (standard step)", ["model.channels_last=true"],
        ["model.channels_last=false"], emit,
    )  # fmt: skip


def part_compile(plan: GpuPlan, base: list[str], emit: Callable[[Row], None]) -> None:
    compare_trainings(
        plan, base, "model.compile / eager (standard step)", ["model.compile=true"], ["model.compile=false"], emit
    )


LIMIT_IMAGES = 2048  # the model-only forward's images: a rate, which needs no more of the test folder


def part_submit(plan: GpuPlan, base: list[str], emit: Callable[[Row], None]) -> None:
    """``submit`` end to end against the network's forward over images already on the device."""
    cfg = load_config(ROOT / plan.config, base)
    torch.manual_seed(0)
    stem = Path(plan.workdir) / "gpu_model"
    export_model(
        create_classifier(cfg.model, cfg.data.num_classes).eval(),
        stem,
        {"arch": cfg.model.name, "num_classes": cfg.data.num_classes, "image_size": cfg.data.image_size},
    )
    submit_cfg = load_config(ROOT / plan.config, [*base, f"submit.checkpoints=[{stem}]"])
    device = torch.device(plan.device)
    model = create_model_only(stem, cfg).to(device)
    batches = load_test_batches(Path(cfg.data.test_dir), cfg.data.image_size, cfg.submit.batch_size)
    batches = [b.to(device) for b in batches[: max(1, LIMIT_IMAGES // cfg.submit.batch_size)]]

    def submit() -> float:
        start = time.perf_counter()
        with quiet():
            result = run_submit(submit_cfg)
        return result["n_images"] / (time.perf_counter() - start)

    def limit() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            rate = run_forward_only(model, batches)
        synchronize()
        return rate

    r = measure_interleaved({"submit": submit, "limit": limit}, plan.repeats, warmup=True)
    emit(
        Row(
            "gpu",
            f"submit end to end / model-only forward{plan.tag}",
            ratio_of(r, "submit", "limit"),
            f"{median_rate(r['submit'])} vs {median_rate(r['limit'])} img/s; {plan.sizes()['test_images']} PNGs "
            f"resized to {cfg.data.image_size} px, batch {cfg.submit.batch_size}; model-only: the network alone "
            "on the device in bf16 autocast",
            (">=", 0.9),
        )
    )
    if plan.on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
        emit(Row("gpu", "peak GPU memory (max_memory_allocated), submit part", peak, "", unit="MB"))


RUNNERS = {
    "modes": part_modes,
    "precision": part_precision,
    "layout": part_layout,
    "compile": part_compile,
    "submit": part_submit,
}


def prepare_data(plan: GpuPlan) -> list[str]:
    """The parts' data (made once; each part finds it made) and the overrides every part uses."""
    base = load_config(ROOT / plan.config, [*plan.base_overrides(), *plan.overrides])
    steps, _ = steady_steps(plan, base)
    return [*create_gpu_data(plan, steps * base.train.batch_size), *plan.base_overrides(), *plan.overrides]


def run_part(plan: GpuPlan, name: str) -> None:
    """One part, in this process: its rows, each recorded as soon as measured."""
    started = time.perf_counter()
    overrides = prepare_data(plan)
    print(f"[gpu {name}] measuring...", flush=True)
    RUNNERS[name](plan, overrides, lambda row: record_row(plan, row, started))


# --------------------------------------------------------------------------- the parent


def run_parts(plan: GpuPlan, parts: Sequence[str], timeouts: dict[str, float]) -> list[Row]:
    """Each part in a process of its own, stopped (with its loader workers) at its time box; a
    part that fails or runs out of time leaves one row saying so, the others their figures."""
    started = time.perf_counter()
    Path(plan.workdir).mkdir(parents=True, exist_ok=True)
    if not plan.rows:
        plan.rows = str(Path(plan.workdir) / "gpu_rows.jsonl")
    Path(plan.rows).unlink(missing_ok=True)
    prepare_data(plan)
    print(f"[gpu] data ready in {time.perf_counter() - started:.0f} s", flush=True)
    for name in parts:
        outcome = start_part(plan, name, timeouts[name])
        if outcome:
            record_row(plan, Row("gpu", f"part {name}: no figure", float("nan"), outcome), started)
    rows = read_rows(plan.rows)
    write_report(plan, time.perf_counter() - started)
    return rows


def start_part(plan: GpuPlan, name: str, timeout: float) -> str:
    """Run one part's process; "" when it ended well, else what happened to it."""
    args = [sys.executable, "-m", "bench.gpu", "--run-part", name, "--plan", json.dumps(dataclasses.asdict(plan))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s (its time box; the rows above it were kept)"
    finally:  # also when this process is stopped (SIGTERM from an outer timeout): no orphaned part
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and its loader workers
            proc.wait()
    seconds = time.perf_counter() - start
    print(f"[gpu {name}] {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s", flush=True)
    return "" if code == 0 else f"its process exited with {code} after {seconds:.0f} s (its log says why)"


def bench_gpu(ctx: BenchContext) -> None:
    """``./run.sh bench --only gpu``: the parts on CUDA; without it one row saying so, except with
    ``--quick``, where they run on the CPU at the rehearsal sizes (the tests' smoke run)."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not ctx.settings.quick:
        ctx.rows.append(Row("gpu", "GPU figures", float("nan"), NOT_MEASURED))
        return
    plan = GpuPlan(
        device="cuda" if on_gpu else "cpu",
        workdir=str(ctx.workdir / "gpu"),
        config=PHASE_CONFIG,
        repeats=ctx.settings.repeats,
    )
    ctx.rows.extend(run_parts(plan, DEFAULT_PARTS, TIMEOUTS if on_gpu else {p: 600 for p in PARTS}))


def parse_timeouts(items: Sequence[str], scale: float) -> dict[str, float]:
    timeouts = {k: v * scale for k, v in TIMEOUTS.items()}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"error: --timeout {item!r}: give PART=SECONDS with PART one of {', '.join(PARTS)}")
        timeouts[name] = float(seconds)
    return timeouts


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu: the rehearsal")
    parser.add_argument("--config", default=PHASE_CONFIG, help=f"the training recipe (default {PHASE_CONFIG})")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--compile", action="store_true", help="add the compile part (minutes of compilation)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds per comparison (default 2)")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=S", help="one part's time box")
    parser.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every default time box (a slower machine)"
    )
    parser.add_argument("--workdir", default="/tmp/gpu_bench", help="data and checkpoints (default /tmp/gpu_bench)")
    parser.add_argument("--write", default="", metavar="FILE", help="Markdown report, rewritten after every row")
    parser.add_argument("--rows", default="", metavar="FILE", help="JSON lines, one per row (default in --workdir)")
    parser.add_argument("--run-part", default="", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every part")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    if args.run_part:
        run_part(GpuPlan(**json.loads(args.plan)), args.run_part)
        return 0
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()] + (["compile"] if args.compile else [])
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: --parts: unknown part {unknown[0]!r} (choose from {', '.join(PARTS)})", file=sys.stderr)
        return 2
    plan = GpuPlan(
        device=device,
        workdir=args.workdir,
        config=args.config,
        repeats=args.repeats,
        overrides=list(args.overrides),
        rows=args.rows,
        write=args.write,
        command="python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run start_part's clean-up on `timeout`
    print(f"machine: {format_machine(describe_machine())}", flush=True)
    rows = run_parts(plan, list(dict.fromkeys(parts)), parse_timeouts(args.timeout, args.timeout_scale))
    print()
    print(format_table(rows))
    # a goal missed is a figure like any other; a part that left none fails the run
    return 1 if any(r.name.startswith("part ") and math.isnan(r.value) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
