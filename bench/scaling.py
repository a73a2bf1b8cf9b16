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
from core.launch import available_cores
from infer.submit import resolve_loader_workers


def run_launched_training(
    ctx: BenchContext, num_processes: int, extra: Sequence[str], launch_flags: Sequence[str] = ()
) -> float:
    """Samples/s a launched training run reports for its epoch (``epoch 0: ..., N img/s``).

    That figure is ``train_one_epoch``'s own: all processes' samples over the epoch's wall
    time, so process start-up, validation and checkpointing are not in it.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [
        sys.executable,
        "-m",
        "core.launch",
        "train.main",
        "--num_processes",
        str(num_processes),
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
    s = ctx.settings
    cfg = ctx.config()
    # On CPU submit reads submit.cpu_num_workers (see infer.submit.create_test_loader).
    workers_key = "submit.cpu_num_workers" if not torch.cuda.is_available() else "submit.num_workers"
    base_bs, base_workers = cfg.submit.batch_size, getattr(cfg.submit, workers_key.split(".", 1)[1])
    run_submit(ctx)  # warm-up

    def base_label(key: str, base: int) -> str:
        if key != "submit.cpu_num_workers" or base >= 0:
            return str(base)

        return f"{base} (auto: {resolve_loader_workers(cfg, Accelerator(cpu=True))})"

    def submit_at(key: str, values: Sequence[int], base: int) -> None:
        fns = {v: (lambda v=v: run_submit(ctx, f"{key}={v}")) for v in values}
        if base not in fns:
            fns[base] = lambda: run_submit(ctx)
        r = measure_interleaved(fns, s.repeats)
        add_ratio_rows(
            ctx, r, [v for v in values if v != base], base, f"submit img/s, {key}=", base_label(key, base), "img/s"
        )

    # What `accelerate launch` alone gives a CPU run: OMP_NUM_THREADS=1 (core.launch sets the cores).
    threads = torch.get_num_threads()
    if threads > 1:

        def submit_with_threads(n: int) -> float:
            torch.set_num_threads(n)
            try:
                return run_submit(ctx)
            finally:
                torch.set_num_threads(threads)

        r = measure_interleaved({1: lambda: submit_with_threads(1), threads: lambda: run_submit(ctx)}, s.repeats)
        ctx.rows.append(
            Row(
                "scaling",
                f"submit img/s, 1 torch thread / {threads} threads",
                ratio_of(r, 1, threads),
                f"{median_rate(r[1])} img/s; 1 thread is what accelerate launch alone gives a CPU run "
                "(core.launch passes --num_cpu_threads_per_process = cores)",
            )
        )
    submit_at("submit.batch_size", s.batch_sizes, base_bs)
    submit_at(workers_key, s.worker_counts, base_workers)

    # Training against its loader workers and batch size (one timed run each, same steps).
    base_train_workers, base_train_bs = cfg.data.num_workers, cfg.train.batch_size

    def train_at(key: str, values: Sequence[int], base: int) -> None:
        builders = {}
        for v in sorted(set(values) | {base}):
            builders[v] = create_training(ctx.config(f"{key}={v}", f"train.max_steps={s.train_steps}"))
        epochs = iter(range(1, 10**6))
        fns = {v: (lambda p=p: run_train_epoch(p, p.train_loader, next(epochs))) for v, p in builders.items()}
        r = measure_interleaved(fns, s.repeats, warmup=True)
        add_ratio_rows(ctx, r, [v for v in values if v != base], base, f"train samples/s, {key}=", base, "samples/s")
        builders.clear()

    train_at("data.num_workers", s.worker_counts[:3], base_train_workers)
    train_at("train.batch_size", s.batch_sizes[1:], base_train_bs)

    # 2 CPU processes against 1, the same data (one epoch), through the real launcher.
    extra = ["train.epochs=1", "train.warmup_epochs=0", "train.ema=false"] if s.quick else ["train.epochs=1"]

    cores = available_cores()
    fns = {n: (lambda n=n: run_launched_training(ctx, n, extra)) for n in (2, 1)}
    # accelerate launch alone would export OMP_NUM_THREADS=1, even for one CPU process
    fns["one_thread"] = lambda: run_launched_training(ctx, 1, extra, ["--num_cpu_threads_per_process", "1"])
    r = measure_interleaved(fns, max(1, min(2, s.repeats)))
    ctx.rows.append(
        Row(
            "scaling",
            f"train, 1 process: launcher's {cores} threads (= cores) / 1 thread (accelerate's own default)",
            ratio_of(r, 1, "one_thread"),
            f"{statistics.median(r[1]):.0f} vs {statistics.median(r['one_thread']):.0f} samples/s; "
            "core.launch passes --num_cpu_threads_per_process unless it or OMP_NUM_THREADS is set",
        )
    )
    ctx.rows.append(
        Row(
            "scaling",
            "train, 2 CPU processes / 1 process (samples/s)",
            ratio_of(r, 2, 1),
            f"{statistics.median(r[2]):.0f} vs {statistics.median(r[1]):.0f} samples/s, one epoch each "
            f"(python -m core.launch train.main --num_processes N; the cores split between the "
            f"processes), batch {cfg.train.batch_size} per process, {cfg.data.num_workers} loader "
            "workers each",
            (">=", 0.9),
        )
    )
