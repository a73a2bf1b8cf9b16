"""Run a stage under ``accelerate launch``: ``python -m core.launch MODULE [args]``.

Our own arguments are ``--config FILE``, ``--debug`` and ``key=value``; every other ``--flag``
(with its value) goes to ``accelerate launch``, e.g. ``--num_processes 4`` or
``--config_file configs/accelerate/multi_gpu.yaml``. The config is checked here first, so a
bad key fails in one line before any process starts.

On a machine without CUDA, ``accelerate launch --cpu --num_processes 2`` silently runs ONE
process; several CPU processes need ``--multi_gpu`` (the code then uses ``Accelerator(cpu=True)``
and gloo), which this launcher adds for you.

``accelerate launch`` also exports ``OMP_NUM_THREADS=1`` unless the run is marked CPU-only, so
a plain CPU run would compute on one core, several times slower on a multi-core machine
(BENCHMARKS.md, the "1 thread" rows). Without CUDA this launcher gives each process its share of the
cores instead, unless ``--num_cpu_threads_per_process`` or ``OMP_NUM_THREADS`` is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from core.cli import STATUS_ENV, run_cli
from core.config import load_config
from core.errors import UserError

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
        threads = max(1, (cores or available_cores()) // processes)
        accel += ["--num_cpu_threads_per_process", str(threads)]
    return accel, note


def launch(module: str, argv: Sequence[str]) -> int:
    ours, accel = split_args(argv)
    config_path = _flag_value(ours, "--config")
    overrides = [a for a in ours if "=" in a and not a.startswith("--")]
    load_config(config_path, overrides)  # fail fast, in one line, before any process starts

    import torch

    accel, note = resolve_launch_args(accel, torch.cuda.is_available())
    if note:
        print(note, file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        status = Path(tmp) / "status"
        env = dict(os.environ, **{STATUS_ENV: str(status)})
        if "--debug" in ours:
            env["ROBUST_PIPELINE_DEBUG"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *accel, "-m", module, *ours]
        rc = subprocess.call(cmd, env=env, cwd=os.getcwd())
        if rc != 0 and status.is_file():
            # accelerate --quiet maps every failure to 1; keep our "bad input" code.
            return int(status.read_text() or rc)
        return rc


def main(argv: Sequence[str]) -> None:
    if not argv:
        raise UserError("usage: python -m core.launch MODULE [--config FILE] [key=value ...] [accelerate flags]")
    code = launch(argv[0], argv[1:])
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    raise SystemExit(run_cli(lambda a: main(a)))
