"""What the machine offers a run, and the defaults that follow from it.

One place decides the device-dependent settings every stage shares, so the launcher (before any
process starts) and each process (when it builds its model) reach the same answer:

* :func:`probe_devices`: the CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applied),
  their names, bf16 support and the CPU cores;
* :func:`resolve_precision`: ``train.mixed_precision=auto`` is bf16 on a GPU that has it, else
  float32 ("no"); an explicit value is kept, and checked against the device and
  ``--mixed_precision``;
* :func:`create_accelerator`: the one Accelerator factory of every stage;
* :func:`resolve_channels_last`: ``model.channels_last=auto`` is on with CUDA (ConvNeXt's
  convolutions run faster in NHWC there), off on the CPU (no effect there, BENCHMARKS.md);
* :func:`resolve_num_workers`: ``-1`` (auto) loader workers: on a GPU, the cores each process
  gets minus the one its main thread uses; on the CPU, 2 (the compute threads need the rest);
* :func:`fit_workers_to_shared_memory`: fewer loader workers where ``/dev/shm`` cannot hold
  their batches (a container's default is 64 MB);
* :func:`default_device`: the device a single-process stage runs its models on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

# What `auto` means for a CPU run's loader: the measured default (BENCHMARKS.md, "scaling": 0-2
# workers are within noise of each other on 2 cores; more preempt the model's threads).
CPU_WORKERS = 2


@dataclass(frozen=True)
class Devices:
    """The accelerators and cores this process can use."""

    cuda: int  # visible CUDA devices
    names: tuple[str, ...] = ()
    bf16: bool = False  # every visible device computes bfloat16 natively
    cores: int = 1

    def describe(self, ids: list[int] | None = None) -> str:
        """``GPUs 0-7 of 8 (NVIDIA H200)`` / ``the CPU (2 cores)``."""
        if not self.cuda or ids is None:
            return f"the CPU ({self.cores} cores)"
        names = sorted({self.names[i] for i in ids if i < len(self.names)})
        which = f"GPU {ids[0]}" if len(ids) == 1 else f"GPUs {format_ids(ids)}"
        return f"{which} of {self.cuda}" + (f" ({', '.join(names)})" if names else "")


def format_ids(ids: list[int]) -> str:
    """``0-3`` for a run of ids, else ``0,2,5``."""
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(str(i) for i in ids)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cuda_possible() -> bool:
    """Whether any CUDA device could be visible, decided without importing torch (seconds): not
    when ``CUDA_VISIBLE_DEVICES`` hides every device or no NVIDIA driver is loaded (Linux: its
    /proc entries and device files; WSL: /dev/dxg)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return (
        Path("/proc/driver/nvidia/gpus").is_dir() or any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/dxg").exists()
    )


def probe_devices() -> Devices:
    """The CUDA devices torch sees here (none when ``CUDA_VISIBLE_DEVICES`` hides them); torch is
    imported only when a device could be there."""
    if not cuda_possible():
        return Devices(cuda=0, cores=available_cores())
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = tuple(torch.cuda.get_device_name(i) for i in range(count))
    bf16 = bool(count) and all(torch.cuda.get_device_capability(i) >= (8, 0) for i in range(count))
    return Devices(cuda=count, names=names, bf16=bf16, cores=available_cores())


def resolve_precision(
    setting: str, on_gpu: bool | None = None, bf16: bool | None = None, asked: str | None = None
) -> str:
    """The autocast precision a run uses: ``no`` (float32), ``bf16`` or ``fp16``.

    ``auto`` picks bf16 on a GPU that computes it natively (Ampere and newer) and float32
    elsewhere: bf16 keeps float32's range, so no loss scaling and no overflow in the attack's
    gradients; a pre-Ampere GPU gets float32 rather than fp16's loss scaling, which the user may
    still ask for by name. GCM computes in float32 whatever this says (``gcm/gcm.py``).
    ``asked``: ``accelerate launch --mixed_precision`` (or its config file's), which must agree
    with an explicit ``setting``.

    Raises:
        UserError: a disagreement, fp16 on the CPU or bf16 on GPUs without it, in one line.
    """
    source = f"train.mixed_precision={setting}"
    if asked is not None:
        if asked not in ("no", "bf16", "fp16"):
            raise UserError(f"--mixed_precision {asked}: expected no, bf16 or fp16")
        if setting not in ("auto", asked):
            raise UserError(f"--mixed_precision {asked} and {source} disagree: give one of them")
        setting, source = asked, f"--mixed_precision {asked}"
    if on_gpu is None:
        on_gpu = cuda_available()
    if bf16 is None:
        bf16 = on_gpu and probe_devices().bf16
    if setting == "fp16" and not on_gpu:
        raise UserError(f"{source}: fp16 needs a GPU and this run is on the CPU; use bf16 or no")
    if setting == "bf16" and on_gpu and not bf16:
        raise UserError(f"{source}: these GPUs do not compute bf16 natively; use fp16 or no")
    if setting != "auto":
        return setting
    return "bf16" if on_gpu and bf16 else "no"


