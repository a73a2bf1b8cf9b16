"""AugMix (aug.augmix): timm's ops without the ImageNet-C overlaps, seeded views per sample, the JSD
consistency loss with the adversarial modes, grad accumulation, EMA, resume and 2 processes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import _AUGMIX_TRANSFORMS
from timm.loss import JsdCrossEntropy
from torch import nn

from attacks import lp_norm
from core.config import AUGMIX_OPS, AugConfig, AugMixConfig, ConfigError
from core.datasets import ImageDataset
from core.errors import UserError
from core.transforms import AugMixViews, create_train_transform
from tests.conftest import run_module, shrink, weight_difference
from tests.test_adversarial import EPS, Recorder
from train import main as train_main
from train.adversarial import adversarial_loss
from train.loaders import create_train_loader
from train.setup import build_training, create_accelerator

SIZE = 32
JSD = ["aug.augmix.enabled=true", "aug.augmix.jsd_weight=12"]


def test_default_ops_are_timms_without_the_imagenet_c_overlaps():
    left_out = set(_AUGMIX_TRANSFORMS) - set(AUGMIX_OPS)
    assert left_out == {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
    assert set(AUGMIX_OPS) < set(_AUGMIX_TRANSFORMS)
    transform = create_train_transform(AugConfig(augmix=AugMixConfig(enabled=True)), SIZE)
    assert [op.name for op in transform.augmix.ops] == list(AUGMIX_OPS)
    assert isinstance(transform, AugMixViews) and not transform.clean


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def test_views_are_seeded_per_sample_and_leave_global_generators_alone():
    transform = create_train_transform(AugConfig(augmix=AugMixConfig(enabled=True, jsd_weight=12.0)), SIZE)
    image = _image()
    np_state, py_state = np.random.get_state(), random.getstate()
    outs = []
    for seed in (3, 3, 4):
        transform.set_random_seed(seed)
        outs.append(transform(image=image)["image"])
    assert outs[0].shape == (3, SIZE, SIZE, 3) and outs[0].dtype == np.uint8
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0][1:], outs[2][1:])
    assert not np.array_equal(outs[0][1], outs[0][2])  # two different AugMix views of one image
    transform.pipeline.set_random_seed(3)  # the clean view is the albumentations pipeline's output
    assert np.array_equal(outs[0][0], transform.pipeline(image=image)["image"])
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state[1])


def test_loader_yields_three_views_the_same_whatever_the_workers(tmp_path):
    path = tmp_path / "0.png"
    Image.fromarray(_image(1)).save(path)
    dataset = ImageDataset(
        [(path, 0)] * 6, create_train_transform(AugConfig(augmix=AugMixConfig(enabled=True, jsd_weight=1.0)), SIZE)
    )
    batches = {}
    for workers in (0, 2):
        loader = create_train_loader(dataset, batch_size=3, seed=7, num_workers=workers)
        batches[workers] = torch.cat([images for images, _ in loader])
    assert batches[0].shape == (6, 3, 3, SIZE, SIZE) and batches[0].dtype == torch.uint8
    assert torch.equal(batches[0], batches[2])
    assert len({bytes(v.numpy()) for v in batches[0][:, 1]}) == 6  # every sample its own AugMix


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["aug.augmix.jsd_weight=12"], "jsd_weight' needs aug.augmix.enabled=true"),
        ([*JSD, "train.mixup=0.2"], "does not combine with train.mixup"),
        ([*JSD, "train.adv.mode=trades"], "does not combine with train.adv.mode=trades"),
        ([*JSD, "train.adv.mode=fgsm_reg"], "does not combine with train.adv.mode=fgsm_reg"),
        (["aug.augmix.enabled=true", "aug.augmix.ops=[Rotate,Blur]"], "'Blur' is not a timm AugMix op"),
        (["aug.augmix.enabled=true", "aug.augmix.severity=0"], "aug.augmix.severity"),
        (["aug.augmix.enabled=true", "aug.augmix.depth=0"], "'depth'"),
        (["aug.augmix.enabled=true", "aug.augmix.jsd_weight=-1"], "jsd_weight"),
    ],
)
def test_meaningless_augmix_settings_are_one_line_errors(tiny_config, overrides, message):
    with pytest.raises((ConfigError, UserError), match=message) as info:
        tiny_config(*overrides)
    assert "\n" not in str(info.value)


def test_augmix_without_jsd_combines_with_mixup_and_every_adversarial_mode(tiny_config):
    for mode in ("fgsm_reg", "trades", "pgd"):
        tiny_config("aug.augmix.enabled=true", f"train.adv.mode={mode}")
    tiny_config("aug.augmix.enabled=true", "train.mixup=0.2")


@pytest.mark.parametrize("mode, crafting", [("none", 0), ("fgsm_rs", 1), ("pgd", 3)])
def test_consistency_loss_attacks_the_clean_view_and_trains_on_all_three(mode, crafting):
    torch.manual_seed(0)
    views = torch.rand(4, 3, 3, 16, 16)
    y = torch.randint(0, 4, (4,))
    model = Recorder().train()
    jsd = JsdCrossEntropy(num_splits=3, alpha=12.0, smoothing=0.0)
    from core.config import AdvConfig

    loss = adversarial_loss(model, model, jsd, views, y, AdvConfig(mode=mode, eps=EPS, steps=3), epoch=1.0)
    assert loss.requires_grad and torch.isfinite(loss)
    *attack_calls, (trained, size, inputs) = model.calls
    assert len(attack_calls) == crafting and not any(training for training, _, _ in attack_calls)
    assert trained and size == 12
    assert torch.equal(inputs[4:8], views[:, 1]) and torch.equal(inputs[8:], views[:, 2])  # AugMix views as made
    first = inputs[:4]
    if mode == "none":
        assert torch.equal(first, views[:, 0])
    else:
        assert EPS * 0.5 < float(lp_norm(first - views[:, 0], "linf").max()) <= EPS + 1e-6
    # the loss is timm's: cross-entropy on the first view + 12 x the Jensen-Shannon term
    with torch.no_grad():
        model.eval()
        logits = torch.cat([model.net(v) for v in (first, views[:, 1], views[:, 2])])
    assert float(jsd(logits, y)) > float(nn.functional.cross_entropy(logits[:4], y)) - 1e-6


AUGMIX_PGD = [
    *JSD,
    "train.adv.mode=pgd",
    "train.adv.steps=1",
    "train.adv.val_images=8",
    "train.adv.val_steps=1",
]


def test_jsd_with_pgd_grad_accumulation_and_ema_trains_and_resumes_exactly(tiny_config):
    common = [*AUGMIX_PGD, "train.epochs=2", "train.checkpoint_every=3", "train.grad_accum_steps=2", "train.ema=true"]
    full = tiny_config(*common, "name=full")
    training = build_training(full, create_accelerator(full))
    assert isinstance(training.loss_fn, JsdCrossEntropy) and training.loss_fn.alpha == 12.0
    result = train_main.run(full)
    assert result["global_step"] == 8 and torch.isfinite(torch.tensor(result["val_robust_acc"]))
    assert (full.run_dir / "augmented_samples.png").stat().st_size > 0
    train_main.run(tiny_config(*common, "name=part", "train.max_steps=3"))
    train_main.run(tiny_config(*common, "name=part", "resume=auto"))
    worst = weight_difference(full.run_dir, tiny_config(*common, "name=part").run_dir)
    assert worst < 1e-5, f"resumed AugMix training differs from the uninterrupted run by {worst}"


@pytest.mark.slow
def test_two_cpu_processes_with_jsd_and_pgd(tiny_data, tmp_path):
    overrides = shrink(["name=ddp_augmix", "train.epochs=1", *AUGMIX_PGD], tiny_data, tmp_path / "runs")
    proc = run_module("launch", "train.main", "--num_processes", "2", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es)") == 1, proc.stdout
    info = json.loads((tmp_path / "runs" / "ddp_augmix" / "best.json").read_text())
    # 128 training images, batch 16 per process, 2 processes -> 4 optimizer steps
    assert info["global_step"] == 4 and info["config"]["aug"]["augmix"]["jsd_weight"] == 12.0


def test_the_demo_config_is_robust_yaml_plus_augmix():
    from core.config import DEFAULT_CONFIG, config_to_dict, load_config

    configs = DEFAULT_CONFIG.parent
    robust, augmix = (config_to_dict(load_config(configs / f"{n}.yaml")) for n in ("robust", "robust_augmix"))
    assert augmix["aug"]["augmix"]["enabled"] and augmix["aug"]["augmix"]["jsd_weight"] == 0.0
    assert augmix["train"]["adv"] == robust["train"]["adv"] and augmix["eval"] == robust["eval"]
    assert augmix["data"] == robust["data"] and augmix["model"] == robust["model"]
