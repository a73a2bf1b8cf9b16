"""Attacks made to transfer: MI-FGSM and input diversity, and one entry point for every attack kind.

* MI-FGSM (Dong et al. 2018, "Boosting Adversarial Attacks with Momentum"): iterative FGSM whose
  step follows an accumulated gradient ``g <- decay * g + grad / ||grad||_1``; the Linf step is
  ``alpha * sign(g)``, the L2 step ``alpha * g / ||g||_2``, with ``alpha = eps / steps`` and
  ``decay = 1`` as in the paper.
* Input diversity (Xie et al. 2019, "Improving Transferability of Adversarial Examples with
  Input Diversity"): with probability ``prob`` each gradient step sees the image resized to a
  random side in ``[W, rate * W)`` and zero-padded at a random offset to ``rate * W`` (the paper:
  299 -> [299, 330), p = 0.5). Here the padded image is resized back to ``W`` so any fixed-size
  model takes it. Combined with momentum it is the paper's M-DI2-FGSM (``difgsm`` below).

:func:`craft_attack` names every kind the Phase-I-like test set and the Phase-II-like score draw
from (``ATTACK_KINDS``), each in Linf or L2, so both draw settings the same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.gradient import _input_grad, eval_mode, pgd
from attacks.norms import check_norm, lp_norm, per_sample, perturb, rand_uniform

# fgsm: one step of eps (FGM in L2); pgd: random start, steps of 2.5 eps / steps;
# mifgsm: momentum; difgsm: momentum + input diversity (M-DI2-FGSM)
ATTACK_KINDS = ("fgsm", "pgd", "mifgsm", "difgsm")


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


def input_diversity(
    x: torch.Tensor, prob: float = 0.5, rate: float = 1.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Xie et al.'s random resize and pad of a batch (one draw per call), back at the input size.

    Args:
        x: Images (N, C, H, W).
        prob: Probability that the call transforms the batch (else it is returned unchanged).
        rate: The padded canvas is ``rate`` times the input side; the resized side is drawn from
            ``[side, rate * side)``.
        generator: Source of the draws (reproducible attacks).
    """
    if float(rand_uniform((1,), generator, x)) >= prob:
        return x
    h, w = x.shape[-2:]
    canvas = max(int(max(h, w) * rate), max(h, w) + 1)
    side = _randint(max(h, w), canvas - 1, generator)
    top = _randint(0, canvas - side, generator)
    left = _randint(0, canvas - side, generator)
    z = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    z = F.pad(z, (left, canvas - side - left, top, canvas - side - top), value=0.0)
    return F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)


class _Diverse(nn.Module):
    """``model(input_diversity(x))``: what a DI attack differentiates."""

    def __init__(self, model: nn.Module, prob: float, rate: float, generator: torch.Generator | None) -> None:
        super().__init__()
        self.model, self.prob, self.rate, self.generator = model, prob, rate, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_diversity(x, self.prob, self.rate, self.generator))


def mi_fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    decay: float = 1.0,
    diversity_prob: float = 0.0,
    diversity_rate: float = 1.1,
    generator: torch.Generator | None = None,
    eot_samples: int = 1,
) -> torch.Tensor:
    """Momentum iterative FGSM (Dong et al. 2018), optionally with input diversity (Xie et al. 2019).

    Args:
        model: Maps a float32 batch in [0, 1] to logits.
        x: Clean images (N, C, H, W) in [0, 1].
        y: True labels (N,).
        eps: Radius of the ball in ``norm`` (``linf`` or ``l2``), pixel units.
        steps: Iterations.
        step_size: Step length; default ``eps / steps`` (the paper's).
        decay: Momentum decay (1.0 in the paper).
        diversity_prob: Probability of the input-diversity transform per step (0: plain MI-FGSM).
        diversity_rate: Canvas side / input side of the transform.
        generator: Source of the diversity draws.
        eot_samples: Gradient passes averaged per step (a randomized model).

    Returns:
        Adversarial images inside the eps-ball and [0, 1], float32.
    """
    if check_norm(norm) == "l1":
        raise ValueError("mi_fgsm supports linf and l2")
    x = x.detach().float()
    alpha = eps / steps if step_size is None else step_size
    target = _Diverse(model, diversity_prob, diversity_rate, generator) if diversity_prob > 0 else model
    momentum = torch.zeros_like(x)
    x_adv = x.clone()
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_grad(target, x_adv, y, eot_samples)
            momentum = decay * momentum + grad / per_sample(lp_norm(grad, "l1").clamp_min(1e-12), grad)
            if norm == "linf":
                step = momentum.sign()
            else:
                step = momentum / per_sample(lp_norm(momentum, "l2").clamp_min(1e-12), momentum)
            x_adv = perturb(x, x_adv + alpha * step - x, eps, norm)
    return x_adv


def craft_attack(
    kind: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str,
    steps: int,
    generator: torch.Generator | None = None,
    eot_samples: int = 1,
) -> torch.Tensor:
    """Adversarial images of one of ``ATTACK_KINDS`` in ``norm`` (linf or l2) at ``eps``.

    ``fgsm`` ignores ``steps`` (one step of eps; in L2 the fast gradient method); ``pgd`` starts
    at a random point of the ball and takes steps of 2.5 eps / steps; ``mifgsm`` and ``difgsm``
    take steps of eps / steps along the momentum (``difgsm`` with input diversity, p = 0.5).
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"craft_attack supports linf and l2, not {norm!r}")
    if kind == "fgsm":
        return pgd(model, x, y, eps, norm=norm, steps=1, step_size=eps, random_start=False, eot_samples=eot_samples)
    if kind == "pgd":
        return pgd(
            model, x, y, eps, norm=norm, steps=steps, step_size=2.5 * eps / steps, generator=generator,
            eot_samples=eot_samples,
        )  # fmt: skip
    if kind in ("mifgsm", "difgsm"):
        prob = 0.5 if kind == "difgsm" else 0.0
        return mi_fgsm(
            model, x, y, eps, norm=norm, steps=steps, diversity_prob=prob, generator=generator, eot_samples=eot_samples
        )
    raise ValueError(f"unknown attack kind {kind!r} (one of {', '.join(ATTACK_KINDS)})")


def draw_attack(rng: np.random.Generator, draws, n_surrogates: int = 0) -> dict:
    """One attack's settings, each item uniform over its list in ``draws`` (a ``robust.config.AttackDrawConfig``:
    ``kinds``, ``norms``, ``eps_linf``, ``eps_l2``, ``steps``), for :func:`craft_attack`."""
    norm = str(rng.choice(draws.norms))
    step = {
        "op": "attack",
        "kind": str(rng.choice(draws.kinds)),
        "norm": norm,
        "eps": float(rng.choice(getattr(draws, f"eps_{norm}"))),
        "steps": int(rng.choice(draws.steps)),
        "seed": int(rng.integers(2**31)),
    }
    if n_surrogates:
        step["surrogate"] = int(rng.integers(n_surrogates))
    return step


def draw_attacks(seed: int, draws, k: int) -> list[dict]:
    """The first ``k`` settings :func:`draw_attack` draws from ``draws`` under ``seed``, in order: the
    Phase-II-like score's attacks (``phase2.seed``, ``phase2.attack``; a smaller ``k`` takes a prefix)."""
    rng = np.random.default_rng(seed)
    return [draw_attack(rng, draws) for _ in range(k)]
