"""Adversarial training (``train.adv``): what each mode trains on, robust model selection, resume,
catastrophic-overfitting reports and the configurations that make no sense."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from attacks import lp_norm
from core.config import AdvConfig, ConfigError
from gcm import GradientConcealment
from tests.conftest import run_module, shrink, weight_difference
from train import main as train_main
from train.adversarial import adversarial_loss, eps_at, step_size_of
from train.engine import Progress
from train.setup import build_training, create_accelerator

EPS = 8 / 255


class Recorder(nn.Module):
    """A small convnet with drop-out that records, per forward, (training flag, batch size, input)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 4)
        )
        self.calls: list[tuple[bool, int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, x.shape[0], x.detach().clone()))
        return self.net(x)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))


def test_eps_ramps_up_and_steps_follow():
    adv = AdvConfig(mode="pgd", eps=EPS, steps=4, warmup_epochs=2.0)
    assert [eps_at(adv, e) for e in (0.0, 1.0, 2.0, 5.0)] == pytest.approx([0.0, EPS / 2, EPS, EPS])
    assert step_size_of(adv, EPS) == pytest.approx(2.5 * EPS / 4)
    assert step_size_of(adv, EPS / 2) == pytest.approx(2.5 * EPS / 8)  # the step scales with the ramp
    assert step_size_of(AdvConfig(mode="fgsm_rs", eps=EPS), EPS) == pytest.approx(1.25 * EPS)
    assert step_size_of(AdvConfig(mode="pgd", eps=EPS, step_size=0.01), EPS / 2) == pytest.approx(0.005)


@pytest.mark.parametrize(
    "mode, crafting, trained_batch",
    [("fgsm_reg", 1, 12), ("fgsm_rs", 1, 6), ("pgd", 3, 6), ("trades", 1 + 3, 12)],
)
def test_each_mode_crafts_in_eval_mode_and_trains_on_its_images(batch, mode, crafting, trained_batch):
    x, y = batch
    model = Recorder().train()
    adv = AdvConfig(mode=mode, eps=EPS, steps=3)
    loss = adversarial_loss(model, model, nn.CrossEntropyLoss(), x, y, adv, epoch=1.0)
    assert loss.requires_grad and torch.isfinite(loss)
    *attack_calls, (trained, size, inputs) = model.calls
    # Every attack forward ran in eval mode (no drop-out randomness); training ran in train mode.
    assert len(attack_calls) == crafting and not any(training for training, _, _ in attack_calls)
    assert trained and model.training and size == trained_batch
    adversarial = inputs[-6:]
    assert float(lp_norm(adversarial - x, "linf").max()) <= EPS + 1e-6
    assert float(lp_norm(adversarial - x, "linf").max()) > 0.5 * EPS  # the budget is used
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    if trained_batch == 12:  # clean and adversarial images in one forward
        assert torch.equal(inputs[:6], x)


