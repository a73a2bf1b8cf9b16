"""What ``auto`` turns on for a GPU, run end to end on the CPU (issue 33: none of it had met a GPU).

One chain with every GPU setting: NHWC weights (``model.channels_last``), bf16 autocast
(``train.mixed_precision``: CPU autocast here) and loader worker processes whose batches reach the
device by non-blocking copies (pinned memory needs CUDA: the CPU runs the copies unpinned): train,
stopped mid-epoch (``train.max_steps``), continued with ``resume=auto``, ``submit``, ``export`` to
every format, and ``./run.sh evaluate eval.file=`` on the exported zip.

``model.compile=true`` is left out: on the shared 2-core machine its first training step took 601 s
(inductor compiling), against 16 s for the whole uncompiled 4-step run (tests/test_submit.py
compiles a model for prediction; tests/test_gpu.py trains compiled on a GPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.checkpoint import load_model
from core.config import load_config
from infer import submit
from phase2 import export
from tests.conftest import run_module, shrink
from train import main as train_main
from train.demo_data import generate_demo_data

GPU_SETTINGS = [
    "model.channels_last=true",
    "train.mixed_precision=bf16",
    "data.num_workers=2",
    "submit.num_workers=2",
]
# 4 steps an epoch (32 training images, batches of 8), 8 test images: every stage, little compute
SMALL = ["data.test_labels=test_labels.txt", "train.batch_size=8", "submit.batch_size=8", "train.checkpoint_every=1"]
# the smallest evaluation of a file that still attacks it (the file's score is not under test)
EVAL_SMALL = ["eval.subset=8", "eval.batch_size=8", "eval.attacks=[fgsm]", "phase2.draws=1", "phase2.attack.steps=[2]"]


@pytest.fixture
def fresh_accelerator_state():
    """bf16 here after another precision earlier in the same pytest process: accelerate refuses a
    second precision per process, so its singletons are reset around the test, as accelerate's own
    test case does (``accelerate.test_utils.testing.AccelerateTestCase.tearDown``)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.slow
def test_the_gpu_settings_train_resume_submit_export_and_evaluate(tmp_path, fresh_accelerator_state):
    start = time.perf_counter()
    data = tmp_path / "demo"
    generate_demo_data(data, num_classes=4, train_per_class=10, test_per_class=2, image_size=32)
    overrides = shrink([*GPU_SETTINGS, *SMALL], data, tmp_path / "runs")
    cfg = load_config(None, overrides)

    stopped = train_main.run(load_config(None, [*overrides, "train.max_steps=2"]))
    assert stopped["global_step"] == 2 and stopped["epochs"] == 0  # stopped mid-epoch, checkpoints written
    resumed = train_main.run(load_config(None, [*overrides, "resume=auto"]))
    assert resumed["epochs"] == 1 and resumed["global_step"] == 4
    assert 0.0 <= resumed["data_wait_frac"] < 1.0
    info = json.loads((cfg.run_dir / "best.json").read_text())
    assert info["config"]["model"]["channels_last"] == "true" and info["config"]["train"]["mixed_precision"] == "bf16"
    load_model(cfg.run_dir / "best")  # the exported weights load into a model of the standard layout

    predicted = submit.run(cfg)
    assert predicted["test_acc"] >= 0.0

    formats = ["export.formats=[zip,onnx,pt2]", f"export.path={tmp_path / 'export' / 'model'}"]
    paths = export.run(load_config(None, [*overrides, *formats]))["paths"]
    assert all(Path(paths[fmt]).is_file() for fmt in ("zip", "onnx", "pt2"))

    out = tmp_path / "eval"
    proc = run_module(
        "launch", "robust.evaluate", *overrides, *EVAL_SMALL, f"eval.file={paths['zip']}", f"eval.out_dir={out}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "eval_file.json").is_file() and (out / "eval_file.md").is_file()
    print(f"GPU-settings chain on the CPU: {time.perf_counter() - start:.0f} s")
