"""AugMix (aug.augmix): timm's ops without the ImageNet-C overlaps, seeded views per sample, the JSD
consistency loss with the adversarial modes, grad accumulation, EMA, resume and 2 processes."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data.auto_augment import _AUGMIX_TRANSFORMS
from timm.loss import JsdCrossEntropy
from torch import nn

from attacks import lp_norm
from core.config import AUGMIX_OPS, AugConfig, AugMixConfig, ConfigError
from core.datasets import ImageDataset
from core.errors import UserError
from core.transforms import AugMixViews, augmix_hparams, create_train_transform
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
        (["aug.augmix.device=true"], "'aug.augmix.device=true' needs aug.augmix.enabled=true"),
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
        cfg = tiny_config(*overrides)
        create_train_transform(cfg.aug, cfg.data.image_size)  # train's first step: the ops are checked there
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


# ---------------------------------------------------------------- AugMix on the device (aug.augmix.device)

DEVICE = ["aug.augmix.enabled=true", "aug.augmix.device=true"]
DRAWN = 4000  # images per path in the distribution test: ~24,000 ops, ~2,700 per op


def _timm_draws(cfg: AugMixConfig, n: int, seed: int, monkeypatch) -> dict:
    """Run timm's AugMixAugment (the CPU path's object) on n tiny images, recording what it draws."""
    import timm.data.auto_augment as aa

    augmix = create_train_transform(AugConfig(augmix=cfg), SIZE).augmix
    record = {"ops": [], "args": [], "depth": [], "weights": [], "mix": [], "resample": []}
    for op in augmix.ops:
        fn = op.aug_fn

        def recorded(img, *args, _name=op.name, _fn=fn, **kwargs):
            record["ops"].append(_name)
            record["args"].append((_name, args))
            return _fn(img, *args, **kwargs)

        op.aug_fn = recorded
    choice, interpolation, basic = np.random.choice, aa._interpolation, augmix._apply_basic

    def choose(ops, depth, replace):
        record["depth"].append(depth)
        return choice(ops, depth, replace=replace)

    def interpolate(kwargs):
        chosen = interpolation(kwargs)
        record["resample"].append(chosen == Image.Resampling.BICUBIC)
        return chosen

    def apply_basic(img, weights, m):
        record["weights"].append(np.asarray(weights, dtype=np.float64))
        record["mix"].append(float(m))
        return basic(img, weights, m)

    monkeypatch.setattr(np.random, "choice", choose)
    monkeypatch.setattr(aa, "_interpolation", interpolate)
    augmix._apply_basic = apply_basic
    np.random.seed(seed)
    random.seed(seed)
    image = Image.fromarray(_image()[:8, :8])
    for _ in range(n):
        augmix(image)
    monkeypatch.undo()
    return record


def _device_draws(cfg: AugMixConfig, n: int, seed: int) -> dict:
    """The same statistics from the device path's draws (what augmix() applies)."""
    from train.device_augmix import draw_augmix

    d = draw_augmix(n, cfg, torch.Generator().manual_seed(seed))
    steps = torch.arange(d.ops.shape[2]).view(1, 1, -1)
    active = steps < d.depth.unsqueeze(2)  # the steps each chain takes
    ops = d.ops[active]
    geometric = torch.tensor([cfg.ops[i] in GEOMETRIC for i in range(len(cfg.ops))])[d.ops] & active
    return {
        "ops": [cfg.ops[i] for i in ops.tolist()],
        "level": d.level[active],
        "sign": d.sign[active],
        "op_index": ops,
        "depth": d.depth.flatten().tolist(),
        "weights": d.weights.double().numpy(),
        "mix": d.mix.double().numpy(),
        "resample": d.bicubic[geometric].tolist(),
    }


GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY"}


