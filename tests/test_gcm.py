"""Tests for gcm/: GradientConcealment, BPDA switches and RandomResizePad."""

import copy
import io

import pytest
import timm
import torch
from torch import nn

from gcm import (
    DefendedModel,
    GradientConcealment,
    RandomResizePad,
    apply_gcm,
    apply_random_pad,
    bpda,
    set_bpda,
)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_convnext", num_classes=10).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def input_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gradient of the cross-entropy w.r.t. the input, labels = the model's own predictions."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    labels = logits.argmax(-1).detach()
    nn.functional.cross_entropy(logits, labels).backward()
    return x.grad


# --- GradientConcealment forward ---


def test_forward_is_identity_in_float32(images):
    y = GradientConcealment()(images)
    assert y.dtype == torch.float32
    assert (y - images).abs().max() <= 1e-7
    big = images >= 0.25
    assert big.any() and torch.equal(y[big], images[big])
    assert not torch.equal(y, images), "small pixels should move by a few ulps"


def test_naive_float16_formula_is_nan(images):
    # Why the float32 guard exists: 1e20 overflows float16, sin(inf) = NaN.
    x = images.half()
    naive = torch.sin(x * 1e20) * 1e-8 + x
    assert torch.isnan(naive[x != 0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_under_cpu_autocast(images, dtype):
    gcm = GradientConcealment()
    with torch.autocast("cpu", dtype=dtype):
        y = gcm(images)
        y_low = gcm(images.to(dtype))
    for out, ref in ((y, images), (y_low, images.to(dtype).float())):
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert (out - ref).abs().max() <= 1e-7


def test_float16_input_without_autocast(images):
    x = images.half()
    y = GradientConcealment()(x)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert (y - x.float()).abs().max() <= 1e-7


def test_defended_model_under_bf16_autocast(model, images):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = apply_gcm(model)(images)
    assert torch.isfinite(logits).all()


# --- GradientConcealment gradient ---


def test_gcm_gradient_is_huge_with_random_sign(images):
    x = images.clone().requires_grad_(True)
    GradientConcealment()(x).sum().backward()
    g = x.grad
    # d/dx = 1 + 1e12 * cos(1e20 x): magnitude ~1e12, sign pseudo-random.
    assert g.abs().median() > 1e10
    assert 0.4 < (g > 0).float().mean() < 0.6


def test_zero_pixels_keep_true_sign():
    x = torch.zeros(10, requires_grad=True)
    GradientConcealment()(x).sum().backward()
    assert (x.grad > 0).all()
    assert torch.allclose(x.grad, torch.full_like(x.grad, 1e12), rtol=1e-6)


def test_gcm_scrambles_model_gradient_sign(model, images):
    plain = input_grad(model, images)
    concealed = input_grad(apply_gcm(model), images)
    nonzero = plain != 0
    agree = (torch.sign(plain) == torch.sign(concealed))[nonzero].float().mean().item()
    assert 0.4 < agree < 0.6, agree


def test_bpda_recovers_plain_gradient(model, images):
    defended = apply_gcm(model)
    defended.gcm.bpda = True
    grad_bpda = input_grad(defended, images)
    # Straight-through: exactly the plain gradient taken at the (unchanged-looking) GCM output ...
    at_output = GradientConcealment()(images).detach()
    assert torch.equal(grad_bpda, input_grad(model, at_output))
    # ... which is the plain gradient at x up to float32 noise.
    torch.testing.assert_close(grad_bpda, input_grad(model, images), rtol=1e-4, atol=1e-6)


def test_bpda_keeps_forward_value(images):
    gcm = GradientConcealment()
    y = gcm(images)
    gcm.bpda = True
    x = images.clone().requires_grad_(True)
    y_bpda = gcm(x)
    assert torch.equal(y_bpda, y)
    y_bpda.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_predictions_unchanged(model, images):
    with torch.no_grad():
        assert torch.equal(apply_gcm(model)(images).argmax(-1), model(images).argmax(-1))


def test_w_eps_configurable(images):
    gcm = GradientConcealment(w=0, eps=0)
    assert "w=0" in repr(gcm) and "eps=0" in repr(gcm)
    gcm = GradientConcealment(w=1e20, eps=0.0)
    x = images.clone().requires_grad_(True)
    y = gcm(x)
    assert torch.equal(y, images)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))

    gcm = GradientConcealment(w=10.0, eps=0.1)
    assert isinstance(gcm.w, float) and gcm.w == 10.0 and gcm.eps == 0.1
    assert "w=10, eps=0.1" in repr(gcm)
    x = images.clone().requires_grad_(True)
    y = gcm(x)
    torch.testing.assert_close(y, images + 0.1 * torch.sin(10 * images))
    y.sum().backward()
    torch.testing.assert_close(x.grad, 1 + torch.cos(10 * images))
    assert list(gcm.parameters()) == [] and gcm.state_dict() == {}


