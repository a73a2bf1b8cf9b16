"""Run a stage: ``python -m core.launch MODULE [args]``.

Our own arguments are ``--config FILE``, ``--debug`` and ``key=value``; every other ``--flag``
(with its value) goes to ``accelerate launch``, e.g. ``--num_processes 4`` or
``--config_file configs/accelerate/multi_gpu.yaml``. The config is checked here first, so a
bad key fails in one line before any process starts.

Without any such flag (and with the default accelerate config asking for one plain process)
the stage runs as one direct child, ``python -m MODULE``: ``accelerate launch`` would only add
an interpreter that imports torch (seconds) to start it, and ``Accelerator()`` builds the same
one-process state without it (the stages pass their device and precision themselves).

On a machine without CUDA, ``accelerate launch --cpu --num_processes 2`` silently runs ONE
process; several CPU processes need ``--multi_gpu`` (the code then uses ``Accelerator(cpu=True)``
and gloo), which this launcher adds for you.

``accelerate launch`` also exports ``OMP_NUM_THREADS=1`` unless the run is marked CPU-only, so
a plain CPU run would compute on one core, several times slower on a multi-core machine
(BENCHMARKS.md, the "1 thread" rows). Without CUDA this launcher gives each process its share of the
cores instead, unless ``--num_cpu_threads_per_process`` or ``OMP_NUM_THREADS`` is set. A direct run
gets every core the same way (``OMP_NUM_THREADS``, unless set), with or without a GPU: it has no
other process to share them with.

Stopping: SIGINT or SIGTERM sent to this launcher (Ctrl-C, ``kill PID``, ``timeout``, a job
scheduler) is passed on to every process it started, which stop cleanly (checkpoints are
published atomically); it waits for them, so nothing keeps running. A process that dies without
a word (SIGKILL, the out-of-memory killer) is named, with the command that resumes the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from core.cli import STATUS_ENV, run_cli, user_path
from core.config import Config, key_named, load_config
from core.errors import UserError
from core.outputs import acquire

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "default.yaml"

# accelerate launch flags that take no value.
_BOOLEAN_FLAGS = {
    "--cpu",
    "--multi_gpu",
    "--tpu",
    "--use_deepspeed",
    "--use_fsdp",
    "--use_megatron_lm",
    "--quiet",
    "-q",
    "--no_python",
    "--module",
    "-m",
    "--same_network",
    "--dynamo_use_fullgraph",
    "--dynamo_use_dynamic",
    "--enable_cpu_affinity",
    "--debug",
}


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split into (our args, accelerate launch args)."""
    ours, accel = [], []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "--debug") or arg.startswith("--config="):
            ours.append(arg)
            if arg == "--config" and i + 1 < len(argv):
                ours.append(argv[i + 1])
                i += 1
        elif arg.startswith("-"):
            accel.append(arg)
            takes_value = "=" not in arg and arg not in _BOOLEAN_FLAGS
            if takes_value and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
                accel.append(argv[i + 1])
                i += 1
        else:
            ours.append(arg)
        i += 1
    return ours, accel


