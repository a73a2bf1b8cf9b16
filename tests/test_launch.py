"""The launcher's accelerate arguments: multi-process CPU runs and their thread count."""

from __future__ import annotations

import pytest

from core.launch import DEFAULT_ACCELERATE_CONFIG, ROOT, resolve_launch_args, split_args


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
