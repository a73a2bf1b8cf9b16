"""Training stage on the real code path: run(cfg) on tiny generated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.checkpoint import load_model
from core.config import load_config
from core.errors import UserError
from core.tracking import resolve_wandb_mode
from tests.conftest import LEARNED, ROOT, run_module, shrink, weight_difference
from train import main as train_main
from train.demo_data import generate_demo_data
from train.setup import create_model_and_optimizer


def test_two_step_run_writes_everything(tiny_config):
    cfg = tiny_config("train.max_steps=2")
    result = train_main.run(cfg)
    assert result["global_step"] == 2
    run_dir = cfg.run_dir
    for name in (
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
        "config.yaml",
        "augmented_samples.png",
    ):
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "best.json").read_text())
    assert info["arch"] == "test_convnext" and info["num_classes"] == 4 and info["image_size"] == 32
    assert info["config"]["train"]["max_steps"] == 2
    assert len(info["mean"]) == 3  # normalization recorded in the checkpoint
    # the resolved config saved beside the checkpoint loads back as the same config
    assert load_config(run_dir / "config.yaml").train.max_steps == 2
    model, _ = load_model(run_dir / "best")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    assert ckpt.name == "e0000_b000002"
    # nothing in a checkpoint needs unpickling beyond what accelerate loads with weights_only=True
    assert not list(ckpt.glob("custom_checkpoint_*")) and (ckpt / "train_state.json").is_file()


def test_demo_run_learns(tmp_path):
    """The default recipe, shrunk to 32 px and test_convnext, learns the demo classes (chance 25%)."""
    data = tmp_path / "demo"
    generate_demo_data(data, num_classes=4, train_per_class=150, test_per_class=5, image_size=32)
    cfg = load_config(
        None,
        shrink(
            ["train.epochs=12", "train.warmup_epochs=1", "train.batch_size=32", "train.lr=4e-3"],
            data,
            tmp_path / "runs",
        ),
    )
    result = train_main.run(cfg)
    assert result["best_acc"] >= LEARNED, result


def test_resume_mid_epoch_equals_uninterrupted(tiny_config, tmp_path):
    # drop-path, augmentation, mixup and EMA all draw randomness: resume must replay it exactly.
    common = [
        "train.epochs=2",
        "model.drop_path_rate=0.1",
        "train.mixup=0.2",
        "train.checkpoint_every=3",
        "aug.corruption_p=0.5",
    ]
    full = tiny_config(*common, "name=full")
    train_main.run(full)

    part = tiny_config(*common, "name=part", "train.max_steps=4")
    first = train_main.run(part)
    assert first["global_step"] == 4 and first["epochs"] == 0  # stopped inside epoch 0
    resumed = train_main.run(tiny_config(*common, "name=part", "resume=auto"))
    assert resumed["epochs"] == 2

    worst = weight_difference(full.run_dir, part.run_dir)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run by {worst}"
    full_info = json.loads((full.run_dir / "last.json").read_text())
    part_info = json.loads((part.run_dir / "last.json").read_text())
    assert full_info["global_step"] == part_info["global_step"]
    assert full_info["val_acc"] == pytest.approx(part_info["val_acc"])


def test_a_finished_run_is_never_replaced_silently(tiny_config):
    cfg = tiny_config("train.max_steps=3", "train.checkpoint_every=1")
    train_main.run(cfg)
    assert len(list((cfg.run_dir / "checkpoints").iterdir())) == 2  # keep_checkpoints
    best = (cfg.run_dir / "best.safetensors").read_bytes()
    with pytest.raises(
        UserError,
        match=r"name=demo: .* already holds a run \(best.safetensors, last.safetensors, "
        r"2 checkpoint\(s\)\); continue it with resume=auto, train under another "
        r"name=\.\.\., or replace it with overwrite=true",
    ):
        train_main.run(tiny_config("train.max_steps=1"))
    assert (cfg.run_dir / "best.safetensors").read_bytes() == best  # untouched
    # overwrite=true: a clean slate, nothing of the old run can be mistaken for the new one's
    train_main.run(tiny_config("train.max_steps=1", "overwrite=true"))
    assert [p.name for p in (cfg.run_dir / "checkpoints").iterdir()] == ["e0000_b000001"]
    assert json.loads((cfg.run_dir / "best.json").read_text())["global_step"] == 1


def test_a_resume_at_the_step_limit_says_so_and_trains_nothing(tiny_config, capsys):
    # It used to take one more optimizer step (the loop checks max_steps after a step), and the
    # first run's last line said "done:" although max_steps had cut it short.
    cfg = tiny_config("train.max_steps=3", "train.epochs=2")
    train_main.run(cfg)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("stopped by train.max_steps=3 (0 of 2 epochs complete): best val acc "), last
    checkpoints = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    result = train_main.run(tiny_config("train.max_steps=3", "train.epochs=2", "resume=auto"))
    assert result["global_step"] == 3
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "nothing to train: the run already stands at step 3, the limit train.max_steps=3; raise it "
        "(0 = every epoch) to continue with resume=auto"
    )
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == checkpoints


def test_resume_under_another_model_is_one_line_naming_the_key(tiny_config):
    train_main.run(tiny_config("train.max_steps=1"))
    with pytest.raises(
        UserError,
        match=r"resume: .* was trained with model.name=test_convnext, this config says "
        r"model.name=test_convnext2",
    ):
        train_main.run(tiny_config("train.max_steps=2", "resume=auto", "model.name=test_convnext2"))


def test_an_image_size_the_model_cannot_take_fails_first_and_leaves_nothing(tiny_config):
    cfg = tiny_config("data.image_size=16", "train.max_steps=1")
    with pytest.raises(UserError, match="data.image_size=16 is too small for test_convnext"):
        train_main.run(cfg)
    assert not cfg.run_dir.exists()  # the failed run left no empty folder behind


def test_demo_data_replaced_for_another_class_count_says_so(tmp_path, capsys):
    root = tmp_path / "demo"
    generate_demo_data(root, num_classes=4, train_per_class=10, test_per_class=2, image_size=32)
    cfg = load_config(
        None, shrink(["data.demo=true", "data.num_classes=3", "train.max_steps=1"], root, tmp_path / "runs")
    )
    train_main.run(cfg)
    out = capsys.readouterr().out
    assert (
        f"demo data: regenerated {root} for data.num_classes=3, data.image_size=32 (it held 4 classes at 32 px)" in out
    )


def test_wandb_falls_back_offline_fast_and_never_leaks_the_key(tiny_config, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_wandb_mode("auto", 2.0) == ("offline", "no W&B API key found (WANDB_API_KEY or ~/.netrc)")

    secret = "sentinel" + "0123456789" * 3
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a key, but no server: offline, fast
    start = time.perf_counter()
    cfg = tiny_config("train.max_steps=2", "wandb.mode=auto", "wandb.timeout=2")
    train_main.run(cfg)
    assert time.perf_counter() - start < 60
    assert len(list((cfg.run_dir / "wandb").glob("offline-run-*"))) == 1
    leaked = [p for p in cfg.run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []


@pytest.mark.slow
def test_two_cpu_processes(tiny_data, tmp_path):
    """`--num_processes 2` without a GPU really runs 2 gloo processes; only rank 0 writes."""
    out = tmp_path / "runs"
    overrides = shrink(["name=ddp", "train.epochs=1"], tiny_data, out)
    proc = run_module("launch", "train.main", "--num_processes", "2", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es)") == 1, proc.stdout  # printed by the main process only
    assert "Grad strides do not match bucket view strides" not in proc.stderr  # DDP's layout warning
    run_dir = out / "ddp"
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    # accelerate saves one RNG state per process: both ranks took part in the checkpoint
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    # ... and each its own: the ranks' random draws (PGD's random starts, drop-path) differ (issue 33)
    rank0, rank1 = (torch.load(ckpt / f"random_states_{i}.pkl", weights_only=False) for i in (0, 1))
    assert not torch.equal(rank0["torch_manual_seed"], rank1["torch_manual_seed"])
    info = json.loads((run_dir / "last.json").read_text())
    # 128 training images, batch 16 per process, 2 processes -> 4 optimizer steps per epoch
    assert info["global_step"] == 4
    assert sorted(p.name for p in run_dir.iterdir() if p.is_file()) == [
        ".claims.json",  # the names train keeps for itself (core.outputs.claim_names)
        "augmented_samples.png",
        "best.json",
        "best.safetensors",
        "config.yaml",
        "last.json",
        "last.safetensors",
    ]


def test_kernel_gradients_come_back_in_their_parameters_strides(tiny_config):
    """What DDP checks on every backward (literally, size-1 dimensions included): timm's ConvNeXt
    feeds its depthwise convs channels_last activations, whose kernel gradients come back in
    channels_last strides; the training model lays those kernels out that way from the start."""
    for name in ("test_convnext", "convnext_atto"):
        model, _, _ = create_model_and_optimizer(tiny_config(f"model.name={name}"), 1)
        model(torch.rand(2, 3, 32, 32)).sum().backward()
        wrong = {n: (p.grad.stride(), p.stride()) for n, p in model.named_parameters() if p.grad.stride() != p.stride()}
        assert wrong == {}, f"{name}: gradient strides differ from the parameters': {wrong}"


# Each rank writes its own file: two ranks printing to one pipe interleave ("rank 0: 2.0rank 1: 2.0"
# was seen in CI, where an unbuffered stdout writes the text and its newline separately).
MEAN_PROBE = """
import sys
from pathlib import Path
from accelerate import Accelerator
from train.engine import mean_over_processes
accelerator = Accelerator(cpu=True)
# rank 0 trained 3 batches at loss 1.0, rank 1 one batch at loss 5.0: the mean over all is 2.0
total, count = (3.0, 3) if accelerator.process_index == 0 else (5.0, 1)
mean = mean_over_processes(accelerator, total, count)
(Path(sys.argv[1]) / f"rank{accelerator.process_index}.txt").write_text(str(mean))
accelerator.end_training()  # a group left to the interpreter's exit may abort a rank (core.cli.end_process_group)
"""


TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_cpu_threads_per_process", "1"]


@pytest.mark.slow
def test_the_logged_loss_is_the_mean_over_every_process(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(MEAN_PROBE)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    proc = subprocess.run(
        [*launch, *TWO_CPU_PROCESSES, str(script), str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))} == {
        "rank0.txt": "2.0",
        "rank1.txt": "2.0",
    }


# What makes the host wait for the device: reading a value back (a training step must do none of it,
# or a GPU idles between steps while the host waits, then the host idles while the GPU works). Only
# our code's reads count: torch's AdamW reads its step counter, which it keeps on the CPU.
HOST_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")


def _called_from_the_project() -> bool:
    caller = Path(sys._getframe(2).f_code.co_filename).resolve()
    return caller.is_relative_to(ROOT) and ".venv" not in caller.parts and caller.parent.name != "tests"


@pytest.mark.parametrize("mode", ["none", "pgd"])
def test_a_training_step_never_waits_for_the_device(tiny_config, monkeypatch, mode):
    from train import engine

    inside, reads = {"step": False}, []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            if inside["step"] and _called_from_the_project():
                reads.append(f"{_name} in {Path(sys._getframe(1).f_code.co_filename).name}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    real_step = engine.train_step

    def step(*args, **kwargs):
        inside["step"] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            inside["step"] = False

    monkeypatch.setattr(engine, "train_step", step)
    adv = [f"train.adv.mode={mode}", "train.adv.steps=2", "train.adv.val_steps=1", "train.adv.val_images=8"]
    result = train_main.run(tiny_config("train.max_steps=3", "train.ema=false", *adv))
    assert result["global_step"] == 3
    assert reads == [], f"a training step read {reads} back from the device"


def test_every_run_measures_its_wait_for_data(tiny_config, monkeypatch, capsys):
    """A loader slower than the step shows as data wait: in the metrics and in the run's last line."""
    from core.datasets import ImageDataset

    real_getitem = ImageDataset.__getitem__

    def slow(self, index):
        time.sleep(0.03)  # 16 images a batch: 0.48 s more waiting per batch
        return real_getitem(self, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", slow)
    result = train_main.run(tiny_config("train.max_steps=3"))
    # 3 training batches, the 4th already asked for by the loader's prefetch (the validation pass
    # is not a step's wait, nor is the step itself: 48 images' decoding takes far less than 2 s)
    assert 3 * 0.48 <= result["data_wait_s"] < 4 * 0.48 + 2.0
    assert 0.0 < result["data_wait_frac"] < 1.0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"data wait {result['data_wait_frac']:.0%} of step time" in last, last
