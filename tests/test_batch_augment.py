"""Device augmentations (aug.prime, aug.fourier), the two-view loss (aug.views=2, train.adv.consistency):
what each primitive does, seeding, the attacked views, the config errors, and training that resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from attacks import lp_norm
from core.config import AdvConfig, AugConfig, ConfigError, FourierConfig, PrimeConfig
from tests.conftest import run_module, shrink, weight_difference
from tests.test_adversarial import EPS, Recorder
from train import main as train_main
from train.adversarial import adversarial_loss, js_divergence
from train.batch_augment import (
    PRIMITIVES,
    BatchAugment,
    create_batch_augment,
    fourier_noise,
    prime_mix,
    random_deformations,
    random_filters,
    random_haze,
    random_tone_curves,
)
from train.setup import build_training, create_accelerator

PRIME = ["aug.prime.enabled=true"]
PAIR = [*PRIME, "aug.views=2", "train.adv.consistency=1"]


def _images(n: int = 8, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_each_primitive_keeps_shape_and_range_and_follows_its_generator(name):
    x, cfg = _images(), PrimeConfig(enabled=True)
    a, b, c = (PRIMITIVES[name](x, _gen(s), cfg) for s in (1, 1, 2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a - x).abs().mean()) > 1e-3  # it changed the images


def test_zero_strength_primitives_are_the_identity():
    x = _images()
    cfg = PrimeConfig(enabled=True, color_strength=0.0, filter_strength=0.0, haze_strength=0.0, haze_contrast=1.0)
    for fn in (random_tone_curves, random_filters, random_haze):
        assert torch.allclose(fn(x, _gen(), cfg), x, atol=1e-5), fn.__name__


def test_tone_curves_act_on_values_not_positions():
    # a tone curve maps equal pixel values of one channel to equal values, wherever they are
    x = torch.linspace(0, 1, 16).repeat(2, 3, 16, 1)  # every row the same ramp
    x = torch.cat([x, x.flip(-1)], dim=-1)  # and the same values mirrored
    out = random_tone_curves(x, _gen(), PrimeConfig(enabled=True, color_strength=0.05))
    assert torch.allclose(out[..., :16], out[..., 16:].flip(-1), atol=1e-6)
    assert torch.allclose(out[:, :, :1], out, atol=1e-6)  # every row alike


def test_random_filter_is_one_kernel_per_image_shared_by_its_channels():
    x = _images(4, 20)
    x[:, 1] = x[:, 0]  # two identical channels stay identical
    out = random_filters(x, _gen(), PrimeConfig(enabled=True))
    assert torch.equal(out[:, 1], out[:, 0]) and not torch.equal(out[:, 2], out[:, 0])


def test_deformations_move_pixels_smoothly_and_keep_the_border():
    # a horizontal ramp: a displacement changes values by the local shift, never far from the start
    ramp = torch.linspace(0, 1, 32).repeat(6, 3, 32, 1)
    out = random_deformations(ramp, _gen(3), PrimeConfig(enabled=True, deform_modes=4))
    shift = (out - ramp) * 31  # in pixels along x
    assert float(shift.abs().max()) > 0.3  # something moved
    edges = shift[..., [0, -1]]  # sine modes vanish at the border: the edge columns stay
    assert float(edges.abs().max()) < 1e-4
    assert float((shift[..., 1:] - shift[..., :-1]).abs().max()) < 1.0  # smooth: neighbours move alike


def test_haze_lowers_contrast_and_adds_a_smooth_field():
    x = _images(64, 32)
    cfg = PrimeConfig(enabled=True, haze_strength=0.0, haze_contrast=0.2)
    out = random_haze(x, _gen(), cfg)
    spread = (out - out.mean((2, 3), keepdim=True)).std((2, 3)) / (x - x.mean((2, 3), keepdim=True)).std((2, 3))
    assert float(spread.max()) <= 1 + 1e-5 and float(spread.min()) >= 0.2 - 1e-5
    assert float(spread.mean()) < 0.8  # contrast factors spread over [0.2, 1]
    grey = torch.full((16, 3, 32, 32), 0.5)
    field = random_haze(grey, _gen(), PrimeConfig(enabled=True, haze_strength=0.4, haze_modes=2)) - 0.5
    assert torch.equal(field[:, 0], field[:, 1])  # grey: one field for every channel
    assert float(field.abs().amax()) > 0.05 and float(field.abs().amax()) <= 0.4 + 1e-6
    # two modes at most: a neighbouring pixel differs by far less than the field's range
    step = (field[..., 1:] - field[..., :-1]).abs().amax((1, 2, 3)) / field.abs().amax((1, 2, 3)).clamp(min=1e-6)
    assert float(step.max()) < 0.25


def test_fourier_noise_is_one_planar_wave_per_channel_below_max_freq():
    grey = torch.full((64, 3, 32, 32), 0.5)
    cfg = FourierConfig(enabled=True, max_freq=0.125, strength_min=0.01, strength_mean=0.02)
    wave = fourier_noise(grey, _gen(), cfg) - 0.5
    assert float(wave.abs().max()) < 0.5  # nothing clamped at these strengths
    spectrum = torch.fft.fft2(wave).abs()
    freqs = torch.fft.fftfreq(32)
    radius = torch.sqrt(freqs[:, None] ** 2 + freqs[None, :] ** 2)
    peak = spectrum.flatten(2).argmax(2)
    assert float(radius.flatten()[peak].max()) <= 0.125 * math.sqrt(2) + 1 / 32  # no energy peak above max_freq
    # a planar wave of frequency f changes a pixel by at most 2 pi f a to its neighbour
    assert float((wave[..., 1:] - wave[..., :-1]).abs().max()) < 2 * math.pi * 0.125 * float(wave.abs().max()) + 1e-5


def test_fourier_strength_is_min_plus_exponential_mean():
    # The peak of each channel's wave over 3 x 2000 draws on grey images (nothing clamped). A sampled
    # wave reaches its amplitude within 1% on average at 16 px (only the rare waves of less than a
    # period across the image fall short), so the mean peak estimates min + mean = 0.08: one standard
    # deviation of that mean is 0.03 / sqrt(6000) = 0.5% of it, the tolerance 4%.
    grey = torch.full((2000, 3, 16, 16), 0.5)
    cfg = FourierConfig(enabled=True, max_freq=0.5, strength_min=0.05, strength_mean=0.03)
    peak = (fourier_noise(grey, _gen(), cfg) - 0.5).flatten(2).abs().amax(2)
    assert float(peak.mean()) == pytest.approx(0.08, rel=0.04)
    assert float((peak > 0.05 * 0.98).float().mean()) > 0.95  # never below strength_min but for those rare waves


def test_prime_mix_share_p_and_chains():
    x = _images(400, 8)
    out = prime_mix(x[:4], _gen(), PrimeConfig(enabled=True))
    assert out.shape == (4, 3, 8, 8) and out.min() >= 0 and out.max() <= 1
    aug = BatchAugment(AugConfig(prime=PrimeConfig(enabled=True, p=0.5)), seed=0)
    changed = (aug.augment(x, _gen()) != x).flatten(1).any(1)
    assert 150 <= int(changed.sum()) <= 250  # binomial(400, 0.5): 200 +- 10 (1 sd), five sd either way
    none = BatchAugment(AugConfig(prime=PrimeConfig(enabled=True, p=0.0)), seed=0)
    assert torch.equal(none.augment(x, _gen()), x)


def test_batch_generator_depends_on_seed_epoch_batch_and_process_only():
    aug = AugConfig(prime=PrimeConfig(enabled=True), fourier=FourierConfig(enabled=True))
    x = _images()
    make = lambda seed, rank, epoch, batch: BatchAugment(aug, seed, rank, 2).views(x, epoch, batch)[0]  # noqa: E731
    torch.manual_seed(123)
    first = make(0, 0, 1, 5)
    torch.manual_seed(456)  # the global generator plays no part
    assert torch.equal(first, make(0, 0, 1, 5))
    for other in ((1, 0, 1, 5), (0, 1, 1, 5), (0, 0, 2, 5), (0, 0, 1, 6)):
        assert not torch.equal(first, make(*other)), other


def test_views_one_replaces_two_pairs_and_channels_last_is_kept():
    x = _images().contiguous(memory_format=torch.channels_last)
    one, none = BatchAugment(AugConfig(prime=PrimeConfig(enabled=True)), 0).views(x, 0, 0)
    assert none is None and not torch.equal(one, x) and one.is_contiguous(memory_format=torch.channels_last)
    base, second = BatchAugment(AugConfig(prime=PrimeConfig(enabled=True), views=2), 0).views(x, 0, 0)
    assert base is x and torch.equal(second, one)
    assert create_batch_augment(AugConfig(), 0) is None


def test_js_divergence():
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert float(js_divergence(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(js_divergence(a, b)) == pytest.approx(float(js_divergence(b, a)), abs=1e-6)
    far = torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]])
    assert float(js_divergence(*far)) == pytest.approx(math.log(2), abs=1e-3)  # its bound


@pytest.mark.parametrize("mode, crafting", [("none", 0), ("fgsm_rs", 1), ("pgd", 3)])
def test_paired_loss_attacks_both_views_and_trains_on_both(mode, crafting):
    torch.manual_seed(0)
    x, paired, y = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16), torch.randint(0, 4, (4,))
    model = Recorder().train()
    model.net[4].p = 0.0  # no drop-out: the loss can be recomputed from the trained batch
    adv = AdvConfig(mode=mode, eps=EPS, steps=3, consistency=2.0)
    loss = adversarial_loss(model, model, nn.CrossEntropyLoss(), x, y, adv, epoch=1.0, paired=paired)
    assert loss.requires_grad and torch.isfinite(loss)
    *attack_calls, (trained, size, inputs) = model.calls
    assert len(attack_calls) == crafting and not any(t for t, _, _ in attack_calls)
    assert all(s == 8 for _, s, _ in attack_calls) and trained and size == 8  # one attack, one forward of 2N
    both = torch.cat([x, paired])
    if mode == "none":
        assert torch.equal(inputs, both)
    else:  # each view moved inside its own eps-ball
        moved = lp_norm(inputs - both, "linf")
        assert float(moved.max()) <= EPS + 1e-6 and float(moved[:4].min()) > 0 and float(moved[4:].min()) > 0
    # cross-entropy over both views + 2 x the Jensen-Shannon divergence between them
    with torch.no_grad():
        logits = model.net(inputs)
        expected = nn.functional.cross_entropy(logits, torch.cat([y, y])) + 2.0 * js_divergence(*logits.chunk(2))
    assert float(js_divergence(*logits.chunk(2))) > 1e-6
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["aug.views=3"], "'aug.views': 3 must be 1 or 2"),
        (["aug.views=2"], "needs aug.prime.enabled or aug.fourier.enabled"),
        ([*PRIME, "train.adv.consistency=1"], "'train.adv.consistency' needs aug.views=2"),
        ([*PRIME, "aug.views=2", "train.adv.consistency=-1"], "'train.adv.consistency' must be >= 0"),
        ([*PAIR, "train.adv.mode=trades"], "aug.views=2 does not combine with train.adv.mode=trades"),
        ([*PAIR, "train.adv.mode=fgsm_reg"], "aug.views=2 does not combine with train.adv.mode=fgsm_reg"),
        ([*PAIR, "train.mixup=0.2"], "aug.views=2 does not combine with train.mixup"),
        ([*PRIME, "aug.augmix.enabled=true", "aug.augmix.jsd_weight=12"], "do not combine with aug.augmix.jsd_weight"),
        ([*PRIME, "aug.prime.primitives=[color,blur]"], "'blur' is not one of color, filter, deform, haze"),
        ([*PRIME, "aug.prime.primitives=[]"], "'aug.prime.primitives' needs at least one"),
        ([*PRIME, "aug.prime.depth=0"], "'depth' \\(-1 or >= 1\\)"),
        ([*PRIME, "aug.prime.p=1.5"], "'aug.prime.p' \\(0..1\\)"),
        ([*PRIME, "aug.prime.filter_size=4"], "'aug.prime.filter_size': 4 must be odd"),
        ([*PRIME, "aug.prime.deform_modes=1"], "'deform_modes' \\(>= 2\\)"),
        ([*PRIME, "aug.prime.haze_contrast=0"], "'aug.prime.haze_contrast': 0.0 must be in \\(0, 1\\]"),
        ([*PRIME, "aug.prime.color_strength=-1"], "must be >= 0"),
        (["aug.fourier.enabled=true", "aug.fourier.max_freq=0.8"], "'aug.fourier.max_freq': 0.8 must be in"),
        (["aug.fourier.enabled=true", "aug.fourier.strength_mean=0", "aug.fourier.strength_min=0"], "not both 0"),
    ],
)
def test_meaningless_settings_are_one_line_errors(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        tiny_config(*overrides)
    assert "\n" not in str(info.value)


def test_sensible_combinations_load(tiny_config):
    for mode in ("none", "fgsm_rs", "pgd"):
        tiny_config(*PAIR, f"train.adv.mode={mode}")
    for mode in ("fgsm_reg", "trades"):  # one device-augmented view replaces the image: any mode
        tiny_config(*PRIME, "aug.fourier.enabled=true", f"train.adv.mode={mode}")
    tiny_config(*PRIME, "aug.augmix.enabled=true", "train.mixup=0.2")  # AugMix in the loader, PRIME after it


PAIR_PGD = [
    *PAIR,
    "aug.fourier.enabled=true",
    "aug.fourier.p=0.5",
    "train.adv.mode=pgd",
    "train.adv.steps=1",
    "train.adv.val_images=8",
    "train.adv.val_steps=1",
]


def test_two_views_with_pgd_grad_accumulation_and_ema_train_and_resume_exactly(tiny_config):
    common = [*PAIR_PGD, "train.epochs=2", "train.checkpoint_every=3", "train.grad_accum_steps=2", "train.ema=true"]
    full = tiny_config(*common, "name=full")
    training = build_training(full, create_accelerator(full))
    assert isinstance(training.batch_augment, BatchAugment) and training.batch_augment.pair
    result = train_main.run(full)
    assert result["global_step"] == 8 and math.isfinite(result["val_robust_acc"])
    assert (full.run_dir / "augmented_samples.png").stat().st_size > 0
    train_main.run(tiny_config(*common, "name=part", "train.max_steps=3"))
    train_main.run(tiny_config(*common, "name=part", "resume=auto"))
    worst = weight_difference(full.run_dir, tiny_config(*common, "name=part").run_dir)
    assert worst < 1e-5, f"resumed two-view training differs from the uninterrupted run by {worst}"


def test_device_augmentation_changes_what_training_sees(tiny_config):
    # The same seed with and without PRIME: different weights after one epoch (it reached the model).
    plain = tiny_config("name=plain", "train.max_steps=2")
    primed = tiny_config(*PRIME, "name=prime", "train.max_steps=2")
    for cfg in (plain, primed):
        train_main.run(cfg)
    a, b = (load_file(str(c.run_dir / "last.safetensors")) for c in (plain, primed))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


@pytest.mark.slow
def test_two_cpu_processes_with_two_views_and_pgd(tiny_data, tmp_path):
    overrides = shrink(["name=ddp_pair", "train.epochs=1", *PAIR_PGD], tiny_data, tmp_path / "runs")
    proc = run_module("launch", "train.main", "--num_processes", "2", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es)") == 1, proc.stdout
    info = json.loads((tmp_path / "runs" / "ddp_pair" / "best.json").read_text())
    assert info["global_step"] == 4 and info["config"]["aug"]["views"] == 2
