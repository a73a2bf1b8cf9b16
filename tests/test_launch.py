"""The launcher's accelerate arguments: multi-process CPU runs and their thread count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import UserError
from core.launch import DEFAULT_ACCELERATE_CONFIG, ROOT, check_flags, resolve_launch_args, split_args
from tests.conftest import run_module, shrink


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_cpu_run_gets_every_core_not_accelerates_one_thread():
    args, note = resolve_launch_args([], has_cuda=False, cores=8, env={})
    assert flag(args, "--config_file") == str(DEFAULT_ACCELERATE_CONFIG)
    assert flag(args, "--num_cpu_threads_per_process") == "8" and note is None


@pytest.mark.parametrize(
    "accel,cores,threads",
    [
        (["--num_processes", "2"], 8, "4"),
        (["--num_processes=4"], 2, "1"),  # never below one thread
        (["--config_file", str(ROOT / "configs/accelerate/multi_gpu.yaml")], 8, None),  # from the file
    ],
)
def test_cpu_processes_share_the_cores(accel, cores, threads):
    args, _ = resolve_launch_args(accel, has_cuda=False, cores=cores, env={})
    if threads is None:
        import yaml

        n = yaml.safe_load((ROOT / "configs/accelerate/multi_gpu.yaml").read_text())["num_processes"]
        threads = str(max(1, cores // n))
    assert flag(args, "--num_cpu_threads_per_process") == threads


def test_two_cpu_processes_run_with_gloo():
    args, note = resolve_launch_args(["--cpu", "--num_processes", "2"], has_cuda=False, cores=2, env={})
    assert "--multi_gpu" in args and "--cpu" not in args and "gloo" in note


@pytest.mark.parametrize(
    "accel,env,has_cuda",
    [
        (["--num_cpu_threads_per_process", "3"], {}, False),  # the user's choice
        ([], {"OMP_NUM_THREADS": "3"}, False),  # accelerate reads it
        ([], {}, True),  # GPU run: accelerate's default
    ],
)
def test_thread_count_left_alone(accel, env, has_cuda):
    args, _ = resolve_launch_args(accel, has_cuda=has_cuda, cores=8, env=env)
    assert args.count("--num_cpu_threads_per_process") == (1 if accel else 0)
    assert flag(args, "--num_cpu_threads_per_process") in (None, "3")


def test_split_args_sends_flags_to_accelerate():
    ours, accel = split_args(["--config", "c.yaml", "a.b=1", "--num_processes", "2", "--cpu", "--debug"])
    assert ours == ["--config", "c.yaml", "a.b=1", "--debug"]
    assert accel == ["--num_processes", "2", "--cpu"]


def test_a_config_key_typed_as_a_flag_is_one_line_naming_the_key():
    proc = run_module("core.launch", "train.main", "--epochs", "3", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown option --epochs: did you mean train.epochs=3? (config keys take key=value)"
    ]
    for accel, module, key in (
        (["--batch-size=8"], "infer.submit", "submit.batch_size=8"),
        (["--train.lr", "0.1"], "train.main", "train.lr=0.1"),
        (["--seed"], "train.main", "seed=..."),
    ):
        with pytest.raises(UserError, match=rf"did you mean {key}\?"):
            check_flags(accel, module)
    # accelerate's own flags pass, also where one of our keys has the same name (train.mixed_precision)
    check_flags(["--num_processes", "2", "--mixed_precision", "bf16", "--config_file", "x.yaml", "-q"], "train.main")


# --- stopping a run: signals reach every process, nothing outlives the launcher ----------------


def _processes_mentioning(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker`` (a test's unique folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split(") ", 1)[1][0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def _parent_cmdline(pid: int) -> bytes:
    ppid = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[1]
    return Path(f"/proc/{ppid}/cmdline").read_bytes()


def _start_training(tiny_data: Path, out: Path, *launcher: str, **popen) -> subprocess.Popen:
    """``python -m core.launch train.main`` on the tiny data, long enough to be stopped mid-way."""
    overrides = shrink(["train.epochs=50", "train.checkpoint_every=2", "data.num_workers=1"], tiny_data, out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [*launcher, sys.executable, "-m", "core.launch", "train.main", *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    ckpts = out / "demo" / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(not p.name.endswith(".tmp") for p in ckpts.iterdir()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint appeared (exit {proc.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_launcher_stops_every_process(tiny_data, tmp_path, sig):
    # What a supervisor, a job scheduler or `timeout` does: signal the PID it started, not its group.
    out = tmp_path / "runs"
    proc = _start_training(tiny_data, out)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(sig)
    expected = 128 + sig
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == expected, stderr[-2000:]
    assert _processes_mentioning(str(tmp_path)) == [], "a process of the run outlived the launcher"
    ckpts = out / "demo" / "checkpoints"
    assert ckpts.is_dir() and not any(p.name.endswith(".tmp") for p in ckpts.iterdir())
    # The checkpoints are intact: the run continues from the newest one.
    resumed = run_module("core.launch", "train.main", *shrink(["train.epochs=1", "resume=auto"], tiny_data, out))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_training_process_is_named_with_the_resume_command(tiny_data, tmp_path):
    out = tmp_path / "runs"
    proc = _start_training(tiny_data, out)
    _wait_for_checkpoint(out, proc)
    # the training process: the one that accelerate launch started (its loader workers are its children)
    trainer = next(
        pid
        for pid in _processes_mentioning(str(tmp_path))
        if b"accelerate" in _parent_cmdline(pid) and b"-m\0train.main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    os.kill(trainer, signal.SIGKILL)  # what the out-of-memory killer does
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    line = next((ln for ln in stderr.splitlines() if ln.startswith("error: ")), stderr[-2000:])
    assert f"process rank 0 (pid {trainer}) of train.main died without reporting" in line
    assert "SIGKILL" in line and "./run.sh train resume=auto" in line


def test_help_is_the_pipelines_own():
    proc = run_module("core.launch", "train.main", "--help", timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: ./run.sh train [--config FILE] [key=value ...]")
    assert "core/config.py" in proc.stdout and "accelerate launch --help" in proc.stdout
    assert "submit" in run_module("core.launch", "infer.submit", "-h", timeout=60).stdout.splitlines()[0]
