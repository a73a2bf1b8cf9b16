"""A machine with CUDA devices, faked for tests on a CPU host (loaded by every Python process whose
PYTHONPATH starts with this folder).

``FAKE_CUDA_DEVICES=N`` makes torch report N bf16-capable devices (``FAKE_CUDA_BF16=0``: pre-Ampere)
and the driver files ``core.devices`` looks for. Nothing can run on them, so each process reports
and ends at the first point that would touch one, writing ``<FAKE_CUDA_REPORT>/<what>-<rank>-<pid>.json``:

* building an ``Accelerator``: its world size, rank, device type and mixed precision (train, submit,
  evaluate under the launcher);
* moving a module to a CUDA device (``FAKE_CUDA_STOP=to``): the device asked for (the stages that run
  their models directly: evaluate, make-testset, ablate, export).
"""

import json
import os

N = int(os.environ.get("FAKE_CUDA_DEVICES", "0"))
REPORT = os.environ.get("FAKE_CUDA_REPORT", "")


def _report(what: str, data: dict) -> None:
    data = {**data, "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(REPORT, f"{what}-{rank}-{os.getpid()}.json"), "w") as fh:
        json.dump(data, fh)
    os._exit(0)


def _visible() -> int:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return N
    entries = [e for e in value.split(",") if e.strip() not in ("", "-1")]
    return min(N, len(entries))


def _install() -> None:
    import torch

    bf16 = os.environ.get("FAKE_CUDA_BF16", "1") == "1"
    torch.cuda.is_available = lambda: _visible() > 0
    torch.cuda.device_count = _visible
    torch.cuda.get_device_name = lambda i=0: "Fake GPU"
    torch.cuda.get_device_capability = lambda i=0: (9, 0) if bf16 else (7, 0)
    torch.cuda.is_bf16_supported = lambda *a, **k: bf16
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.current_device = lambda: 0

    import core.devices

    core.devices.cuda_possible = lambda: _visible() > 0

    if os.environ.get("FAKE_CUDA_STOP", "accelerator") == "to":
        real_to = torch.nn.Module.to

        def to(self, *args, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if device is not None and not isinstance(device, torch.dtype) and torch.device(device).type == "cuda":
                _report("to", {"device": str(torch.device(device))})
            return real_to(self, *args, **kwargs)

        torch.nn.Module.to = to
    else:
        import accelerate

        def init(self, *args, **kwargs):
            _report(
                "accelerator",
                {
                    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                    "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
                    "cpu": bool(kwargs.get("cpu")),
                    "mixed_precision": kwargs.get("mixed_precision"),
                    "env_mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION"),
                },
            )

        accelerate.Accelerator.__init__ = init


if N and REPORT:
    _install()
