"""MI-FGSM, input diversity and ``craft_attack`` (attacks/transfer.py) on the tiny grating net of test_attacks."""

import pytest
import torch

from attacks import ATTACK_KINDS, craft_attack, input_diversity, lp_norm, mi_fgsm, pgd
from tests.test_attacks import accuracy, data, gen, net  # noqa: F401 - the module's fixtures

CASES = [(kind, norm) for kind in ATTACK_KINDS for norm in ("linf", "l2")]
EPS = {"linf": 0.05, "l2": 1.0}


@pytest.mark.parametrize("kind,norm", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_every_kind_stays_in_its_ball_and_box_and_hurts(net, data, kind, norm):  # noqa: F811
    x, y = data[0][:32].clone(), data[1][:32]
    x[:, :, :3] = 0.0
    x[:, :, -3:] = 1.0
    eps = EPS[norm]
    adv = craft_attack(kind, net, x, y, eps, norm, steps=10, generator=gen())
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert lp_norm(adv - x, norm).max().item() <= eps + 1e-5
    assert accuracy(net, adv, y) <= 60.0, "a white-box attack at this budget must hurt the net it was crafted on"
    assert all(p.grad is None for p in net.parameters())


def test_momentum_with_no_decay_is_iterative_fgsm(net, data):  # noqa: F811
    """decay = 0 leaves g = grad / ||grad||_1, whose sign is the gradient's: I-FGSM exactly."""
    x, y = data
    ours = mi_fgsm(net, x, y, 0.05, steps=5, decay=0.0)
    ifgsm = pgd(net, x, y, 0.05, steps=5, step_size=0.01, random_start=False)
    assert torch.equal(ours, ifgsm)
    with_momentum = mi_fgsm(net, x, y, 0.05, steps=5, decay=1.0)
    assert not torch.equal(with_momentum, ifgsm), "the momentum term changed nothing"


def test_iterative_attacks_beat_a_single_step(net, data):  # noqa: F811
    x, y = data
    single = accuracy(net, craft_attack("fgsm", net, x, y, 0.04, "linf", steps=10), y)
    for kind in ("pgd", "mifgsm"):
        assert accuracy(net, craft_attack(kind, net, x, y, 0.04, "linf", steps=10, generator=gen()), y) <= single


def test_input_diversity_draws_a_resize_and_pad_and_is_seeded():
    x = torch.rand(2, 3, 32, 32, generator=gen(1))
    assert torch.equal(input_diversity(x, prob=0.0, generator=gen()), x)
    a = input_diversity(x, prob=1.0, generator=gen(7))
    b = input_diversity(x, prob=1.0, generator=gen(7))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, x)
    # the zero padding shows as darker borders: some border row or column is dimmer than the image's
    assert min(a[..., 0, :].mean(), a[..., -1, :].mean(), a[..., :, 0].mean(), a[..., :, -1].mean()) < x.mean() - 0.05
    draws = {bool((input_diversity(x, prob=0.5, generator=g) != x).any()) for g in (gen(s) for s in range(20))}
    assert draws == {True, False}, "p = 0.5 should both transform and keep the batch over 20 seeds"


def test_diverse_inputs_are_differentiated_through(net, data):  # noqa: F811
    """DI-FGSM with p = 1 gives another image than MI-FGSM from the same start: every step saw a
    transformed input, and the gradient came back through the resize and the pad."""
    x, y = data[0][:8], data[1][:8]
    plain = mi_fgsm(net, x, y, 0.05, steps=3)
    diverse = mi_fgsm(net, x, y, 0.05, steps=3, diversity_prob=1.0, generator=gen())
    assert not torch.equal(plain, diverse)
    assert (diverse != x).float().mean() > 0.9, "most pixels moved: the gradient reached the input"


def test_unknown_kind_or_norm_is_refused(net, data):  # noqa: F811
    x, y = data[0][:2], data[1][:2]
    with pytest.raises(ValueError, match="unknown attack kind"):
        craft_attack("deepfool", net, x, y, 0.03, "linf", steps=1)
    with pytest.raises(ValueError, match="linf and l2"):
        craft_attack("pgd", net, x, y, 10.0, "l1", steps=1)
