"""Heavy imports happen only where used: each entry point runs in a fresh interpreter, which
reports at exit which of the heavy libraries it imported.

torch (seconds) never for ``train --help`` and ``validate``; wandb only when tracking is on;
albumentations only where images are augmented (training, not submit's resize); matplotlib
only when plotting.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest

from core.checkpoint import export_model
from core.config import AugConfig, load_config
from core.labels import list_test_images
from core.model import create_classifier
from core.transforms import create_train_transform
from tests.conftest import ROOT, TINY_DATA, run_module, shrink

HEAVY = ("torch", "albumentations", "wandb", "matplotlib", "timm")

# Runs MODULE as `python -m MODULE ARGS` does and, at exit (also after SystemExit), writes the
# heavy libraries it imported to the file named by the first argument.
PROBE = f"""
import atexit, json, runpy, sys
out, module = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(out, "w").write(json.dumps([m for m in {HEAVY!r} if m in sys.modules])))
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_code(tmp_path: Path, code: str, *args: str, **env: str):
    """``code`` as a module of its own in a fresh interpreter (``run_module``'s environment)."""
    (tmp_path / "probe_module.py").write_text(code, encoding="utf-8")
    return run_module("probe_module", *args, PYTHONPATH=f"{ROOT}:{tmp_path}", **env)


def imported_by(tmp_path: Path, module: str, *args: str, **env: str):
    """``python -m MODULE ARGS`` in a fresh interpreter: (heavy libraries it imported, the process)."""
    out = tmp_path / "imported.json"
    proc = run_code(tmp_path, PROBE, str(out), module, *args, **env)
    assert out.is_file(), proc.stderr[-2000:]
    return set(json.loads(out.read_text())), proc


def test_help_imports_nothing_heavy(tmp_path):
    imported, proc = imported_by(tmp_path, "launch", "train.main", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ./run.sh train")
    assert imported == set()


def test_validate_with_a_config_imports_nothing_heavy(tiny_data, tmp_path):
    # --config makes validate load (and check) the whole config: still no torch.
    csv_file = tmp_path / "sub.csv"
    with open(csv_file, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "category_id"])
        writer.writerows([image_id, 0] for _, image_id in list_test_images(tiny_data / "test"))
    args = (str(csv_file), "--test-dir", str(tiny_data / "test"), "--config", "configs/default.yaml")
    imported, proc = imported_by(tmp_path, "infer.validate", *args)
    assert proc.returncode == 0 and ": OK (" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert imported == set()


@pytest.fixture
def random_checkpoint(tmp_path) -> Path:
    cfg = load_config(None, ["model.name=test_convnext", f"data.num_classes={TINY_DATA['num_classes']}"])
    stem = tmp_path / "runs" / "demo" / "best"
    meta = {"arch": "test_convnext", "num_classes": TINY_DATA["num_classes"], "image_size": 32}
    export_model(create_classifier(cfg.model, TINY_DATA["num_classes"]), stem, meta)
    return stem


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["disabled", "offline"])
def test_submit_imports_wandb_only_when_tracking_and_never_albumentations(tiny_data, tmp_path, random_checkpoint, mode):
    overrides = shrink([f"wandb.mode={mode}", f"submit.out_dir={tmp_path / 'subs'}"], tiny_data, tmp_path / "runs")
    imported, proc = imported_by(tmp_path, "infer.submit", *overrides, WANDB_MODE="")
    assert proc.returncode == 0 and (tmp_path / "subs" / "demo.csv").is_file(), proc.stderr[-2000:]
    expected = {"torch", "timm"} | ({"wandb"} if mode == "offline" else set())
    assert imported == expected
    if mode == "offline":
        assert list((tmp_path / "runs" / "demo" / "wandb").glob("offline-run-*")), "no offline W&B run written"


@pytest.mark.slow
def test_training_imports_albumentations_but_not_wandb_when_tracking_is_off(tiny_data, tmp_path):
    overrides = shrink(["train.max_steps=1"], tiny_data, tmp_path / "runs")
    imported, proc = imported_by(tmp_path, "train.main", *overrides)
    assert proc.returncode == 0 and "stopped by train.max_steps=1" in proc.stdout, proc.stderr[-2000:]
    assert imported == {"torch", "timm", "albumentations"}


def test_the_training_pipeline_still_pickles(tmp_path):
    # albumentations is imported on first use, so SeededCompose is made then; spawned loader
    # workers unpickle it by name in an interpreter that has not made it yet.
    path = tmp_path / "transform.pkl"
    path.write_bytes(pickle.dumps(create_train_transform(AugConfig(), 32)))
    code = (
        "import pickle, sys, numpy as np; t = pickle.load(open(sys.argv[1], 'rb')); t.set_random_seed(0); "
        "print(type(t).__module__, type(t).__name__, t(image=np.zeros((40, 48, 3), np.uint8))['image'].shape)"
    )
    proc = run_code(tmp_path, code, str(path))
    assert proc.stdout.split() == ["core.transforms", "SeededCompose", "(32,", "32,", "3)"], proc.stderr[-2000:]