def test_apply_gcm_wraps_first(model, images):
    defended = apply_gcm(model, w=5.0, eps=0.5)
    assert isinstance(defended, DefendedModel) and defended.model is model
    assert isinstance(defended.gcm, GradientConcealment) and defended.gcm.w == 5.0
    # State dict is the model's, prefixed: checkpoints load into .model unchanged.
    assert set(defended.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    with torch.no_grad():
        torch.testing.assert_close(defended(images), model(images + 0.5 * torch.sin(5 * images)))


# --- set_bpda / bpda ---


def test_set_bpda_counts_and_sets(model):
    twice = apply_gcm(apply_gcm(model))
    gcms = [twice.gcm, twice.model.gcm]
    assert set_bpda(twice, True) == 2 and all(m.bpda for m in gcms)
    assert set_bpda(twice, False) == 2 and not any(m.bpda for m in gcms)
    assert set_bpda(model, True) == 0
    assert set_bpda(gcms[0], True) == 1 and gcms[0].bpda


def test_bpda_context_restores(model):
    twice = apply_gcm(apply_gcm(model))
    outer, inner = twice.gcm, twice.model.gcm
    inner.bpda = True
    with bpda(twice) as found:
        assert found == 2 and outer.bpda and inner.bpda
    assert (outer.bpda, inner.bpda) == (False, True)
    with pytest.raises(RuntimeError):
        with bpda(twice):
            raise RuntimeError("attack failed")
    assert (outer.bpda, inner.bpda) == (False, True)
    with bpda(model) as found:
        assert found == 0


# --- RandomResizePad ---


def content_box(out: torch.Tensor):
    """(top, left, h, w) of the non-zero region of a padded all-positive image."""
    mask = out[0, 0] != 0
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    top, left = rows[0].item(), cols[0].item()
    h, w = rows[-1].item() - top + 1, cols[-1].item() - left + 1
    return top, left, h, w


def draw_boxes(pad: RandomResizePad, size, n: int):
    x = torch.rand(1, 1, *size) + 0.5  # strictly positive, so zeros can only be padding
    boxes = []
    for _ in range(n):
        out = pad(x)
        assert out.shape == x.shape
        top, left, h, w = content_box(out)
        # Everything outside the box is zero and everything inside is content.
        assert (out[0, 0] != 0).sum().item() == h * w
        boxes.append((top, left, h, w))
    return boxes


def test_random_pad_default_range_at_224():
    pad = RandomResizePad().eval()  # eval() must not turn the defense off
    assert pad.side_range(224) == (218, 223)
    boxes = draw_boxes(pad, (224, 224), 60)
    assert {h for _, _, h, _ in boxes} == set(range(218, 224))
    assert all(h == w for _, _, h, w in boxes)
    assert all(t + h <= 224 and left + w <= 224 for t, left, h, w in boxes)
    assert len({(t, left) for t, left, _, _ in boxes}) > 10


def test_random_pad_range_scales_with_size():
    pad = RandomResizePad()
    lo, hi = pad.side_range(64)
    assert (lo, hi) == (round(218 / 224 * 64), round(223 / 224 * 64))
    boxes = draw_boxes(pad, (64, 64), 30)
    assert {h for _, _, h, _ in boxes} == set(range(lo, hi + 1))


def test_random_pad_non_square():
    pad = RandomResizePad(min_ratio=0.5, max_ratio=0.75)
    for _, _, h, w in draw_boxes(pad, (32, 64), 20):
        assert 16 <= h <= 24 and 32 <= w <= 48
        assert abs(w - 2 * h) <= 1


def test_random_pad_content_is_bilinear_resize():
    pad = RandomResizePad(min_ratio=0.5, max_ratio=0.8, seed=5)
    x = torch.rand(2, 3, 40, 40) + 0.5  # strictly positive, so zeros can only be padding
    for _ in range(3):
        out = pad(x)
        top, left, h, w = content_box(out)
        expected = nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[..., top : top + h, left : left + w], expected)


