"""How a stage is started: processes, devices and precision, decided before any process starts.

:func:`plan_launch` turns the command line's launch flags (``accelerate launch``'s own names),
an accelerate config file and the machine (:class:`core.devices.Devices`) into a :class:`Plan`:

* **GPUs.** With N visible CUDA devices the run uses all N (one process each), as ``accelerate
  launch`` does without a config file; ``--num_processes k`` uses the first k, ``--gpu_ids`` picks
  which (numbered as torch numbers the visible devices, so it composes with ``CUDA_VISIBLE_DEVICES``),
  ``--cpu`` runs on the CPU whatever is there. Asking for more processes per machine than there
  are GPUs is an error.
* **CPU.** One process by default, run directly (no ``accelerate launch`` in between);
  ``--num_processes k`` starts k gloo processes, each with its share of the cores (``accelerate
  launch --cpu --num_processes 2`` silently runs one, so ``--multi_gpu`` is passed instead).
* **Precision.** ``--mixed_precision`` sets ``train.mixed_precision`` (a different explicit value
  of the key is a conflict); ``auto`` resolves to bf16 on GPUs that compute it, float32 elsewhere.
* **Every flag is honoured or refused.** The flags of ``accelerate launch`` this pipeline has no
  use for (DeepSpeed, FSDP, Megatron, TPU, dynamo, ...) are refused in one line naming the config
  key that does the job, where there is one; an unknown flag is refused too.

Nothing here starts a process or touches a device: tests plan launches for faked machines.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core.config import Config, key_named
from core.devices import Devices, precision_name, resolve_precision
from core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "default.yaml"

# The stages started through the launcher and the command that names each.
COMMANDS = {"train.main": "train", "infer.submit": "submit", "robust.evaluate": "evaluate", "phase2.score": "evaluate"}
# The stages that attack: float32, whatever train.mixed_precision says.
ATTACKING = {"robust.evaluate", "phase2.score"}

# accelerate launch flags that take a value and that this launcher decides itself.
PLANNED = {"num_processes", "num_machines", "gpu_ids", "mixed_precision", "config_file", "num_cpu_threads_per_process"}
# ... that go to accelerate launch as given (several machines, logs, rendezvous).
PASSED = {
    "machine_rank", "main_process_ip", "main_process_port", "rdzv_backend", "rdzv_conf", "max_restarts",
    "monitor_interval", "tee", "log_dir", "role", "env",
}  # fmt: skip
# flags without a value: planned (cpu, multi_gpu) or passed.
SWITCHES = {"cpu", "multi_gpu", "same_network", "quiet", "q", "enable_cpu_affinity"}
# Refused, by name or prefix, with what to do instead.
REFUSED = (
    ("use_deepspeed", "DeepSpeed is not supported: training is plain DDP (a ConvNeXt-tiny fits any GPU)"),
    ("deepspeed_", "DeepSpeed is not supported: training is plain DDP"),
    ("zero", "DeepSpeed is not supported: training is plain DDP"),
    ("offload_", "DeepSpeed is not supported: training is plain DDP"),
    ("use_fsdp", "FSDP is not supported: training is plain DDP (a ConvNeXt-tiny fits any GPU)"),
    ("fsdp_", "FSDP is not supported: training is plain DDP"),
    ("use_megatron_lm", "Megatron-LM is not supported: training is plain DDP"),
    ("megatron_lm_", "Megatron-LM is not supported: training is plain DDP"),
    ("use_parallelism_config", "parallelism configs are not supported: training is plain DDP"),
    ("parallelism_config_", "parallelism configs are not supported: training is plain DDP"),
    ("tpu", "TPUs are not supported: CUDA GPUs or the CPU"),
    ("vm", "TPUs are not supported: CUDA GPUs or the CPU"),
    ("fp8_", "fp8 is not supported: use --mixed_precision bf16"),
    ("downcast_bf16", "--downcast_bf16 is a TPU setting: use --mixed_precision bf16"),
    ("dynamo_", "use model.compile=true (it compiles the networks and keeps GCM eager, in float32)"),
    ("gradient_accumulation_steps", "use train.grad_accum_steps=N (the run's config records it)"),
    ("gradient_clipping", "use train.clip_grad=X (the run's config records it)"),
    ("module", "the launcher runs the stage as a module itself"),
    ("m", "the launcher runs the stage as a module itself"),
    ("no_python", "the launcher runs the stage with Python itself"),
    ("main_training_function", "the stage is a module, not a function"),
    ("mpirun_hostfile", "MPI launches are not supported: use --num_machines with --machine_rank"),
    ("aws_", "SageMaker launches are not supported"),
)
# Distributed types of an accelerate config file the launcher can run.
SUPPORTED_TYPES = {"NO", "MULTI_GPU", "MULTI_CPU"}


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split into (our args: ``--config FILE``, ``--debug``, ``key=value``; launch flags with their values)."""
    ours, accel = [], []
    argv = list(argv)
    configs = 0
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "--debug") or arg.startswith("--config="):
            ours.append(arg)
            if arg == "--config":
                if i + 1 == len(argv) or argv[i + 1].startswith("-") or not argv[i + 1]:
                    raise UserError("--config needs a file: --config FILE")
                ours.append(argv[i + 1])
                i += 1
            elif arg == "--config=":
                raise UserError("--config needs a file: --config FILE")
            configs += arg != "--debug"
            if configs > 1:
                raise UserError("--config is given twice: give one file (key=value overrides change it)")
        elif arg.startswith("-"):
            accel.append(arg)
            name = flag_name(arg)
            takes_value = "=" not in arg and name not in SWITCHES
            # A known flag's value may hold "=" (--env A=1, --rdzv_conf k=v); an unknown flag's next
            # word is taken only if it cannot be a key=value override.
            value = argv[i + 1] if i + 1 < len(argv) else "-"
            if takes_value and not value.startswith("-") and (name in PLANNED or name in PASSED or "=" not in value):
                accel.append(argv[i + 1])
                i += 1
        else:
            ours.append(arg)
        i += 1
    return ours, accel


