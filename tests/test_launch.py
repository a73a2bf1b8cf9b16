"""The launcher: one process runs the stage here, with the config it loaded; anything else goes
through accelerate's own launcher with the user's flags as given (faked 8-GPU and CPU hosts);
signals, exit codes and the SIGKILL report on both paths."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.config import load_config
from core.devices import Devices, available_cores
from core.errors import UserError
from launch.start import describe, explain_exit, plan_launch, split_args, stopped
from tests.conftest import ROOT, run_module, shrink

# `./run.sh train` without flags runs the stage in the launcher's process; any launch flag, even one
# that asks for nothing more, goes through accelerate's launcher.
PATHS = {"direct": (), "accelerate": ("--num_processes", "1")}

CPU = Devices(cuda=0, cores=8)
H200x8 = Devices(cuda=8, names=("NVIDIA H200",) * 8, bf16=True, cores=128)
V100x4 = Devices(cuda=4, names=("Tesla V100",) * 4, bf16=False, cores=32)


@pytest.fixture
def host(monkeypatch):
    """Plan launches as ``./run.sh train [overrides] [flags]`` would on a faked machine (nothing starts)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # (restored after, as is what the launcher sets)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after: --cpu hides the GPUs

    def plan(flags=(), devices=CPU, module="train.main", overrides=()):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: devices.cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices.cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: devices.bf16)
        cfg = load_config(None, list(overrides))
        config, ours, accel = split_args(list(flags), "train")
        args, precision = plan_launch(module, cfg, accel, ours, devices)
        return args, precision, describe(module, args, devices, precision)

    return plan


# --- the CPU: one process here, or gloo processes sharing the cores ---------------------------


def test_a_cpu_run_is_one_process_here_with_every_core(host):
    args, precision, line = host()
    assert args is None and precision == ("no", "train.mixed_precision=auto")
    assert line == (
        "launch: train as 1 process on the CPU (8 cores), 8 torch threads each; precision fp32 "
        "(train.mixed_precision=auto)"
    )


@pytest.mark.parametrize(
    "flags,cores,threads",
    [
        (["--num_processes", "2"], 8, 4),
        (["--num_processes=4"], 2, 1),  # never below one thread
        (["--cpu", "--num-processes", "2"], 8, 4),  # accelerate's --cpu alone would run one process
        (["--num_processes", "2", "--num_cpu_threads_per_process", "3"], 8, 3),  # the user's choice
    ],
)
def test_cpu_processes_run_with_gloo_and_share_the_cores(host, flags, cores, threads):
    args, _, line = host(flags, Devices(cuda=0, cores=cores))
    assert args.multi_gpu and not args.cpu and args.num_cpu_threads_per_process == threads
    assert f"processes (gloo) on the CPU ({cores} cores), {threads} torch thread" in line


def test_omp_num_threads_is_left_to_accelerate(host, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    args, _, _ = host(["--num_processes", "2"])
    assert args.num_cpu_threads_per_process == 3  # accelerate's own reading of it


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--mixed_precision", "fp16"], "--mixed_precision fp16: fp16 needs a GPU and this run is on the CPU"),
        (["--num_processes", "two"], "accelerate launch: argument --num_processes/--num-processes: invalid int value"),
    ],
)
def test_gpu_only_settings_on_a_cpu_machine_are_one_line(host, flags, message):
    with pytest.raises(UserError, match="^" + message):
        host(flags)


# --- GPUs: accelerate's default is every visible one ---------------------------------------------


def test_every_gpu_runs_one_process_in_bf16_by_default(host):
    args, precision, line = host(devices=H200x8)
    assert (args.num_processes, args.multi_gpu, args.mixed_precision) == (8, True, "bf16")
    assert args.training_script_args == []  # nothing added: each process resolves auto alike
    assert line == (
        "launch: train as 8 processes (DDP) on GPUs 0-7 of 8 (NVIDIA H200); precision bf16 (train.mixed_precision=auto)"
    )


def test_num_processes_and_gpu_ids_are_accelerates(host):
    args, _, line = host(["--num_processes", "4"], H200x8)
    assert (args.num_processes, args.gpu_ids) == (4, None) and "on GPUs 0-3 of 8" in line
    args, _, line = host(["--num_processes", "2", "--gpu_ids", "2,5"], H200x8)
    assert (args.num_processes, args.gpu_ids) == (2, "2,5") and "on GPUs 2,5 of 8" in line


