"""Run a stage: ``python -m launch MODULE [args]`` (``./run.sh train|submit|evaluate``).

Our own arguments are ``--config FILE``, ``--debug`` and ``key=value``; every other ``--flag`` is
``accelerate launch``'s, read by accelerate's own parser and carried out by its own launcher (its
defaults: every visible GPU, one process each). Decided here, before any process starts, so a
mistake is one line: the config, accelerate's reading of its flags, the precision
(``train.mixed_precision=auto``: bf16 on GPUs that compute it), the training data and the output
another command holds. Then one line says what starts: processes, devices, precision.

Without launch flags, on a machine with at most one GPU (and no accelerate default config), one
process runs: the stage runs here, in this process, with the config already loaded. Anything else
runs through accelerate's launcher in this process: torch's elastic agent starts the processes,
passes a stop signal on to them and reports how each ended, which is explained here in one line.
Every started process ends when this launcher dies, even by SIGKILL (:func:`core.cli.die_with_parent`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import shlex
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

  --config FILE   YAML config (default configs/default.yaml, the CPU demo); a relative FILE is
                  taken from the folder you run the command in
  key=value       dotted overrides, e.g. train.epochs=3 data.image_size=64 train.adv.mode=pgd
  --debug         show tracebacks

Config sections: name, out_dir, seed, resume, overwrite, data, aug, model, train (train.adv:
adversarial training), wandb, tta, gcm, random_pad, submit, budget, export, eval. Every key, its
default and what it means: core/config/schema.py; paths inside a config are relative to the repository.

Every other flag goes to accelerate launch as given (accelerate launch --help lists them). Default:
every visible GPU, one process each, bf16 where the GPUs have it (train.mixed_precision=auto); on a
machine without CUDA one process. For example:
  --num_processes N       N processes (the first N GPUs; on the CPU, N gloo processes)
  --gpu_ids 0,2           which of the visible GPUs
  --cpu                   run on the CPU even where there are GPUs
  --mixed_precision P     no | bf16 | fp16 (sets train.mixed_precision)
  --num_machines M --machine_rank R --main_process_ip IP --main_process_port PORT
  --config_file FILE      an accelerate config file"""

COMMANDS = {"train.main": "train", "infer.submit": "submit", "robust.evaluate": "evaluate", "phase2.score": "evaluate"}
ATTACKING = {"robust.evaluate", "phase2.score"}  # float32, whatever train.mixed_precision says
GRACE_SECONDS = 60  # after passing a stop on to the one process: then it is killed


def split_args(argv: Sequence[str], command: str) -> tuple[str | None, list[str], list[str]]:
    """``(--config FILE, overrides and --debug, accelerate launch flags with their values)``; whether
    a flag takes a value is accelerate's parser's answer."""
    config, ours, flags = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if config is not None:
                raise UserError("--config is given twice: give one file (key=value overrides change it)")
            config = arg[len("--config=") :] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += "=" not in arg
            if not config or config.startswith("-"):
                raise UserError("--config needs a file: --config FILE")
        elif arg.startswith("-") and arg != "--debug":
            action = accelerate_parser()._option_string_actions.get(arg.split("=", 1)[0])
            if action is None:
                name, value = arg.lstrip("-").split("=", 1)[0], arg.partition("=")[2] or argv[i + 1 : i + 2]
                key = key_named(name, command)
                if key:
                    shown = value if isinstance(value, str) else (value[0] if value and "=" not in value[0] else "")
                    raise UserError(
                        f"unknown option --{name}: did you mean {key}={shown or '...'}? (config keys take key=value)"
                    )
                raise UserError(f"unknown option --{name} (accelerate launch flags: ./run.sh {command} --help)")
            takes_value = "=" not in arg and action.nargs != 0 and i + 1 < len(argv)
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


def read_launch(flags: list[str], module: str, stage_args: list[str]):
    """accelerate launch's settings for ``flags`` as accelerate decides them (its defaults, the
    ``--config_file``), and the mixed precision asked for (None: not asked)."""
    from accelerate.commands.launch import _validate_launch_command

    logging.getLogger("accelerate.commands.launch").setLevel(logging.ERROR)  # "defaults used instead"
    args = accelerate_parser().parse_args([*flags, "--module", module])
    args.training_script_args = stage_args
    asked, threads = args.mixed_precision, args.num_cpu_threads_per_process
    try:
        args, _, from_file = _validate_launch_command(args)
    except (ValueError, OSError, AssertionError) as exc:
        raise UserError(f"accelerate launch: {exc}") from None
    if args.num_machines > 1 and not args.main_process_ip:  # else every machine waits for ever
        raise UserError(f"--num_machines {args.num_machines} needs --main_process_ip (the main machine's address)")
    args.user_threads = threads is not None or bool(os.environ.get("OMP_NUM_THREADS"))
    return args, (args.mixed_precision if asked or from_file else None)