def test_random_pad_differs_and_reproducible(images):
    pad = RandomResizePad(seed=3)
    first = [pad(images) for _ in range(4)]
    assert any(not torch.equal(first[0], o) for o in first[1:])
    pad.reset()
    assert all(torch.equal(a, pad(images)) for a in first)
    pad.reset(seed=4)
    assert pad.seed == 4
    other = [pad(images) for _ in range(4)]
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    fresh = RandomResizePad(seed=4)
    assert all(torch.equal(a, fresh(images)) for a in other)


def test_random_pad_leaves_global_rng_alone(images):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    RandomResizePad()(images)
    assert torch.equal(torch.rand(3), expected)


def test_random_pad_disabled_is_identity(images):
    pad = RandomResizePad(enabled=False)
    assert torch.equal(pad(images), images)
    pad.enabled = True
    assert not torch.equal(pad(images), images)


def test_random_pad_is_differentiable():
    pad = RandomResizePad(min_ratio=0.5, max_ratio=0.9, seed=1)
    x = torch.rand(1, 2, 12, 12, dtype=torch.float64, requires_grad=True)

    def fixed_draw(inp):
        pad.reset()  # gradcheck evaluates several times: keep the same draw
        return pad(inp)

    assert torch.autograd.gradcheck(fixed_draw, (x,))
    y = torch.rand(4, 3, 32, 32, requires_grad=True)
    pad(y).square().sum().backward()
    assert torch.isfinite(y.grad).all() and (y.grad != 0).any()


def test_random_pad_bad_ratios():
    for lo, hi in ((0.0, 0.5), (0.9, 0.8), (0.9, 1.1)):
        with pytest.raises(ValueError, match="min_ratio"):
            RandomResizePad(min_ratio=lo, max_ratio=hi)


def test_apply_random_pad_and_full_stack(model, images):
    defended = apply_gcm(apply_random_pad(model, min_ratio=0.75, max_ratio=0.9, seed=7))
    pad = defended.model.random_pad
    assert isinstance(pad, RandomResizePad) and pad.seed == 7 and pad.min_ratio == 0.75
    with torch.no_grad():
        out = defended(images)
        pad.reset()
        torch.testing.assert_close(out, model(pad(GradientConcealment()(images))))
    # EOT-style attack through the whole stack with BPDA: finite, non-zero gradient.
    with bpda(defended) as found:
        assert found == 1
        grad = input_grad(defended, images)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e3


def test_defended_model_copy_and_save_keep_draws(model, images):
    defended = apply_random_pad(model, seed=2)
    clone = copy.deepcopy(defended)
    buf = io.BytesIO()
    torch.save(defended, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        ref = defended(images)
        assert torch.equal(clone(images), ref) and torch.equal(loaded(images), ref)


def test_defended_model_owns_its_randomness(model, images):
    plain = apply_gcm(model)
    assert not plain.randomized
    plain.reseed(3)  # nothing to reseed: no error
    defended = DefendedModel(model, gcm=GradientConcealment(), random_pad=RandomResizePad(seed=7))
    assert defended.randomized
    with torch.no_grad():
        defended.reseed(11)
        first = [defended(images) for _ in range(3)]
        defended.reseed(11)
        again = [defended(images) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert defended.random_pad.seed == 7  # the configured seed stays what the config said
    assert not DefendedModel(model, random_pad=RandomResizePad(enabled=False)).randomized


# --- the cos form (what an exported .onnx holds: the organizers' converter has no Sin) ---


def test_cos_form_moves_no_pixel_more_than_eps_and_conceals_the_gradient(model, images):
    gcm = GradientConcealment(form="cos")
    assert (gcm(images) - images).abs().max() <= 1.5e-8
    x = images.clone().requires_grad_(True)
    gcm(x).sum().backward()
    # d/dx = 1 - 1e12 * sin(1e20 x): magnitude ~1e12, sign pseudo-random, like the sin form.
    assert x.grad.abs().median() > 1e10 and 0.4 < (x.grad > 0).float().mean() < 0.6
    plain = input_grad(model, images)
    concealed = input_grad(apply_gcm(model, form="cos"), images)
    agree = (torch.sign(plain) == torch.sign(concealed))[plain != 0].float().mean().item()
    assert 0.4 < agree < 0.6, agree
    assert torch.equal(apply_gcm(model, form="cos")(images).argmax(1), model(images).argmax(1))


def test_cos_form_bpda_recovers_the_plain_gradient(model, images):
    defended = apply_gcm(model, form="cos")
    with bpda(defended) as found:
        grad = input_grad(defended, images)
    assert found == 1
    torch.testing.assert_close(grad, input_grad(model, images), rtol=1e-4, atol=1e-6)


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="GCM form 'tan'"):
        GradientConcealment(form="tan")
