"""Section ``commands``: whole commands as a user runs them, against a minimal hand-written script.

* ``./run.sh submit`` end to end (start-up, config check, model, GCM, predictions, the CSV, JSON
  and meta files written and validated) against ``bench/minimal_predict.py`` (a timm model,
  safetensors weights, a PIL loop over the test PNGs, argmax, CSV) on the demo's test images:
  wall time of each process, and the same predictions (checked; the bench stops otherwise).
* ``./run.sh train`` until its first optimizer step is done (the progress bar shows ``1/N``)
  against the same script's imports and model build.

With ``--baseline DIR`` (another checkout, e.g. an earlier commit, with its own ``run.sh``) its
``submit`` and ``train`` are measured in the same interleaved rounds: before/after figures from
one session on one machine.
"""

from __future__ import annotations

import csv
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from bench.measure import ROOT, BenchContext, Row, measure_interleaved, ratio_of
from train.demo_data import generate_demo_data

SCRIPT = ROOT / "bench" / "minimal_predict.py"
# tqdm's line once the first batch went through forward, backward and the optimizer step
FIRST_STEP = re.compile(rb"epoch 0:[^\r\n]*\| 1/\d+ ")


def prepare_demo(ctx: BenchContext) -> Path:
    """The data set ``./run.sh train`` makes for the demo (``--quick``: the bench's tiny one)."""
    if ctx.settings.quick:
        return ctx.test_dir.parent
    root = ctx.workdir / "demo"
    generate_demo_data(root, num_classes=ctx.settings.num_classes, image_size=ctx.settings.image_size)
    return root


def run_command(cmd: list[str]) -> float:
    """Wall seconds of ``cmd`` from start to exit (it must succeed)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, timeout=1800)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}): {proc.stderr[-2000:].decode()}")
    return seconds


def run_until_first_step(cmd: list[str]) -> float:
    """Wall seconds from starting a training command to its first optimizer step; then it is stopped
    (SIGTERM, as a job scheduler would) and waited for."""
    start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    try:
        while not FIRST_STEP.search(seen):
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"{' '.join(cmd[:2])} ended before its first step: {seen[-2000:].decode()}")
            seen = seen[-4096:] + chunk
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.communicate(timeout=300)


def read_predictions(path: Path) -> dict[int, int]:
    with open(path, newline="") as fh:
        return {int(row["image_id"]): int(row["category_id"]) for row in csv.DictReader(fh)}


def check_same_predictions(reference: Path, *others: Path) -> int:
    """The number of predictions in ``reference``; raises if any of ``others`` differs from it."""
    expected = read_predictions(reference)
    for path in others:
        got = read_predictions(path)
        if got != expected:
            wrong = sum(got.get(k) != v for k, v in expected.items())
            raise RuntimeError(f"{path} differs from {reference} in {wrong} of {len(expected)} predictions")
    return len(expected)


def command_fns(ctx: BenchContext, data_root: Path) -> tuple[dict[str, Callable[[], float]], dict[str, Path]]:
    """What each round runs (``submit``/``train`` and ``*_before`` for the baseline, ``script``,
    ``build``), and the CSV each prediction writes."""
    out = ctx.workdir / "commands"
    common = [*ctx.overrides, f"data.root={data_root}"]
    roots = {"": ROOT, **({"_before": ctx.baseline} if ctx.baseline else {})}
    fns: dict[str, Callable[[], float]] = {}
    csvs = {"script": out / "script.csv"}
    for suffix, root in roots.items():
        submissions = out / f"submissions{suffix}"
        csvs[f"submit{suffix}"] = submissions / f"{ctx.config().name}.csv"
        submit = [str(root / "run.sh"), "submit", *common, f"submit.out_dir={submissions}"]
        train = [str(root / "run.sh"), "train", *common, f"out_dir={out / f'runs{suffix}'}", "overwrite=true"]
        fns[f"submit{suffix}"] = lambda cmd=submit: run_command(cmd)
        fns[f"train{suffix}"] = lambda cmd=train: run_until_first_step(cmd)
    script = [sys.executable, str(SCRIPT), str(ctx.checkpoint)]
    fns["script"] = lambda: run_command([*script, str(data_root / "test"), str(csvs["script"])])
    fns["build"] = lambda: run_command(script)
    return fns, csvs


def bench_commands(ctx: BenchContext) -> None:
    data_root = prepare_demo(ctx)
    fns, csvs = command_fns(ctx, data_root)
    r = measure_interleaved(fns, ctx.settings.repeats, warmup=not ctx.settings.quick)
    n = check_same_predictions(csvs["script"], *(p for k, p in csvs.items() if k != "script"))

    def seconds(key: str) -> str:
        return f"{statistics.median(r[key]):.1f} s"

    for suffix, when in [("", "")] + ([("_before", f"baseline {ctx.baseline}: ")] if ctx.baseline else []):
        ctx.rows.append(
            Row(
                "commands",
                f"{when}./run.sh submit / minimal prediction script (wall time)",
                ratio_of(r, f"submit{suffix}", "script"),
                f"{seconds(f'submit{suffix}')} vs {seconds('script')}, the same {n} predictions; validation, "
                "meta file and GCM kept, W&B off",
                ("<=", 1.15),
            )
        )
        ctx.rows.append(
            Row(
                "commands",
                f"{when}./run.sh train to its first step / the script's imports + model build",
                ratio_of(r, f"train{suffix}", "build"),
                f"{seconds(f'train{suffix}')} vs {seconds('build')}",
            )
        )
    if ctx.baseline:
        for key in ("submit", "train"):
            ctx.rows.append(
                Row(
                    "commands",
                    f"./run.sh {key}{' to its first step' if key == 'train' else ''}: this checkout / baseline",
                    ratio_of(r, key, f"{key}_before"),
                    f"{seconds(key)} vs {seconds(f'{key}_before')} ({ctx.baseline})",
                )
            )
