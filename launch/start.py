"""Run a stage: ``python -m launch MODULE [args]`` (``./run.sh train|submit|evaluate``).

Our own arguments are ``--config FILE``, ``--debug`` and ``key=value``; every other ``--flag`` is
a launch flag with ``accelerate launch``'s name, decided by :mod:`launch.plan` (every visible
GPU by default, ``--num_processes``, ``--gpu_ids``, ``--cpu``, ``--mixed_precision``, several
machines) or refused in one line. The config and the plan are checked here first, so a bad key or
an impossible launch fails in one line before any process starts; then one line says what starts:
processes, devices, precision.

One plain process (no flag; the CPU or a single GPU) runs the stage directly, ``python -m
MODULE``: ``accelerate launch`` would only add an interpreter that imports torch (seconds) to
start it, and ``Accelerator()`` builds the same one-process state without it. Anything else runs
under ``accelerate launch`` with explicit flags (a default config of the user's machine changes
nothing). CPU processes get their share of the cores as torch threads (accelerate would give one).

Stopping: SIGINT or SIGTERM sent to this launcher (Ctrl-C, ``kill PID``, ``timeout``, a job
scheduler) is passed on to every process it started, which stop cleanly (checkpoints are
published atomically); it waits for them, so nothing keeps running. A process that dies without
a word (SIGKILL, the out-of-memory killer) is named, with the command that resumes the run.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from core.cli import RESUMABLE_STATUS, STATUS_ENV, die_with_parent, user_path
from core.config import Config, load_config
from core.devices import probe_devices
from core.errors import UserError
from core.labels import resolve_samples
from core.outputs import acquire
from core.transforms import create_train_transform
from launch.plan import COMMANDS, DEFAULT_ACCELERATE_CONFIG, Plan, parse_flags, plan_launch, split_args

USAGE = """usage: ./run.sh {command} [--config FILE] [key=value ...] [launch flags]

  --config FILE   YAML config (default configs/default.yaml, the CPU demo); a relative FILE is
                  taken from the folder you run the command in
  key=value       dotted overrides, e.g. train.epochs=3 data.image_size=64 train.adv.mode=pgd
  --debug         show tracebacks

Config sections: name, out_dir, seed, resume, overwrite, data, aug, model, train (train.adv:
adversarial training), wandb, tta, gcm, random_pad, submit, rules, eval, testset, ablation, budget,
export, phase2. Every key, its default and what it means: core/config/schema.py and the stages'
config.py (infer/, robust/, phase2/); paths inside a config are relative to the repository.

