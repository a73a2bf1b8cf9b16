"""Section ``scaling``: throughput against batch size, loader workers, threads and processes."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from typing import Sequence

import torch
from accelerate import Accelerator

from bench.measure import ROOT, BenchContext, Row, measure_interleaved, median_rate, ratio_of
from bench.submit import run_submit
from bench.training import create_training, run_train_epoch
from core.devices import available_cores, resolve_num_workers
from infer.submit import resolve_loader_workers


def run_launched_training(
    ctx: BenchContext, num_processes: int, extra: Sequence[str], launch_flags: Sequence[str] = ()
) -> float:
    """Samples/s a launched training run reports for its epoch (``epoch 0: ..., N img/s``); one
    process without ``launch_flags`` runs directly, as ``./run.sh train`` does.

    That figure is ``train_one_epoch``'s own: all processes' samples over the epoch's wall
    time, so process start-up, validation and checkpointing are not in it.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "train.main",
        *(["--num_processes", str(num_processes)] if num_processes > 1 else []),
        *launch_flags,
        *ctx.overrides,
        f"out_dir={ctx.workdir / f'runs_p{num_processes}'}",
        "overwrite=true",  # every round trains the same run again
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    found = re.findall(r"epoch \d+: .*?, ([0-9.]+) img/s", proc.stdout)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"launched training failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return float(found[-1])


def add_ratio_rows(ctx: BenchContext, r: dict, values: Sequence, base, label: str, base_label, unit: str) -> None:
    """One row per value: its throughput over the base value's (``label`` is "what, key=")."""
    key = label.rsplit(", ", 1)[-1]
    for v in values:
        ctx.rows.append(
            Row(
                "scaling",
                f"{label}{v} / {key}{base_label}",
                ratio_of(r, v, base),
                f"{statistics.median(r[v]):.0f} {unit}",
            )
        )


def bench_scaling(ctx: BenchContext) -> None:
    """Submit and training throughput against threads, batch size, loader workers and processes."""
    run_submit(ctx)  # warm-up
    bench_submit_threads(ctx)
    cfg = ctx.config()
    workers_key = submit_workers_key()
    bench_submit_at(ctx, "submit.batch_size", ctx.settings.batch_sizes, cfg.submit.batch_size)
    bench_submit_at(ctx, workers_key, ctx.settings.worker_counts, getattr(cfg.submit, workers_key.split(".", 1)[1]))
    bench_train_at(ctx, "data.num_workers", ctx.settings.worker_counts[:3], cfg.data.num_workers)
    bench_train_at(ctx, "train.batch_size", ctx.settings.batch_sizes[1:], cfg.train.batch_size)
    bench_processes(ctx)


def submit_workers_key() -> str:
    """The key of submit's loader workers here: on CPU submit reads ``submit.cpu_num_workers``
    (see ``infer.submit.resolve_loader_workers``)."""
    return "submit.cpu_num_workers" if not torch.cuda.is_available() else "submit.num_workers"


def describe_base(ctx: BenchContext, key: str, base: int) -> str:
    """The base value of a row, with what ``-1`` (auto) resolves to for loader workers."""
    if base >= 0 or not key.endswith("num_workers"):
        return str(base)
    if key == "data.num_workers":
        return f"{base} (auto: {resolve_num_workers(base, torch.cuda.is_available())})"
    return f"{base} (auto: {resolve_loader_workers(ctx.config(), Accelerator(cpu=not torch.cuda.is_available()))})"


def bench_submit_at(ctx: BenchContext, key: str, values: Sequence[int], base: int) -> None:
    """Submit images/s for each value of ``key``, as ratios to the configured ``base`` value."""
    fns = {v: (lambda v=v: run_submit(ctx, f"{key}={v}")) for v in values}
    if base not in fns:
        fns[base] = lambda: run_submit(ctx)
    r = measure_interleaved(fns, ctx.settings.repeats)
    others = [v for v in values if v != base]
    add_ratio_rows(ctx, r, others, base, f"submit img/s, {key}=", describe_base(ctx, key, base), "img/s")


