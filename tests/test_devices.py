"""The GPU path, tested on a CPU: the device defaults, and what each stage would do on a machine
with CUDA devices, faked by ``tests/fake_cuda/sitecustomize.py`` (torch reports N devices; each
process reports and ends where it would first touch one: building its Accelerator, or moving a
model to a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.checkpoint import export_model
from core.config import load_config
from core.devices import Devices, format_ids, resolve_channels_last, resolve_num_workers, resolve_precision
from core.model import create_classifier
from tests.conftest import ROOT, TINY_DATA, run_module, shrink
from train.setup import scale_for_batch

FAKE = ROOT / "tests" / "fake_cuda"


def fake_gpus(tmp_path: Path, devices: int, *args: str, stop: str = "accelerator", bf16: bool = True):
    """``python -m ARGS`` on a machine faked to have ``devices`` CUDA GPUs; returns (process, reports)."""
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}"
    report.mkdir()
    proc = run_module(
        *args,
        PYTHONPATH=f"{FAKE}:{ROOT}",
        FAKE_CUDA_DEVICES=str(devices),
        FAKE_CUDA_REPORT=str(report),
        FAKE_CUDA_STOP=stop,
        FAKE_CUDA_BF16="1" if bf16 else "0",
        CUDA_VISIBLE_DEVICES="",  # run_module: "" removes the variable (the suite hides real GPUs)
        timeout=300,
    )
    return proc, [json.loads(p.read_text()) for p in sorted(report.glob("*.json"))]


# --- the defaults ------------------------------------------------------------------------------


def test_auto_settings_follow_the_device():
    assert resolve_precision("auto", on_gpu=True, bf16=True) == "bf16"
    assert resolve_precision("auto", on_gpu=True, bf16=False) == "no"  # pre-Ampere: float32, not fp16's scaling
    assert resolve_precision("auto", on_gpu=False) == "no"
    assert resolve_precision("fp16", on_gpu=True, bf16=True) == "fp16"  # an explicit value is kept
    assert resolve_channels_last("auto", on_gpu=True) and not resolve_channels_last("auto", on_gpu=False)
    assert resolve_channels_last("true", on_gpu=False) and not resolve_channels_last("false", on_gpu=True)
    # loader workers: each GPU's share of the cores less one; the CPU keeps its measured 2
    assert resolve_num_workers(-1, on_gpu=True, local_processes=8, cores=64) == 7
    assert resolve_num_workers(-1, on_gpu=True, local_processes=8, cores=8) == 1
    assert resolve_num_workers(-1, on_gpu=False) == 2 and resolve_num_workers(5, on_gpu=True) == 5
    assert format_ids([0, 1, 2, 3]) == "0-3" and format_ids([2, 5]) == "2,5"
    assert Devices(cuda=0, cores=2).describe(None) == "the CPU (2 cores)"


@pytest.mark.parametrize("value,expected", [("true", "true"), ("on", "true"), ("False", "false"), ("auto", "auto")])
def test_channels_last_takes_yaml_booleans(value, expected):
    assert load_config(None, [f"model.channels_last={value}"]).model.channels_last == expected


def test_learning_rate_and_ema_follow_the_global_batch():
    # timm's rule: square root for adaptive optimizers (AdamW), linear otherwise; stated at base_batch_size
    t = load_config(None, ["train.lr=1e-3", "train.base_batch_size=64", "train.batch_size=64"]).train
    assert scale_for_batch(t, 1).lr == pytest.approx(1e-3)
    eight = scale_for_batch(t, 8)
    assert eight.global_batch == 512 and eight.lr == pytest.approx(1e-3 * 8**0.5)
    # the EMA averages over the same number of images: decay per step ** (512 / 64)
    assert eight.ema_decay == pytest.approx(t.ema_decay**8)
    assert "sqrt(512/64), sqrt rule" in eight.describe()
    sgd = load_config(None, ["train.opt=sgd", "train.lr=0.1", "train.grad_accum_steps=2"]).train
    assert scale_for_batch(sgd, 2).lr == pytest.approx(0.1 * 4)  # 64 x 2 processes x 2 steps = 4 x 64
    off = load_config(None, ["train.base_batch_size=0"]).train
    assert scale_for_batch(off, 8).lr == off.lr and scale_for_batch(off, 8).ema_decay == off.ema_decay


def test_a_run_trains_at_the_scaled_rate(tiny_config):
    from accelerate import Accelerator

    from train.setup import build_training

    cfg = tiny_config("train.base_batch_size=16", "train.warmup_epochs=0")
    training = build_training(cfg, Accelerator(cpu=True))
    assert training.scaling.lr == pytest.approx(cfg.train.lr)  # one process of 16: the stated batch
    assert training.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr)
    assert training.workers == 0 and not training.channels_last  # the CPU: as configured, NCHW


# --- a faked 8-GPU machine: what accelerate's launcher starts from the launcher ----------------------


@pytest.fixture
def tiny_overrides(tiny_data, tmp_path):
    return shrink([], tiny_data, tmp_path / "runs")


@pytest.mark.slow
@pytest.mark.parametrize(
    "module,flags,overrides,processes,precision",
    [
        ("train.main", [], [], 8, "bf16"),  # every GPU, bf16, with no flag at all
        ("train.main", ["--num_processes", "4"], [], 4, "bf16"),
        ("train.main", ["--num_processes", "2", "--mixed_precision", "fp16"], [], 2, "fp16"),
        ("train.main", ["--num_processes", "2"], ["train.mixed_precision=no"], 2, "no"),
        ("infer.submit", ["--num_processes", "2"], [], 2, "bf16"),
    ],
    ids=["train-all", "train-4", "train-fp16", "train-fp32", "submit-2"],
)
def test_a_faked_8_gpu_machine_starts_what_was_asked(
    tmp_path, tiny_overrides, module, flags, overrides, processes, precision
):
    proc, reports = fake_gpus(tmp_path, 8, "launch", module, *flags, *tiny_overrides, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = proc.stdout.splitlines()[0]
    assert f"as {processes} processes (DDP) on GPUs " in launched and "of 8 (Fake GPU); precision " in launched
    assert len(reports) == processes, reports
    assert sorted(r["local_rank"] for r in reports) == list(range(processes))
    for r in reports:  # each process: the whole world, its precision, no CPU fallback
        assert r["world_size"] == processes and not r["cpu"]
        assert r["mixed_precision"] == r["env_mixed_precision"] == precision
        assert r["cuda_visible_devices"] is None  # accelerate's launcher: process k uses GPU k


@pytest.mark.slow
def test_a_faked_gpu_without_bf16_trains_in_float32_and_one_gpu_runs_directly(tmp_path, tiny_overrides):
    proc, reports = fake_gpus(tmp_path, 1, "launch", "train.main", *tiny_overrides, bf16=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("launch: train as 1 process on GPU 0 of 1 (Fake GPU)")
    assert [(r["world_size"], r["mixed_precision"], r["cpu"]) for r in reports] == [(1, "no", False)]
    assert reports[0]["env_mixed_precision"] is None  # run directly: no accelerate launch in between


# --- every stage that runs a model puts it on the GPU ----------------------------------------------


@pytest.fixture
def checkpoints(tmp_path, tiny_data) -> dict:
    """Two random checkpoints of the tiny model (the run's ``best`` and another one) and overrides."""
    overrides = shrink(["eval.subset=8", "eval.batch_size=8"], tiny_data, tmp_path / "runs")
    cfg = load_config(None, overrides)
    paths = {}
    for i, stem in enumerate([tmp_path / "runs" / "demo" / "best", tmp_path / "other" / "best"]):
        torch.manual_seed(i)
        meta = {"arch": "test_convnext", "num_classes": TINY_DATA["num_classes"], "image_size": 32}
        export_model(create_classifier(cfg.model, cfg.data.num_classes), stem, meta)
        paths[i] = stem
    return {"overrides": overrides, "best": paths[0], "other": paths[1], "root": tmp_path}


def _testset(checkpoints) -> Path:
    """A small make-testset folder, made on the CPU (clean and corrupted images only)."""
    out = checkpoints["root"] / "testset"
    args = [*checkpoints["overrides"], f"testset.out_dir={out}", "testset.subset=8"]
    args += ["testset.transfer=0", "testset.stacked=0", "testset.clean=0.5", "testset.corruption=0.5"]
    proc = run_module("robust.testset", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _zip(checkpoints) -> Path:
    path = checkpoints["root"] / "export" / "model"
    proc = run_module("phase2.export", *checkpoints["overrides"], f"export.path={path}", "export.formats=[zip]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path.with_suffix(".zip")


STAGES = {
    "evaluate": lambda c: ["launch", "robust.evaluate"],
    "evaluate-file": lambda c: ["launch", "robust.evaluate", f"eval.file={_zip(c)}"],
    "make-testset": lambda c: [
        "robust.testset",
        f"testset.surrogates=[{c['other']}]",
        "testset.subset=8",
        f"testset.out_dir={c['root'] / 'made'}",
    ],  # fmt: skip
    "ablate": lambda c: [
        "robust.ablation",
        f"ablation.testset={_testset(c)}",
        "ablation.variants=[single]",
        f"ablation.standard=[{c['best']}]",
    ],  # fmt: skip
    "export": lambda c: ["phase2.export", f"export.path={c['root'] / 'exp' / 'model'}", "export.formats=[zip]"],
    "submit": lambda c: ["launch", "infer.submit"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_puts_its_models_on_the_gpu(tmp_path, checkpoints, stage):
    proc, reports = fake_gpus(tmp_path, 1, *STAGES[stage](checkpoints), *checkpoints["overrides"], stop="to")
    assert proc.returncode == 0 and reports, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [r["device"].split(":")[0] for r in reports] == ["cuda"]


def test_validation_loaders_start_few_workers_and_only_for_their_pass(tiny_config):
    """Issue 33: three persistent pools of ~15 workers per process (45 per GPU) became one for
    training; the validation loaders get a few, started per pass; batches reach the device by
    non-blocking copies."""
    from train.setup import build_training, create_accelerator

    cfg = tiny_config("data.num_workers=6", "train.adv.mode=fgsm_rs", "train.adv.val_images=8")
    training = build_training(cfg, create_accelerator(cfg))
    train_loader = training.train_loader
    assert train_loader.num_workers == 6 and train_loader.persistent_workers and training.workers == 6
    for loader in (training.val_loader, training.robust_loader):
        assert loader.num_workers == 4 and not loader.persistent_workers  # train.setup.EVAL_WORKERS
    assert train_loader._non_blocking and training.val_loader._non_blocking  # accelerate's copies to the device


def test_a_small_dev_shm_cuts_the_workers_with_one_line(tiny_config):
    from core.devices import fit_workers_to_shared_memory
    from train.setup import split_workers

    # The phase configs on a GPU host of 16 cores: 15 workers, batches of 64 x 224 px (9.2 MiB)
    phase = load_config(ROOT / "configs" / "cvpr22_phase1.yaml", ["aug.augmix.enabled=false"])
    roomy = split_workers(phase, 15, free_shm=64 * 2**30)
    assert (roomy.train, roomy.eval, roomy.warning) == (15, 4, "")
    docker = split_workers(phase, 15, free_shm=64 * 2**20)  # docker's default /dev/shm
    assert docker.train == 1 and docker.eval == 1
    assert "/dev/shm has 64 MB free, too little for 15 loader workers" in docker.warning
    assert "\n" not in docker.warning and "--shm-size" in docker.warning
    # eight processes share it: none of them may start a worker
    assert split_workers(phase, 15, local=8, free_shm=64 * 2**20).train == 0
    assert fit_workers_to_shared_memory(4, 2**20, None) == (4, "")  # nothing to measure: as configured


def test_the_warm_up_grows_with_the_global_batch():
    """Issue 33: 8 GPUs of the phase configs reached lr 2.8e-3 after one epoch, ~44 steps, from scratch."""
    from train.setup import create_model_and_optimizer

    cfg = load_config(ROOT / "configs" / "cvpr22_phase1.yaml", ["model.name=test_convnext", "model.pretrained=false"])
    eight = scale_for_batch(cfg.train, 8)
    assert eight.lr == pytest.approx(1e-3 * 8**0.5) and eight.warmup_epochs == pytest.approx(8**0.5)
    assert "warm-up 2.83 epochs" in eight.describe()
    steps = 44  # ~22,990 images / 512 a step
    _, optimizer, scheduler = create_model_and_optimizer(cfg, steps, eight.lr, False, eight.warmup_epochs)
    scheduler.step_update(num_updates=steps)
    # after one epoch the rate has climbed as far as one epoch at the base batch takes it: lr x 1/sqrt(8)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3, rel=0.01)
    assert scale_for_batch(cfg.train, 1).warmup_epochs == cfg.train.warmup_epochs  # the base batch: as stated
    sgd = load_config(None, ["train.opt=sgd", "train.warmup_epochs=5", "train.epochs=30"]).train
    assert scale_for_batch(sgd, 8).warmup_epochs == 15  # linear x 8 = 40 epochs: at most half the run