def flag_name(arg: str) -> str:
    """``--num-processes=4`` -> ``num_processes`` (accelerate takes both spellings)."""
    return arg.lstrip("-").split("=", 1)[0].replace("-", "_")


def refusal(name: str) -> str | None:
    for prefix, reason in REFUSED:
        if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
            return reason
    return None


def parse_flags(accel: Sequence[str], command: str = "") -> dict[str, str | bool | list[str]]:
    """The launch flags as ``{name: value}`` (``True`` for a switch; ``--env`` may repeat).

    Raises:
        UserError: a flag this launcher refuses, a config key typed as a flag, an unknown flag or
            a flag without its value, in one line.
    """
    flags: dict[str, str | bool | list[str]] = {}
    i = 0
    while i < len(accel):
        arg = accel[i]
        name = flag_name(arg)
        reason = refusal(name)
        if reason:
            raise UserError(f"--{name}: {reason}")
        if name in SWITCHES:
            flags["quiet" if name == "q" else name] = True
        elif name in PLANNED or name in PASSED:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(accel) and not accel[i + 1].startswith("-"):
                i += 1
                value = accel[i]
            else:
                raise UserError(f"--{name} needs a value")
            if name == "env":
                flags.setdefault("env", []).append(value)  # type: ignore[union-attr]
            else:
                flags[name] = value
        else:
            key = key_named(name, command)
            if key is not None:
                value = arg.split("=", 1)[1] if "=" in arg else (accel[i + 1] if i + 1 < len(accel) else "")
                raise UserError(
                    f"unknown option --{name}: did you mean {key}={value or '...'}? (config keys take key=value)"
                )
            raise UserError(f"unknown option --{name} (launch flags: ./run.sh {command or 'train'} --help)")
        i += 1
    return flags