def create_accelerator(mixed_precision: str = "auto", **kwargs):
    """The Accelerator every stage runs with: the CPU where no CUDA device is visible (gloo across
    processes), CUDA prepared (:func:`prepare_cuda`), and ``mixed_precision`` as
    :func:`resolve_precision` decides it on this device. ``kwargs`` go to ``Accelerator``."""
    from accelerate import Accelerator

    on_gpu = cuda_available()
    if on_gpu:
        prepare_cuda()
    return Accelerator(cpu=not on_gpu, mixed_precision=resolve_precision(mixed_precision, on_gpu), **kwargs)


def precision_name(precision: str) -> str:
    """``bf16`` / ``fp16`` / ``fp32`` (accelerate's "no")."""
    return "fp32" if precision == "no" else precision


def resolve_channels_last(setting: str, on_gpu: bool | None = None) -> bool:
    """``model.channels_last``: ``auto`` is on with CUDA, off on the CPU."""
    if setting != "auto":
        return setting == "true"
    return cuda_available() if on_gpu is None else on_gpu


def resolve_num_workers(setting: int, on_gpu: bool, local_processes: int = 1, cores: int | None = None) -> int:
    """Loader worker processes per process: ``setting`` unless it is -1 (auto).

    On a GPU every process gets its share of the cores; one of them runs the process itself
    (the training step's Python, the optimizer, the collation), the rest decode and augment.
    """
    if setting >= 0:
        return setting
    if not on_gpu:
        return CPU_WORKERS
    share = (cores or available_cores()) // max(1, local_processes)
    return max(1, share - 1)


# Batches a DataLoader keeps in flight per worker (its prefetch_factor default), each in shared memory.
PREFETCH_FACTOR = 2
SHARED_MEMORY = Path("/dev/shm")


def shared_memory_free(path: Path = SHARED_MEMORY) -> int | None:
    """Free bytes of the shared-memory file system loader workers hand batches through (None: none
    to measure, e.g. not Linux)."""
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def fit_workers_to_shared_memory(workers: int, batch_bytes: int, free: int | None) -> tuple[int, str]:
    """``(workers, warning)``: as many of ``workers`` as ``free`` bytes of shared memory hold.

    Each worker keeps ``PREFETCH_FACTOR`` batches in shared memory (torch.multiprocessing: both of
    its sharing strategies, ``file_descriptor`` and ``file_system``, put them in ``/dev/shm``), so
    a container with the default 64 MB dies with a bus error once the workers run ahead. Half of
    the free space is left for the rest (the validation loader, pinned copies in flight). The
    warning is one line ("" when nothing was cut).
    """
    if workers <= 0 or free is None or batch_bytes <= 0:
        return workers, ""
    fits = int(free // 2 // (PREFETCH_FACTOR * batch_bytes))
    if fits >= workers:
        return workers, ""
    return max(0, fits), (
        f"WARNING: {SHARED_MEMORY} has {free / 2**20:.0f} MB free, too little for {workers} loader workers "
        f"({PREFETCH_FACTOR} batches of {batch_bytes / 2**20:.1f} MB each): using {max(0, fits)}; give the "
        "container more (docker run --shm-size=16g or --ipc=host)"
    )


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing torch where no device can be there."""
    if not cuda_possible():
        return False
    import torch

    return torch.cuda.is_available()


def default_device():
    """The ``torch.device`` a stage runs its models on: this process's GPU (its local rank's under
    a multi-process launch), else the CPU."""
    import torch

    if not cuda_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0) % torch.cuda.device_count())


def local_processes(default: int = 1) -> int:
    """Processes of this run on this machine (``LOCAL_WORLD_SIZE``, set by the multi-process
    launcher), else ``default``."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or default)


def prepare_cuda() -> None:
    """What a CUDA run wants that torch does not default to: cuDNN picks the fastest convolution
    for the fixed input size, and float32 matmuls may use TF32 (as timm's train.py sets); bf16
    autocast leaves little in float32 anyway. Checks that need float32 exactly (export's parity)
    set the precision back themselves."""
    import torch

    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
