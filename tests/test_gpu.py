"""On a real CUDA GPU (``./run.sh test -m gpu``; bench/gpu_check.sh runs them): skipped without one.

What a CPU cannot show: a bf16 PGD-AT step, GCM concealing under CUDA autocast, a channels_last +
compiled step, submit's predictions on the GPU against the CPU's, an export from a checkpoint
trained on the GPU, and evaluate running its attacks there.

``GPU_TESTS_DEVICE=cpu`` (what ``bench/gpu_check.sh --rehearse`` sets) runs the same tests on the
CPU with what ``auto`` turns on for a GPU forced (bf16 autocast, channels_last): every step the GPU
check takes, rehearsed where no GPU is.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from bench.gpu import GPU_AUTO
from core.checkpoint import load_model
from core.config import load_config
from gcm import GradientConcealment
from tests.conftest import LEARNED, run_module, shrink
from train.demo_data import generate_demo_data

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("GPU_TESTS_DEVICE", "cuda")
FORCED = GPU_AUTO if DEVICE == "cpu" else []  # on the CUDA device `auto` turns these on itself


def train_on_gpu(tiny_data: Path, out: Path, *overrides: str) -> tuple[dict, list[str]]:
    """``train.main.run`` on the GPU with the run's defaults (auto precision, layout, workers)."""
    from train.main import run

    args = shrink(["train.epochs=3", "data.num_workers=-1", *FORCED, *overrides], tiny_data, out)
    return run(load_config(None, args)), args


def test_gcm_conceals_under_cuda_autocast():
    x = torch.rand(4, 3, 32, 32, device=DEVICE).clamp_min(0.01)
    reference = GradientConcealment()(x)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(DEVICE, dtype=dtype):
            x_in = x.clone().requires_grad_(True)
            y = GradientConcealment()(x_in)
            y.sum().backward()
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        assert torch.equal(y, reference)  # the same float32 values as without autocast
        # the concealed gradient: 1 + 1e12 cos(1e20 x), about 1e12 in size with both signs
        g = x_in.grad
        assert torch.isfinite(g).all() and g.abs().median() > 1e10 and (g > 0).any() and (g < 0).any()


def test_a_bf16_pgd_training_step(tiny_data, tmp_path, capsys):
    result, _ = train_on_gpu(tiny_data, tmp_path, "train.adv.mode=pgd", "train.adv.steps=2", "train.adv.val_images=16")
    started = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train "))
    assert f"on {DEVICE}" in started and "precision bf16, channels_last" in started, started
    assert result["global_step"] > 0 and 0.0 <= result["best_robust_acc"] <= 100.0


def test_channels_last_and_compile_step(tiny_data, tmp_path):
    result, _ = train_on_gpu(tiny_data, tmp_path, "model.compile=true", "model.channels_last=true", "train.epochs=1")
    assert result["global_step"] > 0 and result["val_acc"] == result["val_acc"]  # finite, no NaN


def test_submit_on_the_gpu_agrees_with_the_cpu(tmp_path):
    # A model that learned (a random one's near-ties would flip on any rounding): the suite's recipe
    # and data size for that (test_train's test_demo_run_learns). On tiny_data's 128 training images
    # it reached 28-31% (chance 25%), in float32 and bf16 alike, in the GPU check's rehearsal.
    data = tmp_path / "demo"
    generate_demo_data(data, num_classes=4, train_per_class=150, test_per_class=8, image_size=32)
    result, args = train_on_gpu(data, tmp_path / "runs", "train.epochs=12", "train.lr=4e-3", "train.batch_size=32")
    assert result["best_acc"] >= LEARNED
    preds = {}
    for name, extra in {
        "gpu_bf16": {},
        "gpu_fp32": {"overrides": ["train.mixed_precision=no"]},
        # what `auto` picks on the CPU (the rehearsal forces the GPU's settings into args)
        "cpu": {"env": {"CUDA_VISIBLE_DEVICES": "-1"}, "overrides": ["train.mixed_precision=no"]},
    }.items():
        out = tmp_path / name
        proc = run_module(
            "launch", "infer.submit", *args, f"submit.out_dir={out}", *extra.get("overrides", []),
            **extra.get("env", {}),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"on {DEVICE if name.startswith('gpu') else 'cpu'}" in proc.stdout, proc.stdout
        with open(out / "demo.csv", newline="") as fh:
            preds[name] = {row["image_id"]: row["category_id"] for row in csv.DictReader(fh)}
    n = len(preds["cpu"])
    same32 = sum(preds["gpu_fp32"][k] == v for k, v in preds["cpu"].items())
    same16 = sum(preds["gpu_bf16"][k] == v for k, v in preds["cpu"].items())
    # Stated agreement: float32 on the GPU (TF32 convolutions) predicts what the CPU predicts for every
    # image but at most one in 32; bf16 autocast for at least 90% of them.
    assert same32 >= n - max(1, n // 32) and same16 >= 0.9 * n, (same32, same16, n)


def test_export_from_a_gpu_trained_checkpoint(tiny_data, tmp_path):
    result, args = train_on_gpu(tiny_data, tmp_path / "runs", "train.epochs=1")
    model, info = load_model(Path(result["run_dir"]) / "best")
    assert next(model.parameters()).device.type == "cpu"  # the exported weights load anywhere
    proc = run_module("phase2.export", *args, f"export.path={tmp_path / 'export' / 'm'}", "export.formats=[onnx,zip]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    budget = json.loads((tmp_path / "export" / "m.budget.json").read_text())
    assert budget["files"]["zip"]["parity"]["max_abs_diff"] <= 1e-5


def test_evaluate_attacks_on_the_gpu(tiny_data, tmp_path):
    result, args = train_on_gpu(tiny_data, tmp_path / "runs", "train.epochs=1")
    proc = run_module(
        "launch", "robust.evaluate", *args, "eval.subset=16", "eval.batch_size=8",
        "eval.attacks=[pgd_linf,autoattack]", "eval.aa_version=custom", "eval.aa_iters=5", "eval.corruptions=[fog]",
        "eval.corruption_severities=[1]", "eval.eps_curve=[]",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"1 process(es) on {DEVICE}" in proc.stdout