def test_one_gpu_runs_here_and_one_process_with_flags_through_accelerate(host):
    args, precision, line = host(devices=Devices(cuda=1, names=("NVIDIA H200",), bf16=True, cores=16))
    assert args is None and precision[0] == "bf16" and "1 process on GPU 0 of 1 (NVIDIA H200)" in line
    args, _, line = host(["--num_processes", "1"], H200x8)
    assert args.num_processes == 1 and not args.multi_gpu and "1 process on GPU 0 of 8" in line


def test_precision_flag_key_and_gpu_kind(host):
    args, precision, _ = host(["--num_processes", "2", "--mixed_precision", "fp16"], H200x8)
    assert precision[0] == args.mixed_precision == "fp16"
    assert args.training_script_args == ["train.mixed_precision=fp16"]  # the stage's own setting follows
    assert host(["--num_processes", "2"], H200x8, overrides=["train.mixed_precision=no"])[1][0] == "no"
    with pytest.raises(UserError, match="^--mixed_precision fp16 and train.mixed_precision=no disagree"):
        host(["--mixed_precision", "fp16"], H200x8, overrides=["train.mixed_precision=no"])
    # GPUs without native bf16: auto is float32; asking for bf16 by name is refused
    assert host(["--num_processes", "2"], V100x4)[1][0] == "no"
    with pytest.raises(UserError, match="do not compute bf16 natively"):
        host(["--mixed_precision", "bf16"], V100x4)


def test_cpu_flag_hides_the_gpus_from_the_processes(host):
    args, precision, line = host(["--cpu", "--num_processes", "2"], H200x8)
    assert args.multi_gpu and precision[0] == "no" and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert "2 processes (gloo) on the CPU" in line


def test_evaluate_attacks_in_float32(host):
    assert host(["--num_processes", "2"], H200x8, module="robust.evaluate")[1][0] == "no"
    with pytest.raises(UserError, match="evaluate attacks in float32"):
        host(["--mixed_precision", "bf16"], H200x8, module="robust.evaluate")


# --- every flag goes to accelerate as given: the old re-parser's mistakes --------------------------


def test_flags_and_their_values_reach_accelerate_as_given(host):
    # issue 37: the launcher's own re-parser took `--env A=1` and `--rdzv_conf k=v` for overrides
    # (or "needed a value"); accelerate's parser knows which of its flags take a value.
    flags = ["--env", "A=1", "--rdzv_conf", "k=v", "--num_processes", "2", "--same_network"]
    assert split_args([*flags[:2], "x.y=2", *flags[2:], "--config", "c.yaml", "a.b=1", "--debug"], "train") == (
        "c.yaml",
        ["x.y=2", "a.b=1", "--debug"],
        flags,
    )
    args, _, _ = host([*flags, "--machine_rank", "0"], H200x8)
    assert (args.env, args.rdzv_conf, args.same_network, args.num_processes) == (["A=1"], "k=v", True, 2)


def test_accelerates_own_errors_are_one_line(host, tmp_path):
    with pytest.raises(UserError, match=r"^accelerate launch: argument --main_process_port/--main-process-port: "
                                         r"invalid int value: 'abc'$"):  # fmt: skip
        host(["--num_processes", "2", "--main_process_port", "abc"], H200x8)
    with pytest.raises(UserError, match=r"^accelerate launch: The passed configuration file `/no/such.yaml` does not"):
        host(["--config_file", "/no/such.yaml"], H200x8)
    with pytest.raises(UserError, match=r"^--num_machines 2 needs --main_process_ip"):
        host(["--num_processes", "16", "--num_machines", "2"], H200x8)