Launch flags (accelerate launch's names). Default: every visible GPU, one process each, bf16
where the GPUs have it (train.mixed_precision=auto); on a machine without CUDA one process.
  --num_processes N       N processes (the first N GPUs; on the CPU, N gloo processes)
  --gpu_ids 0,2           which of the visible GPUs (as torch numbers them; CUDA_VISIBLE_DEVICES
                          chooses what is visible)
  --cpu                   run on the CPU even where there are GPUs
  --mixed_precision P     no | bf16 | fp16 (sets train.mixed_precision)
  --num_machines M --machine_rank R --main_process_ip IP --main_process_port PORT
                          several machines (--num_processes counts every machine's processes)
  --config_file FILE      an accelerate config file (DDP settings only)
  --num_cpu_threads_per_process T, --same_network, --rdzv_backend, --rdzv_conf, --max_restarts,
  --monitor_interval, --tee, --log_dir, --role, --env, --quiet, --enable_cpu_affinity
DeepSpeed, FSDP, Megatron, TPU, fp8 and dynamo flags are refused (this is plain DDP;
model.compile=true compiles)."""

GRACE_SECONDS = 60  # after passing a signal on: then the processes are killed


def check_output_free(module: str, cfg: Config) -> None:
    """The run folder or submission name another command holds is one line here, before any
    process starts (inside a multi-process run, the main process's refusal comes with accelerate's
    failure report of every rank). Only a look: the stage itself holds the lock while it runs."""
    claims = {
        "train.main": ("train", cfg.run_dir, "name"),
        "infer.submit": ("submit", cfg.submit.stem(cfg.name), "submit.file_name"),
    }
    if module in claims:
        stage, output, key = claims[module]
        acquire(output, stage, key).release()


def preflight_training(cfg: Config, plan: Plan) -> None:
    """What training would stop on, checked before any process or GPU is taken: the data layout, the
    label file, the listed images and every class having images (``./run.sh check-data`` does
    this and reads every image). The demo data are made by the stage itself."""
    if not plan.direct:
        # Only training augments. Checking its aug section imports albumentations and torch, so a direct
        # run leaves that to the stage (its first step); several processes get it checked here, once.
        create_train_transform(cfg.aug, cfg.data.image_size)  # building the pipeline checks it
    if not cfg.data.demo:
        resolve_samples(cfg.data)


def create_command(plan: Plan, module: str, ours: list[str], env: dict) -> list[str]:
    """The command that starts ``plan``: ``python -m MODULE`` for one plain process, else
    ``accelerate launch``; sets ``env`` (the processes' environment) as the plan says."""
    env.update(plan.env)
    args = [*ours, *plan.overrides]
    if plan.direct:
        if plan.threads and not env.get("OMP_NUM_THREADS"):
            env["OMP_NUM_THREADS"] = str(plan.threads)
        return [sys.executable, "-m", module, *args]
    config_file = str(plan.config_file or DEFAULT_ACCELERATE_CONFIG)
    accelerate = ["-m", "accelerate.commands.launch", "--quiet", "--config_file", config_file, *plan.accelerate]
    return [sys.executable, *accelerate, "-m", module, *args]


def resolve_module(module: str, cfg: Config) -> str:
    """The stage that does what the command asks: ``evaluate eval.file=FILE`` attacks an exported
    Phase II file (:mod:`phase2.score`), plain ``evaluate`` the checkpoints (:mod:`robust.evaluate`)."""
    return "phase2.score" if module == "robust.evaluate" and cfg.eval.file else module


def launch(module: str, argv: Sequence[str]) -> int:
    ours, accel = split_args(argv)
    flags = parse_flags(accel, COMMANDS.get(module, ""))
    config_path = user_path(_flag_value(ours, "--config"))
    overrides = _overrides_of(ours)
    config_file = user_path(str(flags["config_file"])) if "config_file" in flags else None
    # Fail fast, in one line, before any process starts.
    cfg = load_config(config_path, overrides)
    module = resolve_module(module, cfg)
    devices = probe_devices()
    plan = plan_launch(module, flags, cfg, devices, config_file=config_file)
    if module == "train.main":
        preflight_training(cfg, plan)
    check_output_free(module, cfg)
    print(plan.describe(devices), flush=True)
    with tempfile.TemporaryDirectory() as status:
        env = dict(os.environ, **{STATUS_ENV: status})
        if "--debug" in ours:
            env["ROBUST_PIPELINE_DEBUG"] = "1"
        cmd = create_command(plan, module, ours, env)
        rc, received = supervise(cmd, env)
        return explain_exit(module, rc, received, Path(status), argv)


def _overrides_of(ours: list[str]) -> list[str]:
    """Every argument but ``--config FILE`` and ``--debug``: the stage's overrides, checked here
    (``train.epochs 2`` included, so its error comes before the launch line, not after)."""
    out, skip = [], False
    for arg in ours:
        if skip or arg == "--debug" or arg.startswith("--config="):
            skip = False
        elif arg == "--config":
            skip = True
        else:
            out.append(arg)
    return out


def _flag_value(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def supervise(cmd: list[str], env: dict) -> tuple[int, int | None]:
    """Run ``cmd`` in its own process group; pass SIGINT/SIGTERM on to the whole group and wait.

    Returns ``(exit code, the signal this launcher received or None)``. The group is told to
    stop with SIGTERM (clean for our stages, quiet for accelerate's own launcher), and killed
    if it has not stopped ``GRACE_SECONDS`` later.
    """
    launcher = os.getpid()
    # SIGTERM to the child when this launcher dies, even by SIGKILL (core.cli.die_with_parent)
    proc = subprocess.Popen(
        cmd, env=env, cwd=os.getcwd(), start_new_session=True, preexec_fn=lambda: die_with_parent(launcher)
    )
    received: list[int] = []

    def pass_on(signum, frame) -> None:
        received.append(signum)
        _signal_group(proc.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=GRACE_SECONDS if received else None)
                break
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # Stragglers of the group (a loader worker whose parent was killed): nothing may outlive us.
    _signal_group(proc.pid, signal.SIGKILL)
    return rc, (received[0] if received else None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def resume_command(argv: Sequence[str]) -> str:
    """The command that continues a run: the one that started it, with ``resume=auto`` instead of
    its ``resume=`` / ``overwrite=`` (same config, overrides and launch flags, so the same run)."""
    kept = [a for a in argv if not a.startswith(("resume=", "overwrite="))]
    return shlex.join(["./run.sh", "train", *kept, "resume=auto"])


def next_step(module: str, status: Path, argv: Sequence[str]) -> str:
    """What to type after training ended early: resume from its checkpoint, or (none yet) start again."""
    if module != "train.main":
        return ""
    if any(status.glob(f"{RESUMABLE_STATUS}-*")):
        return f"continue it with {resume_command(argv)}"
    return "it had written no checkpoint yet, so there is nothing to resume: start it again with " + shlex.join(
        ["./run.sh", "train", *argv]
    )


def explain_exit(module: str, rc: int, received: int | None, status: Path, argv: Sequence[str] = ()) -> int:
    """The launcher's exit code, and a line for a process that died without reporting."""
    ended = {p.name.split("-", 1)[1]: p.read_text(encoding="utf-8").split() for p in status.glob("ended-*")}
    started = {p.name.split("-", 1)[1]: p.read_text(encoding="utf-8").strip() for p in status.glob("started-*")}
    step = next_step(module, status, argv)
    hint = f"; {step}" if step else ""
    if received is not None:
        name = signal.Signals(received).name
        print(f"stopped by {name}: every process of the run has ended{hint}", file=sys.stderr)
        return 128 + received
    if rc == 0:
        return 0
    if rc < 0:  # a direct child killed by a signal: the shell's code for it (137 for SIGKILL)
        rc = 128 - rc
    codes = sorted({int(code) for code, _ in ended.values()}, reverse=True)
    silent = sorted(r for r in started if r not in ended)
    if silent:
        rank = silent[0]
        if step.startswith("continue"):
            step = f"{step} (checkpoints are written atomically)"
        resume = f" {step[0].upper()}{step[1:]}." if step else ""
        print(
            f"error: process rank {rank} (pid {started[rank]}) of {module} died without reporting an error: it was "
            f"killed by a signal it cannot catch (SIGKILL: kill -9, or the kernel's out-of-memory killer).{resume}",
            file=sys.stderr,
        )
        return rc
    if hint and any(reason == "crashed" for _, reason in ended.values()):
        print(f"train crashed (the traceback is above){hint} once the cause is fixed", file=sys.stderr)
    # accelerate --quiet maps every failure to 1; keep our own code ("bad input" is 2).
    return next((c for c in codes if c), rc)


def main(argv: Sequence[str]) -> None:
    if not argv:
        raise UserError("usage: python -m launch MODULE [--config FILE] [key=value ...] [launch flags]")
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(USAGE.format(command=COMMANDS.get(argv[0], argv[0])))
        return
    code = launch(argv[0], argv[1:])
    if code:
        raise SystemExit(code)