def test_warm_up_start_and_mode_none_train_on_clean_images(batch):
    x, y = batch
    for adv in (AdvConfig(mode="none"), AdvConfig(mode="pgd", warmup_epochs=1.0)):
        model = Recorder().train()
        adversarial_loss(model, model, nn.CrossEntropyLoss(), x, y, adv, epoch=0.0)
        assert len(model.calls) == 1 and torch.equal(model.calls[0][2], x)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.adv.mode=pgd", "train.mixup=0.2"], "does not combine with train.mixup"),
        (["train.adv.mode=trades", "train.adv.steps=0"], "train.adv.steps"),
        (["train.adv.mode=pgd", "train.adv.eps=0"], "train.adv.eps"),
        (["train.adv.mode=fgsm_rs", "train.adv.eps=8"], "pixel units"),
        (["train.adv.mode=fgsm_reg", "train.adv.weight=1.5"], "train.adv.weight"),
        (["train.adv.mode=pgd", "train.adv.val_steps=0"], "train.adv.val_steps"),
        (["train.adv.mode=madry"], "train.adv.mode.*not one of"),
        (["train.select=loss"], "train.select"),
        (["train.select=robust"], "robust needs adversarial training"),
    ],
)
def test_meaningless_settings_are_config_errors(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_fgsm_reg_still_works_with_mixup(tiny_config):
    tiny_config("train.adv.mode=fgsm_reg", "train.mixup=0.2")  # the 2nd-place recipe: no error


ADV = ["train.adv.mode=pgd", "train.adv.steps=2", "train.adv.val_images=16", "train.adv.val_steps=2"]


def test_adversarial_run_selects_best_by_robust_accuracy(tiny_config):
    cfg = tiny_config(*ADV, "train.epochs=2")
    result = train_main.run(cfg)
    assert 0.0 <= result["val_robust_acc"] <= 100.0 and result["collapse_epoch"] == -1
    info = json.loads((cfg.run_dir / "best.json").read_text())
    assert info["selected_by"] == "robust" and 0.0 <= info["val_robust_acc"] <= 100.0
    assert info["adversarial_training"]["mode"] == "pgd" and info["stem"] == "patch"
    # best = the highest robust accuracy of any epoch, of the weights or of their EMA
    scores = [max(h["val_robust_acc"], h.get("val_ema_robust_acc", -1.0)) for h in _history(cfg)]
    assert len(scores) == 2 and result["best_acc"] == pytest.approx(max(scores))
    clean = tiny_config(*ADV, "train.epochs=1", "train.select=clean", "name=clean_select")
    train_main.run(clean)
    assert json.loads((clean.run_dir / "best.json").read_text())["selected_by"] == "clean"


def _history(cfg) -> list[dict]:
    (ckpt,) = sorted((cfg.run_dir / "checkpoints").iterdir())[-1:]
    return json.loads((ckpt / "train_state.json").read_text())["progress"]["history"]


def test_the_training_graph_has_no_gcm(tiny_config):
    cfg = tiny_config(*ADV)
    training = build_training(cfg, create_accelerator(cfg))
    assert not any(isinstance(m, GradientConcealment) for m in training.model.modules())
    assert training.robust_loader is not None and len(training.robust_loader.dataset) == 16


def test_resume_mid_epoch_equals_uninterrupted_with_pgd(tiny_config):
    # The attack's random starts come from the global RNG, which the checkpoint restores.
    common = [
        *ADV,
        "train.epochs=2",
        "train.checkpoint_every=3",
        "model.drop_path_rate=0.1",
        "train.adv.warmup_epochs=1",
    ]
    full = tiny_config(*common, "name=full")
    train_main.run(full)
    train_main.run(tiny_config(*common, "name=part", "train.max_steps=4"))
    part = tiny_config(*common, "name=part", "resume=auto")
    train_main.run(part)
    worst = weight_difference(full.run_dir, part.run_dir)
    assert worst < 1e-5, f"resumed adversarial training differs from the uninterrupted run by {worst}"


def test_trades_with_grad_accumulation_ema_and_bf16(tiny_data, tmp_path):
    # Its own process: accelerate fixes the precision of a process at its first Accelerator.
    overrides = shrink(
        [
            "train.adv.mode=trades",
            "train.adv.steps=2",
            "train.adv.val_images=8",
            "train.adv.val_steps=1",
            "train.grad_accum_steps=2",
            "train.mixed_precision=bf16",
            "train.ema=true",
            "train.max_steps=2",
        ],
        tiny_data,
        tmp_path / "runs",
    )
    proc = run_module("train.main", *overrides, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision bf16" in proc.stdout and "PGD-1 at 8/255" in proc.stdout
    state = json.loads(next((tmp_path / "runs" / "demo" / "checkpoints").glob("*/train_state.json")).read_text())
    assert state["progress"]["global_step"] == 2 and torch.isfinite(
        torch.tensor(state["progress"]["history"][-1]["train_loss"])
    )


def _stand_in(cfg):
    return SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True))


def test_catastrophic_overfitting_is_reported_and_best_keeps_the_earlier_weights(tiny_config, capsys):
    cfg = tiny_config(*ADV)
    training, progress = _stand_in(cfg), Progress()
    stats = {"loss": 1.0, "samples_per_s": 1.0, "data_wait_frac": 0.0}  # what train_one_epoch returns
    robust = [30.0, 42.0, 4.0, 2.0]  # fast adversarial training's failure: robust accuracy falls to ~0
    clean = [60.0, 70.0, 85.0, 88.0]  # while clean accuracy keeps rising
    improved = [
        train_main.record_epoch(training, progress, e, stats, {"acc": c, "loss": 1.0, "n": 10, "robust_acc": r})
        for e, (c, r) in enumerate(zip(clean, robust))
    ]
    assert improved == [True, True, False, False] and progress.best_acc == 42.0
    assert progress.collapse_epoch == 2
    out = capsys.readouterr().out
    assert out.count("WARNING: catastrophic overfitting") == 2 and "4.0% from 42.0%" in out


@pytest.mark.slow
def test_two_cpu_processes_each_attack_their_own_batch(tiny_data, tmp_path):
    overrides = shrink(
        [
            "name=ddp_adv",
            "train.epochs=1",
            "train.adv.mode=fgsm_rs",
            "train.adv.val_images=16",
            "train.adv.val_steps=2",
        ],
        tiny_data,
        tmp_path / "runs",
    )
    proc = run_module("launch", "train.main", "--num_processes", "2", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es)") == 1 and proc.stdout.count("PGD-2 at 8/255") == 1, proc.stdout
    info = json.loads((tmp_path / "runs" / "ddp_adv" / "best.json").read_text())
    assert info["selected_by"] == "robust" and info["val_n"] == 32


def test_an_eps_ramp_longer_than_the_run_warns(tiny_config, capsys):
    # "eps ramped over 5 epochs" printed without a word in a 2-epoch run, which never reached its eps.
    train_main.run(tiny_config(*ADV, "train.epochs=2", "train.adv.warmup_epochs=5", "train.max_steps=1"))
    assert (
        "WARNING: train.adv.warmup_epochs=5 is longer than train.epochs=2: eps only reaches 3.2/255 of 8/255 by "
        "the end; lower train.adv.warmup_epochs"
    ) in capsys.readouterr().out.splitlines()