def _close(a: np.ndarray, b: np.ndarray, what: str, sigmas: float = 5.0) -> float:
    """Means of two samples agree within ``sigmas`` standard errors of their difference; returns the margin."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= sigmas * se, (
        f"{what}: {a.mean():.4f} vs {b.mean():.4f} (5 se = {sigmas * se:.4f})"
    )
    return sigmas * se


def _device_args(cfg: AugMixConfig, dev: dict, name: str) -> np.ndarray:
    """The first argument timm's op would get, from the device draws of op ``name`` (as augmix() computes it)."""
    from train.device_augmix import OpParams, _posterize_bits, _signed, _solarize_threshold

    k = cfg.ops.index(name)
    chosen = dev["op_index"] == k
    p = OpParams(dev["level"][chosen], dev["sign"][chosen], None, None, augmix_hparams(SIZE))
    if name == "Rotate":
        return _signed(p, 30.0).numpy()
    if name in ("ShearX", "ShearY"):
        return _signed(p, 0.3).numpy()
    if name in ("TranslateXRel", "TranslateYRel"):
        return _signed(p, 0.3).numpy()
    if name == "PosterizeIncreasing":
        return _posterize_bits(p, "increasing").numpy()
    if name == "SolarizeIncreasing":
        return _solarize_threshold(p, True).numpy()
    raise KeyError(name)


def test_device_augmix_draws_the_distribution_of_timms(monkeypatch):
    # The same seed for both paths; every statistic agrees within 5 standard errors of the difference
    # (about 24,000 ops a side: the op-frequency margin is ~0.013 against 1/9 per op).
    cfg = AugMixConfig(enabled=True)
    cpu, dev = _timm_draws(cfg, DRAWN, 0, monkeypatch), _device_draws(cfg, DRAWN, 0)
    assert len(cpu["weights"]) == DRAWN and len(cpu["depth"]) == DRAWN * cfg.width
    margins = {}
    for name in cfg.ops:  # which op each step applies: uniform over aug.augmix.ops
        margins[name] = _close(np.array(cpu["ops"]) == name, np.array(dev["ops"]) == name, f"share of {name}")
    for depth in (1, 2, 3):  # chain depth: 1..3 uniformly
        _close(np.array(cpu["depth"]) == depth, np.array(dev["depth"]) == depth, f"chains of depth {depth}")
    weights_cpu, weights_dev = np.stack(cpu["weights"]), dev["weights"]
    for chain in range(cfg.width):  # Dirichlet(1, 1, 1): the mean, the second moment, a tail
        _close(weights_cpu[:, chain], weights_dev[:, chain], f"weight of chain {chain}")
        _close(weights_cpu[:, chain] ** 2, weights_dev[:, chain] ** 2, f"squared weight of chain {chain}")
        _close(weights_cpu[:, chain] > 0.8, weights_dev[:, chain] > 0.8, f"weight of chain {chain} > 0.8")
    _close(np.array(cpu["mix"]), dev["mix"], "Beta mix")
    _close(np.array(cpu["mix"]) ** 2, dev["mix"] ** 2, "Beta mix squared")
    _close(np.array(cpu["resample"]), np.array(dev["resample"]), "bicubic share of geometric ops")
    for name in ("Rotate", "ShearX", "TranslateXRel", "PosterizeIncreasing", "SolarizeIncreasing"):
        cpu_args = np.array([args[0] for op, args in cpu["args"] if op == name], dtype=np.float64)
        dev_args = _device_args(cfg, dev, name)
        _close(cpu_args, dev_args, f"{name} argument")
        _close(np.abs(cpu_args), np.abs(dev_args), f"{name} |argument|")
        _close(cpu_args < 0, dev_args < 0, f"{name} negative")
    assert max(margins.values()) < 0.02  # the test can see a 2-point shift in any op's share