def bench_submit_threads(ctx: BenchContext) -> None:
    """Submit with 1 torch thread against every core: what ``accelerate launch`` alone gives a CPU
    run (``OMP_NUM_THREADS=1``) against what ``launch`` gives it."""
    threads = torch.get_num_threads()
    if threads == 1:
        return

    def submit_with_threads(n: int) -> float:
        torch.set_num_threads(n)
        try:
            return run_submit(ctx)
        finally:
            torch.set_num_threads(threads)

    r = measure_interleaved({1: lambda: submit_with_threads(1), threads: lambda: run_submit(ctx)}, ctx.settings.repeats)
    ctx.rows.append(
        Row(
            "scaling",
            f"submit img/s, 1 torch thread / {threads} threads",
            ratio_of(r, 1, threads),
            f"{median_rate(r[1])} img/s; 1 thread is what accelerate launch alone gives a CPU run "
            "(launch passes --num_cpu_threads_per_process = cores)",
        )
    )


def bench_train_at(ctx: BenchContext, key: str, values: Sequence[int], base: int) -> None:
    """Training samples/s for each value of ``key`` (same steps each), as ratios to ``base``."""
    steps = ctx.settings.train_steps
    trainings = {
        v: create_training(ctx.config(f"{key}={v}", f"train.max_steps={steps}")) for v in sorted({*values, base})
    }
    epochs = iter(range(1, 10**6))
    fns = {v: (lambda t=t: run_train_epoch(t, t.train_loader, next(epochs))) for v, t in trainings.items()}
    r = measure_interleaved(fns, ctx.settings.repeats, warmup=True)
    add_ratio_rows(ctx, r, [v for v in values if v != base], base, f"train samples/s, {key}=", base, "samples/s")
    trainings.clear()  # shuts their loader workers down before the next measurement


def bench_processes(ctx: BenchContext) -> None:
    """Training through the real launcher: 2 CPU processes against 1, and 1 process with every core
    against 1 thread (one epoch each; the figure is the epoch's own, without start-up)."""
    s, cfg = ctx.settings, ctx.config()
    extra = ["train.epochs=1", "train.warmup_epochs=0", "train.ema=false"] if s.quick else ["train.epochs=1"]
    cores = available_cores()
    fns = {
        2: lambda: run_launched_training(ctx, 2, extra),
        1: lambda: run_launched_training(ctx, 1, extra),  # run directly, as ./run.sh train is
        # accelerate launch alone would export OMP_NUM_THREADS=1, even for one CPU process
        "one_thread": lambda: run_launched_training(ctx, 1, extra, ["--num_cpu_threads_per_process", "1"]),
    }
    r = measure_interleaved(fns, max(1, min(2, s.repeats)))
    ctx.rows.append(
        Row(
            "scaling",
            f"train, 1 process: launcher's {cores} threads (= cores) / 1 thread (accelerate's own default)",
            ratio_of(r, 1, "one_thread"),
            f"{statistics.median(r[1]):.0f} vs {statistics.median(r['one_thread']):.0f} samples/s; "
            "launch gives a direct run OMP_NUM_THREADS = cores and passes accelerate "
            "--num_cpu_threads_per_process, unless either is set",
        )
    )
    ctx.rows.append(
        Row(
            "scaling",
            "train, 2 CPU processes / 1 process (samples/s)",
            ratio_of(r, 2, 1),
            f"{statistics.median(r[2]):.0f} vs {statistics.median(r[1]):.0f} samples/s, one epoch each "
            f"(python -m launch train.main [--num_processes 2]; the cores split between the "
            f"processes), batch {cfg.train.batch_size} per process, "
            f"{resolve_num_workers(cfg.data.num_workers, torch.cuda.is_available())} loader workers each",
            (">=", 0.9),
        )
    )