def read_accelerate_config(path: Path) -> dict:
    """An accelerate config file's settings; one line naming the file if it cannot be used."""
    import yaml

    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"--config_file {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--config_file {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError(f"--config_file {path}: expected a mapping of accelerate settings")
    for key in ("distributed_type", "mixed_precision"):
        if isinstance(settings.get(key), bool):  # YAML 1.1 reads an unquoted NO / no as false
            settings[key] = "NO" if key == "distributed_type" else ("no" if not settings[key] else "yes")
    kind = str(settings.get("distributed_type", "NO")).upper()
    if kind not in SUPPORTED_TYPES:
        raise UserError(f"--config_file {path}: distributed_type {kind} is not supported here (DDP only: MULTI_GPU)")
    dynamo = settings.get("dynamo_config") or {}
    if isinstance(dynamo, dict) and str(dynamo.get("dynamo_backend", "NO")).upper() != "NO":
        raise UserError(f"--config_file {path}: dynamo_config: {refusal('dynamo_backend')}")
    return settings


@dataclass
class Plan:
    """What the launcher starts (see :func:`plan_launch`)."""

    module: str
    processes: int  # over every machine
    machines: int
    gpu_ids: list[int] | None  # visible CUDA devices used on this machine; None: the CPU
    precision: str  # accelerate's names: no | bf16 | fp16
    precision_from: str  # which setting decided it, for the start-up line
    direct: bool  # one plain process, started without accelerate launch
    accelerate: list[str] = field(default_factory=list)  # the accelerate launch flags
    env: dict[str, str] = field(default_factory=dict)  # set for the processes
    overrides: list[str] = field(default_factory=list)  # key=value added to the stage's arguments
    threads: int = 0  # torch threads per process on the CPU (0: accelerate's default)
    config_file: Path | None = None  # the user's --config_file (else the shipped one-plain-process file)

    @property
    def local_processes(self) -> int:
        return self.processes // self.machines

    def describe(self, devices: Devices) -> str:
        """The start-up line: processes, devices, precision."""
        n = self.processes
        how = "1 process" if n == 1 else f"{n} processes ({'DDP' if self.gpu_ids is not None else 'gloo'})"
        if self.machines > 1:
            how += f" on {self.machines} machines, {self.local_processes} here"
        where = devices.describe(self.gpu_ids)
        if self.gpu_ids is None and self.threads:
            where += f", {self.threads} torch thread{'s' if self.threads > 1 else ''} each"
        return (
            f"launch: {COMMANDS.get(self.module, self.module)} as {how} on {where}; "
            f"precision {precision_name(self.precision)} ({self.precision_from})"
        )


def plan_launch(
    module: str, flags: dict, cfg: Config, devices: Devices, env: dict | None = None, config_file: Path | None = None
) -> Plan:
    """Decide processes, devices and precision for ``module`` (see the module docstring).

    ``flags`` come from :func:`parse_flags`; ``config_file`` is ``--config_file`` (else the
    shipped one-plain-process file, which asks for nothing); ``env`` is the launcher's environment.
    """
    env = os.environ if env is None else env
    file_settings = read_accelerate_config(config_file) if config_file is not None else {}
    if file_settings.get("mixed_precision") is not None and "mixed_precision" not in flags:
        # the file's precision is honoured as the flag would be (it was silently dropped)
        flags = {**flags, "mixed_precision": str(file_settings["mixed_precision"])}
    on_cpu = bool(flags.get("cpu")) or bool(file_settings.get("use_cpu")) or devices.cuda == 0
    machines = _count(flags, file_settings, "num_machines", 1)
    precision, source = resolve_launch_precision(module, flags, cfg, devices, on_cpu)
    make = _plan_cpu if on_cpu else _plan_gpus
    plan = make(module, flags, file_settings, devices, env, machines, precision, source)
    check_machine_flags(flags, file_settings, machines)
    plan.config_file = config_file
    if "mixed_precision" in flags and module not in ATTACKING:
        plan.overrides.append(f"train.mixed_precision={flags['mixed_precision']}")  # the stage's own setting
    return plan