def test_device_augmix_is_seeded_in_range_and_keeps_channels_last(tiny_config):
    from train.batch_augment import create_batch_augment

    cfg = tiny_config(*DEVICE)
    make = lambda: create_batch_augment(cfg.aug, 0, augmix_on_device=True, image_size=SIZE)  # noqa: E731
    x = (torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    x = x.contiguous(memory_format=torch.channels_last)
    state = torch.get_rng_state()
    a, paired = make().views(x, epoch=1, batch=2)
    b, _ = make().views(x, epoch=1, batch=2)
    c, _ = make().views(x, epoch=1, batch=3)
    assert paired is None and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator (the attacks') untouched
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal((a * 255).round(), a * 255)  # uint8 levels, as timm's PIL output
    changed = (a - x).flatten(1).abs().amax(1) > 0
    assert int(changed.sum()) >= 5  # AugMix reached (almost) every image
    jsd = create_batch_augment(
        tiny_config(*DEVICE, "aug.augmix.jsd_weight=12").aug, 0, augmix_on_device=True, image_size=SIZE
    )
    views, _ = jsd.views(x, epoch=1, batch=2)
    assert views.shape == (6, 3, 3, SIZE, SIZE) and torch.equal(views[:, 0], x)
    assert not torch.equal(views[:, 1], views[:, 2])


@pytest.mark.parametrize(
    "name",
    list(AUGMIX_OPS)
    + [
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
        "Invert",
        "SolarizeAdd",
        "GaussianBlur",
    ],
)
def test_each_device_op_does_what_timms_pil_op_does(name, monkeypatch):
    # One op at a known level on a smooth image: the tensor op against timm's PIL op with the same
    # argument (bilinear, no negation); mean difference under 2 of 255 levels.
    import timm.data.auto_augment as aa

    from train.device_augmix import DEVICE_AUGMIX_OPS, OpParams

    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([xx * 7, yy * 5 + 20, (xx + yy) * 3 + 40], -1).clip(0, 255).astype(np.uint8)
    level, hparams = 2.5, augmix_hparams(SIZE)
    monkeypatch.setattr(random, "random", lambda: 0.0)  # timm's _randomly_negate: no negation
    args = aa.LEVEL_TO_ARG[name](level, hparams) if aa.LEVEL_TO_ARG[name] else ()
    want = np.asarray(
        aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=(128,) * 3, resample=Image.Resampling.BILINEAR),
        dtype=np.float64,
    )
    p = OpParams(torch.tensor([level]), torch.tensor([1.0]), torch.tensor([False]), torch.tensor([0.5]), hparams)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    got = DEVICE_AUGMIX_OPS[name](x, p).clamp(0, 255).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).mean() < 2.0, f"{name}: mean difference {np.abs(got - want).mean():.2f} levels"
    assert np.abs(got - image).mean() > 0 or np.abs(want - image).mean() == 0


def test_training_with_device_augmix_runs_and_the_loader_ships_the_plain_image(tiny_config):
    cfg = tiny_config(*DEVICE, "train.max_steps=2", "name=device_augmix")
    training = build_training(cfg, create_accelerator(cfg))
    assert training.batch_augment is not None and training.batch_augment.augmix is not None
    assert not isinstance(training.train_loader.dataset.dataset.transform, AugMixViews)  # AugMix left the loader
    result = train_main.run(cfg)
    assert result["global_step"] == 2 and math.isfinite(result["val_acc"])
    plain = tiny_config("train.max_steps=2", "name=plain")
    train_main.run(plain)
    a, b = (load_file(str(c.run_dir / "last.safetensors")) for c in (plain, cfg))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4  # the device AugMix reached the model
    jsd = tiny_config(*DEVICE, *AUGMIX_PGD, "train.max_steps=1", "name=device_jsd")  # three views, PGD on the clean one
    assert train_main.run(jsd)["global_step"] == 1
    cpu = tiny_config("aug.augmix.enabled=true", "name=cpu_augmix")  # auto on a CPU: the loader's PIL AugMix
    assert isinstance(build_training(cpu, create_accelerator(cpu)).train_loader.dataset.dataset.transform, AugMixViews)
