"""Run a stage: ``python -m launch MODULE [args]`` (``./run.sh train|submit|evaluate``).

``--config FILE``, ``--debug`` and ``key=value`` are the stage's; every other flag goes as given to
accelerate's own launcher, run in this process. First, before any process starts, a mistake is one
line (config, flags, precision, data, an output in use). Without flags on at most one GPU, the stage
runs here on the config loaded here. How the processes ended is one line; they end with this one.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import signal
import subprocess
import sys
import traceback
from typing import Sequence

from core.cli import LAUNCHER_ENV, quiet_libraries, stop_signal, user_path
from core.config import Config, key_named, load_config
from core.devices import Devices, precision_name, probe_devices, resolve_precision
from core.errors import UserError
from core.labels import resolve_samples
from core.outputs import acquire

USAGE = """usage: ./run.sh {command} [--config FILE] [key=value ...] [accelerate launch flags]

  --config FILE  YAML config (default configs/default.yaml, the CPU demo), relative to your folder
  key=value      dotted overrides, e.g. train.epochs=3 (every key: core/config/schema.py and the stages' config.py)
  --debug        show tracebacks
Every other flag goes to accelerate launch as given (accelerate launch --help): by default every
visible GPU, one process each, bf16 where they have it (train.mixed_precision=auto); without CUDA,
one process. E.g. --num_processes N (on the CPU: N gloo processes), --num_processes 2 --gpu_ids 2,5,
--cpu, --mixed_precision no|bf16|fp16, --config_file FILE, --num_machines M --main_process_ip IP."""

COMMANDS = {"train.main": "train", "infer.submit": "submit", "robust.evaluate": "evaluate", "phase2.score": "evaluate"}
KILLED = "a signal it cannot catch (SIGKILL: kill -9, or the kernel's out-of-memory killer)"
ATTACKING = {"robust.evaluate", "phase2.score"}  # float32, whatever train.mixed_precision says


def split_args(argv: Sequence[str], command: str) -> tuple[str | None, list[str], list[str]]:
    """``(--config FILE, the stage's other arguments, accelerate launch flags with their values)``;
    which flags take a value is accelerate's parser's answer."""
    config, ours, flags, i = None, [], [], 0
    while i < len(argv):
        arg, after = argv[i], argv[i + 1 : i + 2]
        if arg == "--config" or arg.startswith("--config="):
            if config is not None:
                raise UserError("--config is given twice: give one file (key=value overrides change it)")
            config = arg[len("--config=") :] if "=" in arg else "".join(after)
            i += "=" not in arg
            if not config or config.startswith("-"):
                raise UserError("--config needs a file: --config FILE")
        elif arg.startswith("-") and arg != "--debug":
            name, _, value = arg.lstrip("-").partition("=")
            action = accelerate_parser()._option_string_actions.get(arg.split("=", 1)[0])
            if action is None and key_named(name, command):
                value = value or "".join(a for a in after if "=" not in a) or "..."
                raise UserError(f"unknown option --{name}: did you mean {key_named(name, command)}={value}? "
                                "(config keys take key=value)")  # fmt: skip
            if action is None:
                raise UserError(f"unknown option --{name} (accelerate launch flags: ./run.sh {command} --help)")
            takes_value = "=" not in arg and action.nargs != 0 and bool(after)
            flags += argv[i : i + 1 + takes_value]
            i += takes_value
        else:
            ours.append(arg)
        i += 1
    return config, ours, flags


@functools.cache
def accelerate_parser():
    """accelerate launch's own parser, its usage errors as one line (not its 114-line usage)."""
    from accelerate.commands.launch import launch_command_parser

    def refuse(message: str):
        raise UserError(f"accelerate launch: {message}")

    parser = launch_command_parser()
    parser.error = refuse
    return parser


def plan_launch(module: str, cfg: Config, flags: list[str], stage_args: list[str], devices: Devices):
    """``(accelerate launch's reading of flags, (precision, what chose it))``; None: one process here.
    On the CPU several processes are gloo processes of its multi-GPU launcher (``--cpu`` starts one,
    whatever ``--num_processes`` says), each with its share of the cores (accelerate gives one)."""
    from accelerate.commands.config import default_config_file  # accelerate launch would read it
    from accelerate.commands.launch import _validate_launch_command

    if not flags and devices.cuda <= 1 and not os.path.isfile(default_config_file):
        return None, decide_precision(module, cfg, None, devices.cuda == 1, devices)
    logging.getLogger("accelerate.commands.launch").setLevel(logging.ERROR)  # "defaults used instead"
    args = accelerate_parser().parse_args([*flags, "--module", module])
    args.training_script_args, given = stage_args, (args.mixed_precision, args.num_cpu_threads_per_process)
    try:
        args, _, from_file = _validate_launch_command(args)
    except (ValueError, OSError, AssertionError) as exc:
        raise UserError(f"accelerate launch: {exc}") from None
    if args.num_machines > 1 and not args.main_process_ip:  # else every machine waits for ever
        raise UserError(f"--num_machines {args.num_machines} needs --main_process_ip (the main machine's address)")
    args.on_gpu = devices.cuda > 0 and not args.cpu and not args.use_cpu
    if not args.on_gpu:
        args.num_processes = args.num_processes or 1  # accelerate's count of no GPUs: its launcher starts one
        if args.num_processes > 1:
            args.cpu, args.use_cpu, args.multi_gpu = False, False, True
            if devices.cuda:  # --cpu: the processes must not see the GPUs either
                os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if given[1] is None and not os.environ.get("OMP_NUM_THREADS"):
            args.num_cpu_threads_per_process = max(1, devices.cores // (args.num_processes // args.num_machines))
            os.environ["OMP_NUM_THREADS"] = str(args.num_cpu_threads_per_process)
    asked = args.mixed_precision if given[0] or from_file else None
    precision = decide_precision(module, cfg, asked, args.on_gpu, devices)
    args.mixed_precision = precision[0]  # the processes' ACCELERATE_MIXED_PRECISION
    if asked and module not in ATTACKING:
        args.training_script_args.append(f"train.mixed_precision={asked}")
    return args, precision


def decide_precision(module: str, cfg: Config, asked: str | None, on_gpu: bool, devices: Devices) -> tuple[str, str]:
    """The run's precision and the setting that chose it (:func:`core.devices.resolve_precision`)."""
    if module not in ATTACKING:
        precision = resolve_precision(setting := cfg.train.mixed_precision, on_gpu, devices.bf16, asked)
        return precision, f"--mixed_precision {asked}" if asked else f"train.mixed_precision={setting}"
    if asked not in (None, "no"):
        raise UserError(f"--mixed_precision {asked}: evaluate attacks in float32 (a gradient in {asked} is "
                        "coarser, and a weaker attack flatters the model)")  # fmt: skip
    return "no", "evaluate attacks in float32"


def describe(module: str, args, devices: Devices, precision: tuple[str, str]) -> str:
    """The start-up line: processes, devices, precision (``args`` None: one process here)."""
    n, machines = (args.num_processes, args.num_machines) if args else (1, 1)
    ids = None
    if args.on_gpu if args else devices.cuda:
        gpu_ids = getattr(args, "gpu_ids", None)
        ids = list(range(n // machines)) if gpu_ids in (None, "all") else [int(i) for i in gpu_ids.split(",")]
    how = "1 process" if n == 1 else f"{n} processes ({'DDP' if ids else 'gloo'})"
    how += f" on {machines} machines, {n // machines} here" if machines > 1 else ""
    threads = args.num_cpu_threads_per_process if args else devices.cores
    where = devices.describe(ids) + ("" if ids else f", {threads} torch thread{'s' * (threads > 1)} each")
    command, (name, source) = COMMANDS.get(module, module), precision
    return f"launch: {command} as {how} on {where}; precision {precision_name(name)} ({source})"


def check_before_start(module: str, cfg: Config) -> None:
    """What the stage would stop on, before any process or GPU is taken: the training data (the demo
    data are made by the stage) and an output another command holds (the stage then takes it)."""
    if module == "train.main" and not cfg.data.demo:
        resolve_samples(cfg.data)
    claims = {"train.main": (cfg.run_dir, "name"), "infer.submit": (cfg.submit.stem(cfg.name), "submit.file_name")}
    if module in claims:
        acquire(claims[module][0], COMMANDS[module], claims[module][1]).release()


def launch(module: str, argv: Sequence[str]) -> int:
    config, ours, flags = split_args(argv, COMMANDS.get(module, ""))
    cfg = load_config(user_path(config), [a for a in ours if a != "--debug"])
    module = "phase2.score" if module == "robust.evaluate" and cfg.eval.file else module
    devices = probe_devices()
    stage_args = [*(["--config", str(user_path(config))] if config else []), *ours]
    args, precision = plan_launch(module, cfg, flags, stage_args, devices)
    check_before_start(module, cfg)
    print(describe(module, args, devices, precision), flush=True)
    if args is None:
        return run_here(module, cfg, devices, argv)
    if "--debug" in ours:
        os.environ["ROBUST_PIPELINE_DEBUG"] = "1"
    return run_processes(module, cfg, args, argv)


def run_here(module: str, cfg: Config, devices: Devices, argv: Sequence[str]) -> int:
    """The stage's ``run(cfg)`` in this process, on every core: the config reaches it loaded once."""
    quiet_libraries()
    if not os.environ.get("OMP_NUM_THREADS"):
        __import__("torch").set_num_threads(devices.cores)
    try:
        importlib.import_module(module).run(cfg)
        return 0
    except BaseException as exc:
        if not (stop := stop_signal(exc)) and (isinstance(exc, UserError) or not isinstance(exc, Exception)):
            raise
        if not stop:
            traceback.print_exc()  # a crash: then what to type
    # out of the except block, the stage's frames are gone: its progress bar has closed its line
    return stopped(stop, module, cfg, argv) if stop else explain_exit(1, 0, os.getpid(), module, cfg, argv)


def run_processes(module: str, cfg: Config, args, argv: Sequence[str]) -> int:
    """accelerate's launcher with ``args``, in this process (several processes: torch's elastic agent,
    which passes a stop on to them and reports how each ended); how they ended, in one line."""
    import torch.distributed.run  # noqa: F401  (its loggers, quietened below: our line says it)
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the processes end with this one (core.cli)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        if not (args.multi_gpu or args.use_deepspeed or args.use_fsdp or args.use_megatron_lm or args.tpu):
            return run_one(args, module, cfg, argv)
        launch_command(args)
        return 0
    except ChildFailedError as exc:  # the cause: a process killed by a signal, a refusal (2), the first
        rank, why = min(exc.failures.items(), key=lambda f: (f[1].exitcode >= 0, f[1].exitcode != 2, f[1].timestamp))
        return explain_exit(why.exitcode, rank, why.pid, module, cfg, argv)
    except BaseException as exc:  # a stop: torch's agent has passed it on to every process
        if not (signum := exc.sigval if isinstance(exc, SignalException) else stop_signal(exc)):
            raise
        return stopped(signum, module, cfg, argv)


def run_one(args, module: str, cfg: Config, argv: Sequence[str]) -> int:
    """accelerate's one-process launch (its ``simple_launcher``); a stop reaches the process and its workers."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return explain_exit(proc.wait(), 0, proc.pid, module, cfg, argv)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)  # then it is killed
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise


def next_step(module: str, cfg: Config, argv: Sequence[str]) -> str:
    """What to type after the run ended early, where the stage says (its ``next_step(cfg, argv)``)."""
    hint = getattr(importlib.import_module(module), "next_step", None)
    return hint(cfg, argv) if hint else ""


def stopped(signum: int, module: str, cfg: Config, argv: Sequence[str]) -> int:
    step = f"; {step}" if (step := next_step(module, cfg, argv)) else ""
    print(f"stopped by {signal.Signals(signum).name}: every process of the run has ended{step}", file=sys.stderr)
    return 128 + signum


def explain_exit(code: int, rank: int, pid: int, module: str, cfg: Config, argv: Sequence[str]) -> int:
    """The exit code for a process that ended with ``code``; a line where it could not say why."""
    step = next_step(module, cfg, argv) if code else ""
    if code < 0:  # killed by a signal: the shell's code for it (137 for SIGKILL)
        name = signal.Signals(-code).name if code != -signal.SIGKILL else KILLED
        resume = f" {step[:1].upper()}{step[1:]}{' (checkpoints are written atomically)' * step.startswith('cont')}."
        print(f"error: process rank {rank} (pid {pid}) of {module} died without reporting an error: it was killed by "
              f"{name}.{resume * bool(step)}", file=sys.stderr)  # fmt: skip
        return 128 - code
    if code == 1 and step:
        print(f"{COMMANDS[module]} crashed (the traceback is above); {step} once the cause is fixed", file=sys.stderr)
    return code


def main(argv: Sequence[str]) -> None:
    if not argv or any(a in ("-h", "--help") for a in argv[1:]):
        print(USAGE.format(command=COMMANDS.get(argv[0], argv[0]) if argv else "train|submit|evaluate"))
    elif code := launch(argv[0], argv[1:]):
        raise SystemExit(code)