def test_an_accelerate_config_file_is_read_by_accelerate_the_last_one_given(host, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\nmixed_precision: fp16\n")
    second.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: 'no'\n")
    args, precision, _ = host(["--config_file", str(first)], V100x4)
    assert args.num_processes == 4 and precision == ("fp16", "--mixed_precision fp16")  # the file's precision
    args, precision, _ = host(["--config_file", str(first), "--config_file", str(second)], V100x4)
    assert (args.config_file, args.num_processes, precision[0]) == (str(second), 2, "no")  # argparse: the last
    multi_node = ROOT / "configs" / "accelerate" / "multi_node.yaml"
    args, _, line = host(["--config_file", str(multi_node), "--machine_rank", "1"], H200x8)
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    assert "16 processes (DDP) on 2 machines, 8 here" in line


def test_our_own_arguments_are_one_line(host):
    for argv in (["--config"], ["--config", "--cpu"], ["--config="]):
        with pytest.raises(UserError, match=r"^--config needs a file: --config FILE$"):
            split_args(argv, "train")
    with pytest.raises(UserError, match=r"^--config is given twice"):
        split_args(["--config", "a.yaml", "--config=b.yaml"], "train")
    with pytest.raises(UserError, match=r"^unknown option --frobnicate \(accelerate launch flags: ./run.sh train"):
        split_args(["--frobnicate"], "train")
    for flags, command, key in (
        (["--batch-size=8"], "submit", "submit.batch_size=8"),
        (["--train.lr", "0.1"], "train", "train.lr=0.1"),
        (["--seed"], "train", "seed=..."),
    ):
        with pytest.raises(UserError, match=rf"did you mean {key}\?"):
            split_args(flags, command)


def test_one_process_runs_the_stage_here_on_the_config_loaded_once(tmp_path, monkeypatch):
    # issue 37: the launcher loaded the config, then the stage it started loaded it again
    from launch import start

    (tmp_path / "once_stage.py").write_text("seen = []\n\n\ndef run(cfg):\n    seen.append(cfg)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (the launcher would give this process every core)
    monkeypatch.setattr(start, "probe_devices", lambda: CPU)
    loaded = []
    monkeypatch.setattr(start, "load_config", lambda *a, **k: loaded.append(load_config(*a, **k)) or loaded[-1])
    assert start.launch("once_stage", ["name=once"]) == 0
    import once_stage

    assert len(loaded) == 1 and once_stage.seen == loaded and loaded[0].name == "once"


def test_a_config_key_typed_as_a_flag_is_one_line_naming_the_key():
    proc = run_module("launch", "train.main", "--epochs", "3", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown option --epochs: did you mean train.epochs=3? (config keys take key=value)"
    ]


def test_the_resume_command_repeats_the_run(tmp_path):
    from train.main import next_step

    cfg = load_config(None, [f"out_dir={tmp_path}", "name=my run"])
    (cfg.run_dir / "checkpoints" / "e0001_b000000").mkdir(parents=True)
    argv = ["--config", "configs/robust.yaml", "--num_processes", "2", "name=my run", "overwrite=true"]
    assert next_step(cfg, argv) == (
        "continue it with ./run.sh train --config configs/robust.yaml --num_processes 2 'name=my run' resume=auto"
    )


# Reports what a stage started by the launcher sees: its command line, its parent's, its thread
# count and accelerate state.
PROBE_STAGE = """
import json, os
from pathlib import Path

from core.cli import create_parser, parse_config, run_cli
from core.devices import create_accelerator
from core.errors import UserError


def cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\\0")


def run(cfg):
    if cfg.name == "fail":
        raise UserError("the probe was asked to fail")
    import torch

    state = create_accelerator(cfg.train.mixed_precision).state
    print(json.dumps({
        "self": cmdline(os.getpid()),
        "parent": cmdline(os.getppid()),
        "threads": torch.get_num_threads(),
        "state": [state.num_processes, str(state.distributed_type), str(state.device), str(state.mixed_precision)],
    }))


def main(argv):
    run(parse_config(create_parser("probe", "").parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
"""


@pytest.mark.slow
def test_direct_and_accelerate_runs_see_the_same_process(tmp_path):
    (tmp_path / "probe_stage.py").write_text(PROBE_STAGE, encoding="utf-8")
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "OMP_NUM_THREADS": ""}
    seen = {}
    for path, flags in PATHS.items():
        proc = run_module("launch", "probe_stage", *flags, **env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        failed = run_module("launch", "probe_stage", *flags, "name=fail", **env)
        assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == (
            "error: the probe was asked to fail"
        ), failed.stderr[-2000:]
    assert seen["direct"]["self"][1:4] == ["-m", "launch", "probe_stage"]  # the launcher's own process
    assert seen["accelerate"]["self"][1:3] == ["-m", "probe_stage"]  # started by accelerate's launcher ...
    assert seen["accelerate"]["parent"][1:4] == ["-m", "launch", "probe_stage"]  # ... in the launcher
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
    """``python -m launch train.main [flags]`` on the tiny data, long enough to be stopped mid-way."""
    overrides = shrink(["train.epochs=50", "train.checkpoint_every=2", "data.num_workers=1"], tiny_data, out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "launch", "train.main", *flags, *overrides],
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
    resumed = run_module("launch", "train.main", *shrink(["train.epochs=1", "resume=auto"], tiny_data, out))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not path.exists():
        time.sleep(0.05)
    assert path.exists(), f"{path} did not appear (exit {proc.poll()})"


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after-checkpoint", "before-checkpoint"])
def test_ctrl_c_prints_only_the_stop_line_saying_what_can_be_resumed(tiny_data, tmp_path, when):
    # Ctrl-C reaches the launcher, which stops the run's process group: the training process and
    # its two loader workers. The workers' deaths used to come back as ~45 lines of chained
    # "core.cli.Terminated ... DataLoader worker (pid N) is killed by signal: Terminated" (or an
    # "Exception ignored in" from a __del__), and a stop before any checkpoint offered resume=auto.
    out = tmp_path / "runs"
    overrides = ["data.num_workers=2", "train.epochs=50"]
    if when == "before-checkpoint":  # 64 steps to the first checkpoint, the end of epoch 0
        overrides += ["train.batch_size=2", "train.checkpoint_every=0"]
    else:
        overrides += ["train.checkpoint_every=2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    args = shrink(overrides, tiny_data, out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", "train.main", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if when == "before-checkpoint":
        _wait_for(out / "demo" / "augmented_samples.png", proc)  # written by the first step
    else:
        _wait_for_checkpoint(out, proc)
        time.sleep(1.0)  # mid-epoch, the workers busy
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    # progress bars end in \r; the rest is our own lines
    lines = [
        line
        for line in stderr.replace("\r", "\n").splitlines()
        if line.strip() and "it/s" not in line and "s/it" not in line and "|" not in line
    ]
    assert len(lines) == 1, stderr[-3000:]
    run = shlex.join(["./run.sh", "train", *args])
    if when == "before-checkpoint":
        assert not (out / "demo" / "checkpoints").exists() or not any((out / "demo" / "checkpoints").iterdir())
        assert lines[0] == (
            "stopped by SIGINT: every process of the run has ended; it had written no checkpoint yet, so there is "
            f"nothing to resume: start it again with {run}"
        )
    else:
        assert lines[0] == f"stopped by SIGINT: every process of the run has ended; continue it with {run} resume=auto"


def _is_training_process(cmdline: bytes) -> bool:
    """``python [-u] -m train.main ...`` (torch's elastic agent adds -u)."""
    return [a for a in cmdline.split(b"\0")[1:4] if a != b"-u"][:2] == [b"-m", b"train.main"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [PATHS["accelerate"], ("--num_processes", "2")], ids=["one", "two"])
def test_a_killed_training_process_is_named_with_the_resume_command(tiny_data, tmp_path, flags):
    # (a run of one process without flags is the launcher's own process: killed, the shell says so)
    out = tmp_path / "runs"
    proc = _start_training(tiny_data, out, *flags)
    _wait_for_checkpoint(out, proc)
    # the training process: `python -m train.main`, started by the launcher or accelerate launch
    # (its loader workers, its children, have the same command line; rank 0 is the first one)
    trainer = min(
        pid
        for pid in _processes_mentioning(str(tmp_path))
        if _is_training_process(Path(f"/proc/{pid}/cmdline").read_bytes())
        and not _is_training_process(_parent_cmdline(pid))
    )
    os.kill(trainer, signal.SIGKILL)  # what the out-of-memory killer does
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    # the error line (after the progress bar's last \r, which ends without a newline)
    line = stderr[stderr.index("error: ") :].splitlines()[0] if "error: " in stderr else stderr[-2000:]
    assert f"(pid {trainer}) of train.main died without reporting" in line
    assert "SIGKILL" in line
    # the hint repeats the run's own command (here: its launch flags and overrides), with resume=auto
    expected = " ".join(["./run.sh train", *flags, "data.root=" + str(tiny_data)])
    assert f"Continue it with {expected} " in line and line.endswith(
        "resume=auto (checkpoints are written atomically)."
    )


def test_help_is_the_pipelines_own():
    proc = run_module("launch", "train.main", "--help", timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: ./run.sh train [--config FILE] [key=value ...]")
    assert "core/config/schema.py" in proc.stdout and "--num_processes N" in proc.stdout and "--gpu_ids" in proc.stdout
    assert "submit" in run_module("launch", "infer.submit", "-h", timeout=60).stdout.splitlines()[0]


def test_a_bad_aug_entry_stops_a_direct_training_run_in_one_line(tmp_path):
    # The launcher leaves the aug section to the stage on the direct path: still one line, exit 2,
    # and no run folder.
    proc = run_module("launch", "train.main", "aug.extra=[{name: NoSuchBlur}]", f"out_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'aug.extra[0]': unknown albumentations transform 'NoSuchBlur'"
    ]
    assert not any(tmp_path.iterdir())


def test_a_crashed_killed_or_stopped_training_is_told_how_to_continue(tmp_path, capsys):
    cfg = load_config(None, [f"out_dir={tmp_path}"])
    argv = ["--config", "configs/robust.yaml", "train.epochs=3"]
    assert explain_exit(1, 0, 123, "train.main", cfg, argv) == 1  # before its first checkpoint
    assert capsys.readouterr().err.strip() == (
        "train crashed (the traceback is above); it had written no checkpoint yet, so there is nothing to resume: "
        "start it again with ./run.sh train --config configs/robust.yaml train.epochs=3 once the cause is fixed"
    )
    (cfg.run_dir / "checkpoints" / "e0001_b000000.tmp").mkdir(parents=True)  # a torn write: nothing to resume
    assert stopped(signal.SIGTERM, "train.main", cfg, argv) == 143
    assert "it had written no checkpoint yet" in capsys.readouterr().err
    (cfg.run_dir / "checkpoints" / "e0001_b000000").mkdir()
    assert explain_exit(1, 0, 123, "train.main", cfg, argv) == 1
    assert capsys.readouterr().err.strip() == (
        "train crashed (the traceback is above); continue it with ./run.sh train --config configs/robust.yaml "
        "train.epochs=3 resume=auto once the cause is fixed"
    )
    assert stopped(signal.SIGINT, "train.main", cfg, argv) == 130
    assert capsys.readouterr().err.strip() == (
        "stopped by SIGINT: every process of the run has ended; continue it with ./run.sh train --config "
        "configs/robust.yaml train.epochs=3 resume=auto"
    )
    assert explain_exit(-9, 1, 77, "train.main", cfg, argv) == 137
    assert capsys.readouterr().err.strip() == (
        "error: process rank 1 (pid 77) of train.main died without reporting an error: it was killed by a signal it "
        "cannot catch (SIGKILL: kill -9, or the kernel's out-of-memory killer). Continue it with ./run.sh train "
        "--config configs/robust.yaml train.epochs=3 resume=auto (checkpoints are written atomically)."
    )
    assert explain_exit(2, 0, 123, "train.main", cfg, argv) == 2 and capsys.readouterr().err == ""  # its own line
    assert explain_exit(2, 0, 123, "infer.submit", cfg, argv) == 2 and capsys.readouterr().err == ""


def test_a_stop_that_lands_in_a_finalizer_still_stops_the_stage(capsys):
    # Python drops an exception raised inside __del__ ("Exception ignored in ..."): a stop signal
    # that landed there used to be lost, and the stage ran on until the launcher killed it.
    from core.cli import run_cli

    reached: list[str] = []

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100_000):  # the handler runs here, inside __del__
                pass

    def stage(argv) -> None:
        Finalized()
        time.sleep(5)
        reached.append("end")

    start = time.perf_counter()
    assert run_cli(stage, []) == 143
    assert reached == [] and time.perf_counter() - start < 4
    err = capsys.readouterr().err
    assert err.strip() == "terminated" and "Exception ignored" not in err


def test_a_space_instead_of_equals_is_one_line_with_the_fix_before_any_launch_line(tmp_path):
    # The launcher used to pass "train.epochs 2" on unchecked: its launch line came first, then
    # the stage's error, which did not say what to type.
    proc = run_module("launch", "train.main", "train.epochs", "2", f"out_dir={tmp_path}", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: override 'train.epochs' is not of the form key=value (did you mean train.epochs=2?)"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_a_sigkilled_launcher_takes_its_run_with_it(tiny_data, tmp_path, path):
    # issue 35, 17: SIGKILL of the launcher orphaned the training process (ppid 1), which held the
    # lock, so the rerun was refused. Its children now get SIGTERM when it dies (PR_SET_PDEATHSIG).
    out = tmp_path / "runs"
    proc = _start_training(tiny_data, out, *PATHS[path])
    _wait_for_checkpoint(out, proc)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 120
    while _processes_mentioning(str(tmp_path)) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path)) == [], "the run outlived its SIGKILLed launcher"
    resumed = run_module("launch", "train.main", *shrink(["train.epochs=1", "resume=auto"], tiny_data, out))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


def test_a_config_flag_without_a_file_is_one_line_before_anything_starts():
    proc = run_module("launch", "train.main", "train.epochs=1", "--config", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --config needs a file: --config FILE"