def fit_to_cpu(args, devices: Devices) -> None:
    """On the CPU, several processes are gloo processes started by accelerate's multi-GPU launcher
    (its ``--cpu`` starts one, whatever ``--num_processes`` says), each with its share of the cores
    (accelerate gives each one thread: several times slower, BENCHMARKS.md)."""
    args.num_processes = args.num_processes or 1  # accelerate's count of no GPUs: its launcher starts one
    if args.num_processes > 1:
        args.cpu = args.use_cpu = False
        args.multi_gpu = True
        if devices.cuda:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if not args.user_threads:
        args.num_cpu_threads_per_process = max(1, devices.cores // (args.num_processes // args.num_machines))
        os.environ["OMP_NUM_THREADS"] = str(args.num_cpu_threads_per_process)


def decide_precision(module: str, cfg: Config, asked: str | None, on_gpu: bool, devices: Devices) -> tuple[str, str]:
    """The run's precision and the setting that chose it (:func:`core.devices.resolve_precision`)."""
    if module in ATTACKING:
        if asked not in (None, "no"):
            raise UserError(
                f"--mixed_precision {asked}: evaluate attacks in float32 (a gradient in {asked} is coarser, and "
                "a weaker attack flatters the model)"
            )
        return "no", "evaluate attacks in float32"
    setting = cfg.train.mixed_precision
    precision = resolve_precision(setting, on_gpu, devices.bf16, asked)
    return precision, f"--mixed_precision {asked}" if asked else f"train.mixed_precision={setting}"


def describe(module: str, args, devices: Devices, precision: tuple[str, str]) -> str:
    """The start-up line: processes, devices, precision (``args`` None: one process here)."""
    n, machines = (args.num_processes, args.num_machines) if args else (1, 1)
    threads = args.num_cpu_threads_per_process if args else devices.cores
    ids = None
    if devices.cuda and not (args and (args.cpu or args.use_cpu or os.environ.get("CUDA_VISIBLE_DEVICES") == "")):
        gpu_ids = getattr(args, "gpu_ids", None)
        ids = list(range(n // machines)) if gpu_ids in (None, "all") else [int(i) for i in gpu_ids.split(",")]
    how = "1 process" if n == 1 else f"{n} processes ({'DDP' if ids else 'gloo'})"
    if machines > 1:
        how += f" on {machines} machines, {n // machines} here"
    where = devices.describe(ids) + (f", {threads} torch thread{'s' * (threads > 1)} each" if not ids else "")
    command = COMMANDS.get(module, module)
    return f"launch: {command} as {how} on {where}; precision {precision_name(precision[0])} ({precision[1]})"


def plan_launch(module: str, cfg: Config, flags: list[str], stage_args: list[str], devices: Devices):
    """``(accelerate launch's settings, precision)`` for the run; settings None: one process, here."""
    if not flags and devices.cuda <= 1 and not default_accelerate_config():
        return None, decide_precision(module, cfg, None, devices.cuda == 1, devices)
    args, asked = read_launch(flags, module, stage_args)
    on_gpu = devices.cuda > 0 and not args.cpu and not args.use_cpu
    if not on_gpu:
        fit_to_cpu(args, devices)
    precision = decide_precision(module, cfg, asked, on_gpu, devices)
    args.mixed_precision = precision[0]  # the processes' ACCELERATE_MIXED_PRECISION
    if asked and module not in ATTACKING:
        args.training_script_args.append(f"train.mixed_precision={asked}")
    return args, precision


def check_before_start(module: str, cfg: Config) -> None:
    """What the stage would stop on, checked before any process or GPU is taken: the training data
    (the listed images and their classes; the demo data are made by the stage) and the run folder
    or submission another command holds (the stage itself then takes the lock)."""
    if module == "train.main" and not cfg.data.demo:
        resolve_samples(cfg.data)
    claims = {"train.main": (cfg.run_dir, "name"), "infer.submit": (cfg.submission_stem, "submit.file_name")}
    if module in claims:
        acquire(claims[module][0], COMMANDS[module], claims[module][1]).release()


def launch(module: str, argv: Sequence[str]) -> int:
    config, ours, flags = split_args(argv, COMMANDS.get(module, ""))
    cfg = load_config(user_path(config), [a for a in ours if a != "--debug"], check_aug=module == "train.main")
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


def default_accelerate_config() -> bool:
    """Whether accelerate would read a default config of this machine (``accelerate config``)."""
    from accelerate.commands.config import default_config_file

    return os.path.isfile(default_config_file)


def run_here(module: str, cfg: Config, devices: Devices, argv: Sequence[str]) -> int:
    """The stage's ``run(cfg)`` in this process, on every core: the config reaches it loaded once."""
    quiet_libraries()
    if not os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(devices.cores)
    try:
        importlib.import_module(module).run(cfg)
        return 0
    except UserError:
        raise
    except BaseException as exc:
        stop = stop_signal(exc)
        if stop:
            return stopped(stop, module, cfg, argv)
        if isinstance(exc, Exception) and module == "train.main":
            traceback.print_exc()
            return explain_exit(1, 0, os.getpid(), module, cfg, argv)
        raise


def run_processes(module: str, cfg: Config, args, argv: Sequence[str]) -> int:
    """accelerate's launcher with ``args``, in this process; how its processes ended, in one line."""
    import torch.distributed.run  # noqa: F401  (its loggers, quietened below)
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the processes end with this one (core.cli)
    for name in list(logging.root.manager.loggerDict):  # its lines about each failure: ours say it
        if name.startswith(("torch.distributed.elastic", "accelerate.commands")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    simple = not (args.multi_gpu or args.use_deepspeed or args.use_fsdp or args.use_megatron_lm or args.tpu)
    try:
        if simple:
            return run_one(args, module, cfg, argv)
        launch_command(args)
        return 0
    except SignalException as exc:
        return stopped(exc.sigval, module, cfg, argv)
    except ChildFailedError as exc:
        # the cause: a process killed by a signal, else a refusal (2), else the first to fail
        rank, failure = min(
            exc.failures.items(), key=lambda f: (f[1].exitcode >= 0, f[1].exitcode != 2, f[1].timestamp)
        )
        return explain_exit(failure.exitcode, rank, failure.pid, module, cfg, argv)
    except BaseException as exc:
        if stop_signal(exc):
            return stopped(stop_signal(exc), module, cfg, argv)
        raise


def run_one(args, module: str, cfg: Config, argv: Sequence[str]) -> int:
    """accelerate's one-process launch (its ``simple_launcher``), waiting for the process: a stop is
    passed on to it and its loader workers."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return explain_exit(proc.wait(), 0, proc.pid, module, cfg, argv)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise


def resume_command(argv: Sequence[str]) -> str:
    """The command that continues a run: the one that started it, with ``resume=auto`` instead of
    its ``resume=`` / ``overwrite=`` (same config, overrides and launch flags, so the same run)."""
    kept = [a for a in argv if not a.startswith(("resume=", "overwrite="))]
    return shlex.join(["./run.sh", "train", *kept, "resume=auto"])


def next_step(module: str, cfg: Config, argv: Sequence[str]) -> str:
    """What to type after training ended early: resume from its newest checkpoint, or start again."""
    if module != "train.main":
        return ""
    folder = cfg.run_dir / "checkpoints"  # complete ones: a .tmp folder is a torn write (train.state)
    if folder.is_dir() and any(p.is_dir() and not p.name.endswith(".tmp") for p in folder.iterdir()):
        return f"continue it with {resume_command(argv)}"
    return "it had written no checkpoint yet, so there is nothing to resume: start it again with " + shlex.join(
        ["./run.sh", "train", *argv]
    )


def stopped(signum: int, module: str, cfg: Config, argv: Sequence[str]) -> int:
    step = next_step(module, cfg, argv)
    hint = f"; {step}" if step else ""
    print(f"stopped by {signal.Signals(signum).name}: every process of the run has ended{hint}", file=sys.stderr)
    return 128 + signum


def explain_exit(code: int, rank: int, pid: int, module: str, cfg: Config, argv: Sequence[str]) -> int:
    """The launcher's exit code for a process that ended with ``code``, and a line where the process
    could not say why: killed by a signal, or crashed (its traceback is above)."""
    step = next_step(module, cfg, argv) if code else ""
    if code < 0:  # killed by a signal: the shell's code for it (137 for SIGKILL)
        name = signal.Signals(-code).name
        if -code == signal.SIGKILL:
            name = "a signal it cannot catch (SIGKILL: kill -9, or the kernel's out-of-memory killer)"
        resume = f" {step[0].upper()}{step[1:]}{' (checkpoints are written atomically)' * step.startswith('continue')}."
        print(
            f"error: process rank {rank} (pid {pid}) of {module} died without reporting an error: it was killed by "
            f"{name}.{resume if step else ''}",
            file=sys.stderr,
        )
        return 128 - code
    if code == 1 and step:
        print(f"train crashed (the traceback is above); {step} once the cause is fixed", file=sys.stderr)
    return code


def main(argv: Sequence[str]) -> None:
    if not argv:
        raise UserError("usage: python -m launch MODULE [--config FILE] [key=value ...] [launch flags]")
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(USAGE.format(command=COMMANDS.get(argv[0], argv[0])))
        return
    code = launch(argv[0], argv[1:])
    if code:
        raise SystemExit(code)
