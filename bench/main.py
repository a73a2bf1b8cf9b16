"""``./run.sh bench``: performance figures as ratios measured side by side on this machine.

Absolute times on a shared 2-core CPU drift by tens of percent from one minute to the next,
so every figure here is a *ratio* of two things measured in the same run, interleaved
(A, B, A, B, ... with the order rotated every round) and summarised by the median of the
per-round ratios. Each row says what was compared, the goal it is held to and PASS/FAIL.

Everything runs on the real code paths with real configs (``core.config.load_config``):

* ``submit``: ``infer.submit.run`` end to end (decode, resize, GCM, model, TTA, CSV/JSON/meta
  written and validated) against (a) the same model's forward on the same images already in
  memory as float tensors (the limit) and (b) a loop written the way timm's ``inference.py``
  does it (``create_dataset`` / ``create_loader`` with its prefetcher, ``inference_mode``,
  softmax + top-1, CSV) on the same checkpoint, images, batch size, workers and threads.
* ``train``: ``train.engine.train_one_epoch`` fed by the real loader (``create_train_loader``,
  decoding and the configured augmentations) against a model-only forward + backward +
  optimizer step loop on in-memory tensors, the training loader with AugMix (one view, and the
  clean + two views of its JSD loss) against the standard loader, plus the peak memory of a
  training process.
* ``parts``: GCM against one forward; k TTA views batched against k single-view forwards; an
  ensemble of m members against the sum of its members.
* ``decode`` (opt-in): peak memory of decoding the largest image of each kind the limits accept.
* ``ablation`` (opt-in): ``./run.sh ablate`` (every default variant, AutoAttack through each
  stack) against one ``submit`` of the same test images.
* ``loader`` (opt-in): images/s one loader worker makes at 224 px (the standard, corruption and
  AugMix pipelines, submit's decode) and the cores a GPU needs at published convnext_tiny rates.
* ``gpu`` (opt-in, CUDA): convnext_tiny at 224 px: training img/s of standard, fgsm_rs and PGD-2
  steps with the real loader against synthetic batches already on the GPU, bf16 against fp32,
  channels_last, compile, and submit end to end against the model alone (``bench/gpu.py``).
* ``checkdata`` (opt-in): ``./run.sh check-data`` on a Phase-II-sized folder (127,390 files).
* ``recipes`` (opt-in): each corruption-robust training option (``aug.prime``, ``aug.fourier``,
  ``aug.views=2`` with ``train.adv.consistency``, ``train.adv.eps=4/255``) per optimizer step
  against plain PGD-AT.
* ``scaling``: submit and training throughput against batch size and DataLoader workers, and
  a 2-process CPU training run (``python -m launch train.main --num_processes 2``)
  against 1 process.
* ``commands``: ``./run.sh submit`` end to end against a minimal hand-written prediction script
  (``bench/minimal_predict.py``), and ``./run.sh train`` to its first step against that script's
  imports and model build, as whole processes (with ``--baseline DIR``, another checkout's too).

The data are the built-in demo set (generated into the work folder) and a randomly
initialised checkpoint of the demo model exported with ``core.checkpoint.export_model``:
throughput does not depend on the weights.

Usage::

    ./run.sh bench                          # full run (~5-8 min on 2 cores)
    ./run.sh bench --quick                  # tiny sizes, one round (what the test runs)
    ./run.sh bench --only submit,parts      # some sections
    ./run.sh bench --write BENCHMARKS.md    # also write the Markdown report
    ./run.sh bench --only commands --baseline /tmp/main   # before/after against another checkout
    ./run.sh bench --only recipes model.name=convnext_tiny data.image_size=224 train.batch_size=16 --train-steps 3
    ./run.sh bench model.channels_last=true # config overrides apply to every measurement
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from bench.ablation import bench_ablation
from bench.check_data import bench_check_data
from bench.commands import bench_commands
from bench.decode import bench_decode
from bench.gpu import bench_gpu
from bench.loader import bench_loader
from bench.measure import BenchSettings, Row, describe_machine, prepare_context
from bench.parts import bench_compile, bench_parts
from bench.recipes import bench_recipes
from bench.report import describe_busy_machine, format_machine, format_markdown, format_table, write_markdown
from bench.scaling import bench_scaling
from bench.submit import bench_submit
from bench.training import bench_train
from core.cli import quiet_libraries, user_path
from core.errors import UserError

SECTIONS = (
    "submit", "train", "parts", "scaling", "commands", "compile", "decode", "ablation", "loader", "gpu", "checkdata",
    "recipes",
)  # fmt: skip
# opt-in: compile (~1 min of compilation), decode (peak memory of the worst accepted images, ~1 min),
# ablation (./run.sh ablate on 100 images against one submit, several minutes), loader (224-px
# pipelines per worker, ~1 min), gpu (convnext_tiny at 224 px on a CUDA GPU; bench/gpu_check.sh),
# checkdata (check-data on 127,390 generated files, ~2 min the first time), recipes (several
# PGD-AT runs side by side, several minutes)
DEFAULT_SECTIONS = ("submit", "train", "parts", "scaling", "commands")


RUNNERS = {
    "submit": bench_submit,
    "train": bench_train,
    "parts": bench_parts,
    "scaling": bench_scaling,
    "commands": bench_commands,
    "compile": bench_compile,
    "decode": bench_decode,
    "ablation": bench_ablation,
    "loader": bench_loader,
    "gpu": bench_gpu,
    "checkdata": bench_check_data,
    "recipes": bench_recipes,
}


def resolve_sections(only: str) -> list[str]:
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
    parser.add_argument(
        "--train-steps", type=int, default=0, help="optimizer steps per timed training run (default 20, quick 3)"
    )
    parser.add_argument("--write", default="", metavar="FILE", help="also write the Markdown report to FILE")
    parser.add_argument("--workdir", default="", help="keep data and checkpoints here (default: a temp folder)")
    parser.add_argument(
        "--baseline", default="", metavar="DIR", help="another checkout: section commands also times its run.sh"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every measurement")
    return parser


def main(argv: Sequence[str] | None = None) -> list[Row]:
    quiet_libraries()
    args = create_parser().parse_args(argv)
    sections = resolve_sections(args.only)
    if args.train_steps < 0:
        raise UserError(f"--train-steps: {args.train_steps} must be >= 1 (0: the default)")
    baseline = user_path(args.baseline)
    if baseline is not None and not (baseline / "run.sh").is_file():
        raise UserError(f"--baseline {args.baseline}: no run.sh in it (give a checkout of this repository)")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings.create(args.quick, args.repeats, args.train_steps)
    machine = describe_machine()
    print(f"machine: {format_machine(machine)}", flush=True)
    start = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = user_path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench-")
        workdir = Path(tmp)
    try:
        ctx = prepare_context(workdir, settings, args.overrides)
        ctx.baseline = baseline
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
    print(
        f"\n{sum(r.passed is True for r in ctx.rows)} goal(s) met, {len(failed)} missed, in {seconds:.0f} s "
        f"(ratios: median over {settings.repeats} interleaved round(s))"
    )
    if args.write:
        command = "./run.sh bench " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        write_markdown(user_path(args.write), format_markdown(ctx.rows, machine, command.strip(), seconds, busy))
        print(f"wrote {args.write}")
    return ctx.rows