def _flag_value(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _config_processes(accel: list[str]) -> int:
    """``num_processes`` of the accelerate config file in ``accel`` (1 if unreadable)."""
    import yaml

    try:
        with open(_flag_value(accel, "--config_file"), encoding="utf-8") as fh:
            value = (yaml.safe_load(fh) or {}).get("num_processes", 1)
        return max(1, int(value))
    except (OSError, TypeError, ValueError, AttributeError, yaml.YAMLError):
        return 1  # accelerate itself reports a bad config file


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_of_cores(processes: int, cores: int | None = None) -> int:
    """Torch threads for each of ``processes`` CPU processes: its share of the cores, at least one."""
    return max(1, (cores or available_cores()) // processes)


# What `accelerate launch` does with a config file holding only these is what running the stage
# directly does: one local process, no distributed backend, precision left to the stage.
_ONE_PLAIN_PROCESS = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "NO",
    "num_machines": 1,
    "num_processes": 1,
    "machine_rank": 0,
    "mixed_precision": "no",
    "use_cpu": False,
}


def runs_directly(accel: Sequence[str], config_file: Path = DEFAULT_ACCELERATE_CONFIG) -> bool:
    """No accelerate flag, and the default accelerate config asks for nothing beyond one plain process."""
    import yaml

    if accel:
        return False
    try:
        settings = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # accelerate launch reports the file
    missing = object()
    return isinstance(settings, dict) and all(_ONE_PLAIN_PROCESS.get(k, missing) == v for k, v in settings.items())


def resolve_launch_args(
    accel: list[str], has_cuda: bool, cores: int | None = None, env: dict | None = None
) -> tuple[list[str], str | None]:
    """Add the default accelerate config, fix multi-process CPU runs and their thread count.

    Returns (args, note); ``note`` explains a change the user should know about.
    """
    accel = list(accel)
    env = os.environ if env is None else env
    note = None
    if _flag_value(accel, "--config_file") is None:
        accel = ["--config_file", str(DEFAULT_ACCELERATE_CONFIG), *accel]
    n = _flag_value(accel, "--num_processes")
    processes = int(n) if n is not None and n.isdigit() and int(n) > 0 else _config_processes(accel)
    if processes > 1 and not has_cuda and "--multi_gpu" not in accel:
        if "--cpu" in accel:
            accel.remove("--cpu")
        accel.append("--multi_gpu")
        note = f"no CUDA: running {n} CPU processes with gloo (--multi_gpu added; --cpu alone would run one)"
    if not has_cuda and _flag_value(accel, "--num_cpu_threads_per_process") is None and not env.get("OMP_NUM_THREADS"):
        accel += ["--num_cpu_threads_per_process", str(share_of_cores(processes, cores))]
    return accel, note


def accelerate_command(module: str, ours: list[str], accel: list[str]) -> list[str]:
    """``accelerate launch ... -m MODULE [our args]`` (this imports torch, to look for CUDA)."""
    import torch

    accel, note = resolve_launch_args(accel, torch.cuda.is_available())
    if note:
        print(note, file=sys.stderr)
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *accel, "-m", module, *ours]


def direct_command(module: str, ours: list[str], env: dict) -> list[str]:
    """``python -m MODULE [our args]``; sets ``env``'s ``OMP_NUM_THREADS`` to every core unless it is set."""
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(share_of_cores(1))
    return [sys.executable, "-m", module, *ours]


USAGE = """usage: ./run.sh {command} [--config FILE] [key=value ...] [accelerate flags]

  --config FILE   YAML config (default configs/default.yaml, the CPU demo); a relative FILE is
                  taken from the folder you run the command in
  key=value       dotted overrides, e.g. train.epochs=3 data.image_size=64 train.adv.mode=pgd
  --debug         show tracebacks

Config sections: name, out_dir, seed, resume, overwrite, data, aug, model, train (train.adv:
adversarial training), wandb, tta, gcm, random_pad, submit, budget, export, eval. Every key, its
default and what it means: core/config.py; paths inside a config are relative to the repository.

Any other --flag goes to `accelerate launch` (e.g. --num_processes 2, --config_file
configs/accelerate/multi_gpu.yaml); see `.venv/bin/accelerate launch --help`."""

GRACE_SECONDS = 60  # after passing a signal on: then the processes are killed


def check_flags(accel: list[str], module: str = "") -> None:
    """A ``--flag`` that is one of our config keys and not an ``accelerate launch`` flag is a
    mistake for ``key=value``: one line saying so (accelerate would print its whole usage)."""
    for i, arg in enumerate(accel):
        name, _, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        key = key_named(name, {"train.main": "train", "infer.submit": "submit"}.get(module, "")) if name else None
        if key is None:
            continue
        from accelerate.commands.launch import launch_command_parser  # only now: it takes seconds

        if arg.split("=", 1)[0] in {o for a in launch_command_parser()._actions for o in a.option_strings}:
            continue
        if not value and i + 1 < len(accel) and not accel[i + 1].startswith("-"):
            value = accel[i + 1]
        raise UserError(f"unknown option --{name}: did you mean {key}={value or '...'}? (config keys take key=value)")


