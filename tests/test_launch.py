"""The launcher: one plain process runs the stage directly, anything else under accelerate launch
(multi-process CPU runs and their thread count); signals, exit codes and the SIGKILL report on both paths."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.config import load_config
from core.devices import Devices, available_cores
from core.errors import UserError
from launch.plan import DEFAULT_ACCELERATE_CONFIG, ROOT, parse_flags, plan_launch, split_args
from launch.start import create_command, resume_command
from tests.conftest import run_module, shrink

# `./run.sh train` without flags runs the stage directly; any launch flag, even one that asks for
# nothing more, goes through accelerate launch.
PATHS = {"direct": (), "accelerate": ("--num_processes", "1")}

CPU = Devices(cuda=0, cores=8)
H200x8 = Devices(cuda=8, names=("NVIDIA H200",) * 8, bf16=True, cores=128)
V100x4 = Devices(cuda=4, names=("Tesla V100",) * 4, bf16=False, cores=32)


def plan(accel=(), devices=CPU, module="train.main", overrides=(), env=None, config_file=None):
    """The launch of ``./run.sh train [overrides] [accel]`` on ``devices`` (nothing is started)."""
    cfg = load_config(None, list(overrides))
    return plan_launch(module, parse_flags(list(accel)), cfg, devices, env={} if env is None else env,
                       config_file=config_file)  # fmt: skip


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# --- the CPU: one direct process, or gloo processes sharing the cores --------------------------


def test_a_cpu_run_is_one_direct_process_with_every_core():
    p = plan()
    assert (p.direct, p.processes, p.gpu_ids, p.precision, p.threads) == (True, 1, None, "no", 8)
    env: dict = {}
    assert create_command(p, "train.main", ["a.b=1"], env) == [sys.executable, "-m", "train.main", "a.b=1"]
    assert env["OMP_NUM_THREADS"] == "8"
    env = {"OMP_NUM_THREADS": "1"}
    create_command(p, "train.main", [], env)
    assert env["OMP_NUM_THREADS"] == "1"  # the user's choice


@pytest.mark.parametrize(
    "accel,cores,threads",
    [
        (["--num_processes", "2"], 8, "4"),
        (["--num_processes=4"], 2, "1"),  # never below one thread
        (["--cpu", "--num-processes", "2"], 8, "4"),  # --cpu alone would run one process
        (["--num_processes", "2", "--num_cpu_threads_per_process", "3"], 8, "3"),  # the user's choice
    ],
)
def test_cpu_processes_run_with_gloo_and_share_the_cores(accel, cores, threads):
    p = plan(accel, Devices(cuda=0, cores=cores))
    assert not p.direct and p.gpu_ids is None
    assert "--multi_gpu" in p.accelerate and "--cpu" not in p.accelerate
    assert flag(p.accelerate, "--num_cpu_threads_per_process") == threads
    assert flag(p.accelerate, "--num_processes") == str(p.processes)


def test_omp_num_threads_is_left_to_accelerate():
    p = plan(["--num_processes", "2"], env={"OMP_NUM_THREADS": "3"})
    assert "--num_cpu_threads_per_process" not in p.accelerate


@pytest.mark.parametrize(
    "accel,message",
    [
        (["--gpu_ids", "0"], "--gpu_ids 0: no CUDA device is visible here"),
        (["--mixed_precision", "fp16"], "--mixed_precision fp16: fp16 needs a GPU and this run is on the CPU"),
        (["--num_processes", "0"], "--num_processes 0: must be at least 1"),
        (["--num_processes", "two"], "--num_processes two: expected a whole number"),
    ],
)
def test_gpu_only_settings_on_a_cpu_machine_are_one_line(accel, message):
    with pytest.raises(UserError, match="^" + message.replace("+", r"\+")):
        plan(accel)


# --- GPUs: every visible one by default --------------------------------------------------------


def test_every_gpu_runs_one_process_in_bf16_by_default():
    p = plan(devices=H200x8)
    assert (p.processes, p.gpu_ids, p.precision, p.direct) == (8, list(range(8)), "bf16", False)
    assert "--multi_gpu" in p.accelerate and flag(p.accelerate, "--mixed_precision") == "bf16"
    assert flag(p.accelerate, "--gpu_ids") == "all" and p.env == {}  # all of them: nothing remapped
    assert p.describe(H200x8) == (
        "launch: train as 8 processes (DDP) on GPUs 0-7 of 8 (NVIDIA H200); precision bf16 (train.mixed_precision=auto)"
    )


def test_num_processes_takes_the_first_gpus_and_gpu_ids_chooses_them():
    assert plan(["--num_processes", "4"], H200x8).env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    # --gpu_ids counts the visible devices, so it composes with the user's CUDA_VISIBLE_DEVICES
    p = plan(["--gpu_ids", "2,5"], H200x8, env={"CUDA_VISIBLE_DEVICES": "4,5,6,7,0,1,2,3"})
    assert (p.processes, p.gpu_ids, p.env) == (2, [2, 5], {"CUDA_VISIBLE_DEVICES": "6,1"})
    assert "GPUs 2,5 of 8" in p.describe(H200x8)


def test_one_gpu_runs_directly_on_that_gpu():
    p = plan(devices=Devices(cuda=1, names=("NVIDIA H200",), bf16=True, cores=16))
    assert (p.direct, p.processes, p.precision, p.env) == (True, 1, "bf16", {})
    p = plan(["--gpu_ids", "3"], H200x8)
    assert p.processes == 1 and p.env == {"CUDA_VISIBLE_DEVICES": "3"} and not p.direct


@pytest.mark.parametrize(
    "accel,message",
    [
        (["--num_processes", "9"], "--num_processes 9 needs 9 GPUs on this machine, but 8 are visible here"),
        (["--gpu_ids", "0,1", "--num_processes", "4"], "--num_processes 4 needs 4 GPUs on this machine, but 2 are"),
        (["--gpu_ids", "8"], "--gpu_ids 8: no CUDA device 8 here; 8 visible, numbered 0-7"),
        (["--gpu_ids", "0,0"], "--gpu_ids 0,0: a device is listed twice"),
        (["--num_machines", "2", "--num_processes", "3"], "--num_processes 3 is not a multiple of --num_machines 2"),
    ],
)
def test_more_processes_than_gpus_is_one_line(accel, message):
    with pytest.raises(UserError, match="^" + message):
        plan(accel, H200x8)


def test_precision_flag_key_and_gpu_kind():
    p = plan(["--mixed_precision", "fp16"], H200x8)
    assert p.precision == "fp16" and p.overrides == ["train.mixed_precision=fp16"]
    assert plan(overrides=["train.mixed_precision=no"], devices=H200x8).precision == "no"
    assert plan(["--mixed_precision", "bf16"], H200x8, overrides=["train.mixed_precision=auto"]).precision == "bf16"
    with pytest.raises(UserError, match="^--mixed_precision fp16 and train.mixed_precision=no disagree"):
        plan(["--mixed_precision", "fp16"], H200x8, overrides=["train.mixed_precision=no"])
    # GPUs without native bf16: auto is float32; asking for bf16 by name is refused
    assert plan(devices=V100x4).precision == "no"
    with pytest.raises(UserError, match="do not compute bf16 natively"):
        plan(["--mixed_precision", "bf16"], V100x4)


def test_cpu_flag_hides_the_gpus_from_the_processes():
    p = plan(["--cpu"], H200x8)
    assert p.gpu_ids is None and p.precision == "no" and p.env == {"CUDA_VISIBLE_DEVICES": ""}


def test_several_machines_pass_their_flags_on():
    accel = ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--same_network"]
    p = plan(accel, H200x8)
    assert (p.processes, p.local_processes) == (16, 8)
    assert flag(p.accelerate, "--machine_rank") == "1" and flag(p.accelerate, "--main_process_ip") == "10.0.0.1"
    assert "--same_network" in p.accelerate and "on 2 machines, 8 here" in p.describe(H200x8)
    p = plan(config_file=ROOT / "configs/accelerate/multi_node.yaml", devices=H200x8)
    assert (p.processes, p.machines) == (16, 2)


def test_an_accelerate_config_file_is_read(tmp_path):
    config = tmp_path / "acc.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\nmixed_precision: fp16\n")
    p = plan(["--config_file", str(config)], H200x8, config_file=config)
    assert p.processes == 4 and p.config_file == config
    config.write_text("distributed_type: DEEPSPEED\n")
    with pytest.raises(UserError, match="distributed_type DEEPSPEED is not supported here"):
        plan(config_file=config)


@pytest.mark.parametrize(
    "accel,message",
    [
        (["--use_deepspeed"], "--use_deepspeed: DeepSpeed is not supported"),
        (["--fsdp_version", "2"], "--fsdp_version: FSDP is not supported"),
        (["--tpu"], "--tpu: TPUs are not supported"),
        (["--dynamo_backend", "inductor"], "--dynamo_backend: use model.compile=true"),
        (["--gradient_accumulation_steps", "4"], "--gradient_accumulation_steps: use train.grad_accum_steps=N"),
        (["-m"], "--m: the launcher runs the stage as a module itself"),
        (["--num_processes"], "--num_processes needs a value"),
        (["--frobnicate"], r"unknown option --frobnicate \(launch flags: ./run.sh train --help\)"),
    ],
)
def test_flags_this_pipeline_does_not_use_are_refused_in_one_line(accel, message):
    with pytest.raises(UserError, match="^" + message):
        parse_flags(accel, "train")


def test_evaluate_attacks_in_float32():
    assert plan(devices=H200x8, module="robust.evaluate").precision == "no"
    with pytest.raises(UserError, match="evaluate attacks in float32"):
        plan(["--mixed_precision", "bf16"], H200x8, module="robust.evaluate")


def test_split_args_sends_flags_to_the_launcher():
    ours, accel = split_args(["--config", "c.yaml", "a.b=1", "--num_processes", "2", "--cpu", "--debug"])
    assert ours == ["--config", "c.yaml", "a.b=1", "--debug"]
    assert accel == ["--num_processes", "2", "--cpu"]


def test_a_config_key_typed_as_a_flag_is_one_line_naming_the_key():
    proc = run_module("launch", "train.main", "--epochs", "3", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown option --epochs: did you mean train.epochs=3? (config keys take key=value)"
    ]
    for accel, command, key in (
        (["--batch-size=8"], "submit", "submit.batch_size=8"),
        (["--train.lr", "0.1"], "train", "train.lr=0.1"),
        (["--seed"], "train", "seed=..."),
    ):
        with pytest.raises(UserError, match=rf"did you mean {key}\?"):
            parse_flags(accel, command)


def test_the_resume_command_repeats_the_run():
    argv = ["--config", "configs/robust.yaml", "--num_processes", "2", "name=my run", "overwrite=true"]
    assert resume_command(argv) == (
        "./run.sh train --config configs/robust.yaml --num_processes 2 'name=my run' resume=auto"
    )


def test_every_launch_passes_an_explicit_accelerate_config():
    # accelerate reads the user's ~/.cache default config unless one is given: ours asks for nothing
    cmd = create_command(plan(["--num_processes", "2"]), "train.main", [], {})
    assert cmd[cmd.index("--config_file") + 1] == str(DEFAULT_ACCELERATE_CONFIG)


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
        proc = run_module("launch", "probe_stage", *flags, **env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        failed = run_module("launch", "probe_stage", *flags, "name=fail", **env)
        assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == (
            "error: the probe was asked to fail"
        ), failed.stderr[-2000:]
    assert seen["direct"]["parent"][1:4] == ["-m", "launch", "probe_stage"]  # no accelerate launch between
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
    # the error line (after the progress bar's last \r, which ends without a newline)
    line = stderr[stderr.index("error: ") :].splitlines()[0] if "error: " in stderr else stderr[-2000:]
    assert f"process rank 0 (pid {trainer}) of train.main died without reporting" in line
    assert "SIGKILL" in line
    # the hint repeats the run's own command (here: its launch flags and overrides), with resume=auto
    expected = " ".join(["./run.sh train", *PATHS[path], "data.root=" + str(tiny_data)])
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


def test_a_crashed_or_stopped_training_is_told_how_to_continue(tmp_path, capsys):
    from launch.start import explain_exit

    argv = ["--config", "configs/robust.yaml", "train.epochs=3"]
    (tmp_path / "started-0").write_text("123")
    (tmp_path / "ended-0").write_text("1 crashed")
    assert explain_exit("train.main", 1, None, tmp_path, argv) == 1  # before its first checkpoint
    assert capsys.readouterr().err.strip() == (
        "train crashed (the traceback is above); it had written no checkpoint yet, so there is nothing to resume: "
        "start it again with ./run.sh train --config configs/robust.yaml train.epochs=3 once the cause is fixed"
    )
    (tmp_path / "resumable-0").write_text("e0001_b000000")  # what train reports once it has a checkpoint
    assert explain_exit("train.main", 1, None, tmp_path, argv) == 1
    assert capsys.readouterr().err.strip() == (
        "train crashed (the traceback is above); continue it with ./run.sh train --config configs/robust.yaml "
        "train.epochs=3 resume=auto once the cause is fixed"
    )
    assert explain_exit("train.main", 143, signal.SIGTERM, tmp_path, argv) == 128 + signal.SIGTERM
    assert "continue it with ./run.sh train --config configs/robust.yaml" in capsys.readouterr().err
    (tmp_path / "ended-0").write_text("2 error")  # bad input: its own line says what to do
    assert explain_exit("train.main", 1, None, tmp_path, argv) == 2 and capsys.readouterr().err == ""


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


@pytest.mark.parametrize(
    "accel,message",
    [
        (["--num_processes", "2", "--num_machines", "2"], "--num_machines 2 needs --main_process_ip"),
        (["--machine_rank", "3"], "--machine_rank 3: must be below --num_machines 1"),
        (["--machine_rank=-1"], "--machine_rank -1: must be at least 0"),
        (["--main_process_port", "abc"], "--main_process_port abc: expected a port number in 1..65535"),
        (["--main_process_port", "70000"], "--main_process_port 70000: expected a port number"),
    ],
)
def test_machine_flags_that_cannot_work_are_one_line(accel, message):
    # issue 35, 20 and 21: two machines without the main one's address hung on "(None, 29500)"; a
    # machine rank of no machine was ignored; a port "abc" printed 114 lines of accelerate's usage.
    with pytest.raises(UserError, match="^" + re.escape(message)):
        plan(accel)


def test_launch_flag_values_and_config_files_are_read_as_given(tmp_path):
    # issue 35, 21: `--env A=1` and `--rdzv_conf k=v` "needed a value"; `--config` without a file
    # crashed in the stage; `--config A --config B` checked A and ran B.
    ours, accel = split_args(["--env", "A=1", "--rdzv_conf", "k=v", "x.y=2", "--epochs", "a.b=1"])
    assert accel == ["--env", "A=1", "--rdzv_conf", "k=v", "--epochs"] and ours == ["x.y=2", "a.b=1"]
    assert parse_flags(accel[:4]) == {"env": ["A=1"], "rdzv_conf": "k=v"}
    for argv in (["--config"], ["--config", "--cpu"], ["--config="]):
        with pytest.raises(UserError, match=r"^--config needs a file: --config FILE$"):
            split_args(argv)
    with pytest.raises(UserError, match=r"^--config is given twice"):
        split_args(["--config", "a.yaml", "--config=b.yaml"])
    # an accelerate file's settings as accelerate reads them: its precision, an unquoted NO
    config = tmp_path / "acc.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: fp16\n")
    p = plan(["--config_file", str(config)], V100x4, config_file=config)
    assert p.precision == "fp16" and "train.mixed_precision=fp16" in p.overrides
    config.write_text("distributed_type: NO\nmixed_precision: no\n")
    p = plan(["--config_file", str(config)], H200x8, config_file=config)
    assert p.precision == "no"


def test_a_config_flag_without_a_file_is_one_line_before_anything_starts():
    proc = run_module("launch", "train.main", "train.epochs=1", "--config", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --config needs a file: --config FILE"
