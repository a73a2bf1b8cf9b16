"""The launcher: one plain process runs the stage directly, anything else under accelerate launch
(multi-process CPU runs and their thread count); signals, exit codes and the SIGKILL report on both paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import UserError
from core.launch import (
    DEFAULT_ACCELERATE_CONFIG,
    ROOT,
    available_cores,
    check_flags,
    direct_command,
    resolve_launch_args,
    runs_directly,
    split_args,
)
from tests.conftest import run_module, shrink

# `./run.sh train` without flags runs the stage directly; any accelerate flag, even one that asks
# for nothing more, goes through accelerate launch.
PATHS = {"direct": (), "accelerate": ("--num_processes", "1")}


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


def test_one_plain_process_runs_directly_with_every_core():
    assert runs_directly([])
    env: dict = {}
    assert direct_command("train.main", ["a.b=1"], env) == [sys.executable, "-m", "train.main", "a.b=1"]
    assert env["OMP_NUM_THREADS"] == str(available_cores())  # what accelerate launch got from us
    env = {"OMP_NUM_THREADS": "1"}
    direct_command("train.main", [], env)
    assert env["OMP_NUM_THREADS"] == "1"  # the user's choice


@pytest.mark.parametrize("accel", [["--num_processes", "1"], ["--cpu"], ["--config_file", "x.yaml"]])
def test_any_accelerate_flag_goes_through_accelerate_launch(accel):
    assert not runs_directly(accel)


@pytest.mark.parametrize(
    "text",
    [
        "num_processes: 2",
        "distributed_type: MULTI_GPU",
        "num_machines: 2",
        "dynamo_config: {dynamo_backend: INDUCTOR}",
        "use_cpu: true",
        "num_processes: [",
    ],
)
def test_a_default_accelerate_config_asking_for_more_goes_through_accelerate_launch(tmp_path, text):
    config = tmp_path / "default.yaml"
    config.write_text(DEFAULT_ACCELERATE_CONFIG.read_text() + "\n" + text + "\n")
    assert runs_directly([], DEFAULT_ACCELERATE_CONFIG) and not runs_directly([], config)


# Reports what a stage started by the launcher sees: its parent, thread count and accelerate state.
PROBE_STAGE = """
import json, os
from pathlib import Path

from core.cli import run_cli
from core.errors import UserError


def main(argv):
    if "name=fail" in argv:
        raise UserError("the probe was asked to fail")
    import torch
    from accelerate import Accelerator

    state = Accelerator(cpu=not torch.cuda.is_available()).state
    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\\0")
    print(json.dumps({
        "parent": parent,
        "threads": torch.get_num_threads(),
        "state": [state.num_processes, str(state.distributed_type), str(state.device), str(state.mixed_precision)],
    }))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
"""


@pytest.mark.slow
def test_direct_and_accelerate_runs_see_the_same_process(tmp_path):
    (tmp_path / "probe_stage.py").write_text(PROBE_STAGE, encoding="utf-8")
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "OMP_NUM_THREADS": ""}
    seen = {}
    for path, flags in PATHS.items():
        proc = run_module("core.launch", "probe_stage", *flags, **env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        failed = run_module("core.launch", "probe_stage", *flags, "name=fail", **env)
        assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == (
            "error: the probe was asked to fail"
        ), failed.stderr[-2000:]
    assert seen["direct"]["parent"][1:4] == ["-m", "core.launch", "probe_stage"]  # no accelerate launch between
    assert seen["accelerate"]["parent"][1:3] == ["-m", "accelerate.commands.launch"]
    assert seen["direct"]["threads"] == seen["accelerate"]["threads"] == available_cores()
    assert seen["direct"]["state"] == seen["accelerate"]["state"]


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


def _start_training(tiny_data: Path, out: Path, *flags: str, **popen) -> subprocess.Popen:
    """``python -m core.launch train.main [flags]`` on the tiny data, long enough to be stopped mid-way."""
    overrides = shrink(["train.epochs=50", "train.checkpoint_every=2", "data.num_workers=1"], tiny_data, out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "core.launch", "train.main", *flags, *overrides],
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
@pytest.mark.parametrize(
    "sig,path", [(signal.SIGTERM, "direct"), (signal.SIGINT, "accelerate")], ids=["SIGTERM-direct", "SIGINT-accelerate"]
)
def test_stopping_the_launcher_stops_every_process(tiny_data, tmp_path, sig, path):
    # What a supervisor, a job scheduler or `timeout` does: signal the PID it started, not its group.
    out = tmp_path / "runs"
    proc = _start_training(tiny_data, out, *PATHS[path])
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


def _is_training_process(cmdline: bytes) -> bool:
    return cmdline.split(b"\0")[1:3] == [b"-m", b"train.main"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_a_killed_training_process_is_named_with_the_resume_command(tiny_data, tmp_path, path):
    out = tmp_path / "runs"
    proc = _start_training(tiny_data, out, *PATHS[path])
    _wait_for_checkpoint(out, proc)
    # the training process: `python -m train.main`, started by the launcher or accelerate launch
    # (its loader workers, its children, have the same command line)
    trainer = next(
        pid
        for pid in _processes_mentioning(str(tmp_path))
        if _is_training_process(Path(f"/proc/{pid}/cmdline").read_bytes())
        and not _is_training_process(_parent_cmdline(pid))
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


def test_a_bad_aug_entry_stops_a_direct_training_run_in_one_line(tmp_path):
    # The launcher leaves the aug section to the stage on the direct path: still one line, exit 2,
    # and no run folder.
    proc = run_module("core.launch", "train.main", "aug.extra=[{name: NoSuchBlur}]", f"out_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'aug.extra[0]': unknown albumentations transform 'NoSuchBlur'"
    ]
    assert not any(tmp_path.iterdir())