def check_output_free(module: str, cfg: Config) -> None:
    """The run folder or submission name another command holds is one line here, before any
    process starts (inside a multi-process run, the main process's refusal comes with accelerate's
    failure report of every rank). Only a look: the stage itself holds the lock while it runs."""
    claims = {
        "train.main": ("train", cfg.run_dir, "name"),
        "infer.submit": ("submit", Path(cfg.submit.out_dir) / (cfg.submit.file_name or cfg.name), "submit.file_name"),
    }
    if module in claims:
        stage, output, key = claims[module]
        acquire(output, stage, key).release()


def launch(module: str, argv: Sequence[str]) -> int:
    ours, accel = split_args(argv)
    check_flags(accel, module)
    config_path = user_path(_flag_value(ours, "--config"))
    overrides = [a for a in ours if "=" in a and not a.startswith("--")]
    direct = runs_directly(accel)
    # Fail fast, in one line, before any process starts. Only training augments; checking its aug
    # section imports albumentations and torch, so a direct run leaves that to the stage (its first
    # step), and under accelerate launch it is checked here once instead of in every process.
    cfg = load_config(config_path, overrides, check_aug=module == "train.main" and not direct)
    check_output_free(module, cfg)
    with tempfile.TemporaryDirectory() as status:
        env = dict(os.environ, **{STATUS_ENV: status})
        if "--debug" in ours:
            env["ROBUST_PIPELINE_DEBUG"] = "1"
        cmd = direct_command(module, ours, env) if direct else accelerate_command(module, ours, accel)
        rc, received = supervise(cmd, env)
        return explain_exit(module, rc, received, Path(status))


def supervise(cmd: list[str], env: dict) -> tuple[int, int | None]:
    """Run ``cmd`` in its own process group; pass SIGINT/SIGTERM on to the whole group and wait.

    Returns ``(exit code, the signal this launcher received or None)``. The group is told to
    stop with SIGTERM (clean for our stages, quiet for accelerate's own launcher), and killed
    if it has not stopped ``GRACE_SECONDS`` later.
    """
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), start_new_session=True)
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


def explain_exit(module: str, rc: int, received: int | None, status: Path) -> int:
    """The launcher's exit code, and a line for a process that died without reporting."""
    ended = {p.name.split("-", 1)[1]: p.read_text(encoding="utf-8").split() for p in status.glob("ended-*")}
    started = {p.name.split("-", 1)[1]: p.read_text(encoding="utf-8").strip() for p in status.glob("started-*")}
    if received is not None:
        name = signal.Signals(received).name
        print(f"stopped by {name}: every process of the run has ended", file=sys.stderr)
        return 128 + received
    if rc == 0:
        return 0
    if rc < 0:  # a direct child killed by a signal: the shell's code for it (137 for SIGKILL)
        rc = 128 - rc
    codes = sorted({int(code) for code, _ in ended.values()}, reverse=True)
    silent = sorted(r for r in started if r not in ended)
    if silent:
        rank = silent[0]
        resume = (
            " Continue it with ./run.sh train resume=auto (checkpoints are written atomically)."
            if module == "train.main"
            else ""
        )
        print(
            f"error: process rank {rank} (pid {started[rank]}) of {module} died without reporting an error: it was "
            f"killed by a signal it cannot catch (SIGKILL: kill -9, or the kernel's out-of-memory killer).{resume}",
            file=sys.stderr,
        )
        return rc
    # accelerate --quiet maps every failure to 1; keep our own code ("bad input" is 2).
    return next((c for c in codes if c), rc)


def main(argv: Sequence[str]) -> None:
    if not argv:
        raise UserError("usage: python -m core.launch MODULE [--config FILE] [key=value ...] [accelerate flags]")
    if any(a in ("-h", "--help") for a in argv[1:]):
        command = {"train.main": "train", "infer.submit": "submit"}.get(argv[0], argv[0])
        print(USAGE.format(command=command))
        return
    code = launch(argv[0], argv[1:])
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    raise SystemExit(run_cli(lambda a: main(a)))