def check_machine_flags(flags: dict, file_settings: dict, machines: int) -> None:
    """Several machines need the main machine's address (without it every process waited on
    ``(None, 29500)`` for ever); a machine rank must be one of the machines; a port a port number."""
    rank = _count(flags, file_settings, "machine_rank", 0, least=0)
    if rank >= machines:
        raise UserError(f"--machine_rank {rank}: must be below --num_machines {machines} (numbered from 0)")
    port = flags.get("main_process_port", file_settings.get("main_process_port"))
    if port is not None and not (str(port).isdigit() and 1 <= int(str(port)) <= 65535):
        raise UserError(f"--main_process_port {port}: expected a port number in 1..65535")
    if machines > 1 and not (flags.get("main_process_ip") or file_settings.get("main_process_ip")):
        raise UserError(
            f"--num_machines {machines} needs --main_process_ip (the address of the machine with --machine_rank 0, "
            "which every machine connects to)"
        )


def _count(flags: dict, file_settings: dict, name: str, default: int, least: int = 1) -> int:
    raw = flags.get(name, file_settings.get(name))
    if raw is None:
        return default
    try:
        value = int(str(raw))
    except ValueError:
        raise UserError(f"--{name} {raw}: expected a whole number") from None
    if value < least:
        raise UserError(f"--{name} {raw}: must be at least {least}")
    return value


def resolve_launch_precision(module: str, flags: dict, cfg: Config, devices: Devices, on_cpu: bool) -> tuple[str, str]:
    """The run's autocast precision and which setting chose it; conflicts and GPU-only values
    on a CPU run are one line."""
    asked = flags.get("mixed_precision")
    if module in ATTACKING:
        if asked not in (None, "no"):
            raise UserError(
                f"--mixed_precision {asked}: evaluate attacks in float32 (a gradient in {asked} is coarser, and "
                "a weaker attack flatters the model)"
            )
        return "no", "evaluate attacks in float32"
    key = cfg.train.mixed_precision
    if asked is not None:
        if asked not in ("no", "bf16", "fp16"):
            raise UserError(f"--mixed_precision {asked}: expected no, bf16 or fp16")
        if key not in ("auto", asked):
            raise UserError(f"--mixed_precision {asked} and train.mixed_precision={key} disagree: give one of them")
        setting, source = str(asked), f"--mixed_precision {asked}"
    else:
        setting, source = key, f"train.mixed_precision={key}"
    if setting == "fp16" and on_cpu:
        raise UserError(f"{source}: fp16 needs a GPU and this run is on the CPU; use bf16 or no")
    if setting == "bf16" and not on_cpu and not devices.bf16:
        raise UserError(f"{source}: these GPUs do not compute bf16 natively; use fp16 or no")
    return resolve_precision(setting, not on_cpu, devices.bf16), source


