"""Distillation of an ensemble (``train.distill``, train/distill.py): RSLAD's loss on the teachers'
averaged soft labels, frozen teachers, one-line errors for teachers that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import export_model, load_model
from core.config import ConfigError
from core.errors import UserError
from core.model import create_classifier
from phase2 import export
from train import main as train_main
from train.distill import Teachers, distill_loss
from train.engine import Progress, train_step
from train.setup import build_training, create_accelerator

ADV = ["train.adv.mode=pgd", "train.adv.steps=2", "train.adv.val_images=8", "train.adv.val_steps=1"]


@pytest.fixture
def teacher(tiny_config, tmp_path):
    """An exported tiny teacher (its weights as initialised: what is tested does not depend on them)."""
    cfg = tiny_config()
    stem = tmp_path / "teacher"
    export_model(
        create_classifier(cfg.model, cfg.data.num_classes),
        stem,
        {"arch": "test_convnext", "num_classes": 4, "image_size": 32},
    )
    return stem


def _linear(weight: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model[1].weight.data.copy_(weight)
    return model


def test_rslad_loss_is_kl_to_the_teachers_mean_on_clean_and_attacked_inputs(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config("train.distill.teachers=[a]", "train.adv.mode=none")
    x, y = torch.rand(6, 3, 2, 2), torch.randint(0, 4, (6,))
    student = _linear(torch.randn(4, 12))
    a, b = _linear(torch.randn(4, 12)), _linear(torch.randn(4, 12))
    teachers = Teachers([a, b], temperature=1.0)
    mean = (F.softmax(a(x), 1) + F.softmax(b(x), 1)) / 2
    expected = F.kl_div(F.log_softmax(student(x), 1), mean, reduction="batchmean")
    loss = distill_loss(student, student, nn.CrossEntropyLoss(), teachers, x, y, cfg, epoch=0.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a student that is the teachers' only member has nothing to learn on clean inputs
    alone = distill_loss(a, a, nn.CrossEntropyLoss(), Teachers([a], 1.0), x, y, cfg, epoch=0.0)
    assert alone.item() == pytest.approx(0.0, abs=1e-6)
    # under adversarial training the attacked term (5/6) makes it positive: the attack moved away from the label
    cfg_adv = tiny_config("train.distill.teachers=[a]", *ADV)
    attacked = distill_loss(a, a, nn.CrossEntropyLoss(), Teachers([a], 1.0), x, y, cfg_adv, epoch=1.0)
    assert attacked.item() > 1e-4
    # weight 0: the label loss alone
    cfg_w0 = tiny_config("train.distill.teachers=[a]", "train.adv.mode=none", "train.distill.weight=0")
    label = distill_loss(student, student, nn.CrossEntropyLoss(), teachers, x, y, cfg_w0, epoch=0.0)
    assert label.item() == pytest.approx(F.cross_entropy(student(x), y).item(), rel=1e-5)


def test_teachers_are_frozen_and_never_trained(tiny_config, teacher):
    cfg = tiny_config("name=student", f"train.distill.teachers=[{teacher},{teacher}]", *ADV)
    training = build_training(cfg, create_accelerator(cfg))
    teachers = training.teachers
    assert teachers is not None and len(teachers.models) == 2
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in teachers.models)
    assert all(next(m.parameters()).device == training.accelerator.device for m in teachers.models)
    before = [p.clone() for p in teachers.models[0].parameters()]
    student_before = [p.detach().clone() for p in training.model.parameters()]
    images, targets = next(iter(training.train_loader))
    raw = training.accelerator.unwrap_model(training.model)
    train_step(training, raw, images.float() / 255, targets, Progress(global_step=100), epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(before, teachers.models[0].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, training.model.parameters()))


@pytest.mark.slow
def test_distilled_student_is_an_ordinary_checkpoint(tiny_config, teacher, tmp_path):
    cfg = tiny_config("name=student", f"train.distill.teachers=[{teacher}]", "train.distill.temperature=2", *ADV)
    result = train_main.run(cfg)
    assert 0.0 <= result["best_acc"] <= 100.0
    model, info = load_model(cfg.run_dir / "best")
    assert info["config"]["train"]["distill"]["teachers"] == [str(teacher)]
    assert json.loads((cfg.run_dir / "best.json").read_text())["arch"] == "test_convnext"
    # the student alone goes through the Phase II budget check, as an enforced error would stop it
    budget = export.run(
        tiny_config(
            f"submit.checkpoints=[{cfg.run_dir / 'best'}]",
            "budget.enforce=true",
            f"export.path={tmp_path / 'student.pt2'}",
            "export.formats=[pt2]",
        )
    )
    assert json.loads(open(budget["budget_path"]).read())["within_budget"]


def test_teacher_of_another_class_count_is_one_line(tiny_config, tmp_path):
    cfg = tiny_config("model.name=test_convnext")
    other = create_classifier(cfg.model, 3)
    export_model(other, tmp_path / "three", {"arch": "test_convnext", "num_classes": 3, "image_size": 32})
    bad = tiny_config("name=student", f"train.distill.teachers=[{tmp_path / 'three'}]")
    with pytest.raises(
        UserError, match=r"^train\.distill\.teachers: .*three predicts 3 classes, data.num_classes is 4$"
    ):
        build_training(bad, create_accelerator(bad))
    missing = tiny_config("name=student2", f"train.distill.teachers=[{tmp_path / 'nowhere'}]")
    with pytest.raises(UserError, match=r"^train\.distill\.teachers: .*nowhere"):
        build_training(missing, create_accelerator(missing))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.adv.mode=trades"], "train.adv.mode=trades has an attack of its own"),
        (["aug.augmix.enabled=true", "aug.augmix.jsd_weight=12"], "consistency loss"),
    ],
)
def test_what_distillation_cannot_combine_with_is_a_config_error(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=f"train.distill.teachers.*{message}"):
        tiny_config("train.distill.teachers=[x]", *overrides)