def _plan_cpu(
    module: str, flags: dict, file_settings: dict, devices: Devices, env, machines: int, precision: str, source: str
) -> Plan:
    gpu_ids = flags.get("gpu_ids")
    if gpu_ids not in (None, "all") and devices.cuda == 0:
        raise UserError(f"--gpu_ids {gpu_ids}: no CUDA device is visible here ({visible_devices_text(env)})")
    processes = _count(flags, file_settings, "num_processes", 1)
    _check_machines(processes, machines)
    # accelerate launch gives each CPU process one thread (OMP_NUM_THREADS=1) unless told: several
    # times slower than the process's share of the cores (BENCHMARKS.md, the "1 thread" rows)
    threads = _count(flags, {}, "num_cpu_threads_per_process", 0)
    if not threads and not env.get("OMP_NUM_THREADS"):
        threads = max(1, devices.cores // (processes // machines))
    plan = Plan(module, processes, machines, None, precision, source, direct=False, threads=threads)
    if devices.cuda:  # --cpu on a GPU machine: the processes must not see the GPUs either
        plan.env["CUDA_VISIBLE_DEVICES"] = ""
    plan.direct = processes == 1 and not flags
    plan.accelerate = _accelerate_flags(plan, flags)
    return plan


def _plan_gpus(
    module: str, flags: dict, file_settings: dict, devices: Devices, env, machines: int, precision: str, source: str
) -> Plan:
    ids = resolve_gpu_ids(flags.get("gpu_ids", file_settings.get("gpu_ids")), devices, env)
    default = len(ids) * machines
    processes = _count(flags, file_settings, "num_processes", default)
    _check_machines(processes, machines)
    local = processes // machines
    if local > len(ids):
        where = "selected by --gpu_ids" if len(ids) < devices.cuda else f"visible here ({visible_devices_text(env)})"
        raise UserError(
            f"--num_processes {processes}{f' over {machines} machines' if machines > 1 else ''} needs {local} GPUs on "
            f"this machine, but {len(ids)} {'is' if len(ids) == 1 else 'are'} {where}; use --num_processes "
            f"{len(ids) * machines} or fewer"
        )
    ids = ids[:local]
    plan = Plan(module, processes, machines, ids, precision, source, direct=processes == 1 and not flags)
    if ids != list(range(devices.cuda)):  # the processes see their own GPUs only, numbered from 0
        plan.env["CUDA_VISIBLE_DEVICES"] = physical_devices(ids, env)
    plan.accelerate = _accelerate_flags(plan, flags)
    return plan


def _check_machines(processes: int, machines: int) -> None:
    if processes % machines:
        raise UserError(f"--num_processes {processes} is not a multiple of --num_machines {machines}")


def resolve_gpu_ids(value, devices: Devices, env) -> list[int]:
    """``--gpu_ids`` (``all``, ``0,2``) as indices of the visible devices; out of range is one line."""
    if value is None or str(value).strip().lower() == "all":
        return list(range(devices.cuda))
    text = str(value)
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text):
        raise UserError(f"--gpu_ids {text}: expected 'all' or device numbers such as 0,1")
    ids = [int(v) for v in text.split(",")]
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpu_ids {text}: a device is listed twice")
    missing = [i for i in ids if i >= devices.cuda]
    if missing:
        raise UserError(
            f"--gpu_ids {text}: no CUDA device {missing[0]} here; {devices.cuda} visible, numbered 0-"
            f"{devices.cuda - 1} ({visible_devices_text(env)})"
        )
    return ids


def physical_devices(ids: list[int], env) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the processes: ``ids`` mapped through the launcher's own value."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible else [str(i) for i in range(max(ids) + 1)]
    return ",".join(entries[i] for i in ids)


def visible_devices_text(env) -> str:
    value = env.get("CUDA_VISIBLE_DEVICES")
    return "CUDA_VISIBLE_DEVICES unset" if value is None else f"CUDA_VISIBLE_DEVICES={value!r}"


def _accelerate_flags(plan: Plan, flags: dict) -> list[str]:
    """``accelerate launch`` flags that start ``plan`` (explicit values, so no default config of
    the user's machine changes them), with the passed-through flags after them."""
    args = ["--num_processes", str(plan.processes), "--num_machines", str(plan.machines)]
    args += ["--mixed_precision", plan.precision]
    if plan.local_processes > 1 or plan.machines > 1:
        args.append("--multi_gpu")  # on the CPU too: --cpu would run one process (gloo is chosen in-process)
    if plan.gpu_ids is not None:
        args += ["--gpu_ids", "all"]  # the launcher set CUDA_VISIBLE_DEVICES: accelerate must not remap it
    if plan.threads:
        args += ["--num_cpu_threads_per_process", str(plan.threads)]
    for name, value in flags.items():
        if name in PLANNED or name in ("cpu", "multi_gpu"):
            continue
        if name == "env":
            for item in value:
                args += ["--env", item]
        elif value is True:
            args.append(f"--{name}")
        else:
            args += [f"--{name}", str(value)]
    return args
