"""Gradient attacks: FGSM, PGD (Linf, L2, L1; restarts, EOT) and Carlini-Wagner L2.

Every attack takes any ``nn.Module`` mapping a float32 batch in [0, 1] of shape (N, 3, H, W)
to logits, and returns adversarial images of the same shape that lie inside the eps-ball of
the input (in the attack's norm) and inside [0, 1]. Attacks run the model in eval mode (the
previous train/eval flags are restored afterwards), compute in float32 and take gradients
with ``torch.autograd.grad`` w.r.t. the input only, so no parameter ``.grad`` is touched.

Gradient attacks can be fooled by gradient masking such as GCM: attack through it with BPDA
(``gcm.bpda``). Randomized defenses need EOT: ``pgd(..., eot_samples=n)`` averages the loss
gradient over n passes, :class:`EOT` averages the logits.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from attacks.norms import check_norm, lp_norm, per_sample, perturb, rand_uniform, unit_sphere


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for a block, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit of the true class minus the best other logit; < 0 means misclassified."""
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)
    return true - other


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _kl_from(p_clean: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """TRADES' inner loss: KL(p_clean || softmax(logits)), summed over the batch."""
    return lambda logits, _: F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")


def _input_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 1, loss_fn: Callable = _cross_entropy
) -> torch.Tensor:
    """Gradient of the summed loss (cross-entropy by default) w.r.t. x, averaged over ``samples`` passes (EOT).

    The loss is computed in float32 whatever precision the model runs in (autocast).
    """
    grad = torch.zeros_like(x)
    for _ in range(samples):
        x_ = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x_).float(), y)
            grad += torch.autograd.grad(loss, x_)[0]
    # A masked gradient may be huge; never let inf/nan turn into a NaN image.
    return torch.nan_to_num(grad / samples, nan=0.0, posinf=1e30, neginf=-1e30)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, eot_samples: int = 1) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015), Linf: ``x + eps * sign(grad)``."""
    return pgd(model, x, y, eps, norm="linf", steps=1, step_size=eps, random_start=False, eot_samples=eot_samples)


def _l1_step(grad: torch.Tensor, x_adv: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sparse L1 descent direction (Tramer & Boneh 2019): the signs of the top (1 - sparsity)
    fraction of gradient coordinates, scaled to unit L1 norm. Coordinates stuck at a box
    bound and pushed outwards are skipped, since clipping would waste the step on them."""
    g = grad.flatten(1)
    xa = x_adv.flatten(1)
    g = g.masked_fill(((xa <= 0) & (g < 0)) | ((xa >= 1) & (g > 0)), 0.0)
    k = max(1, int(round((1.0 - sparsity) * g.shape[1])))
    mag = g.abs()
    thresh = mag.topk(k, dim=1).values[:, -1:]
    step = g.sign() * ((mag >= thresh) & (mag > 0))
    step = step / step.abs().sum(1, keepdim=True).clamp_min(1.0)
    return step.view_as(grad)


def _pgd_once(model, x, y, eps, norm, steps, step_size, random_start, generator, eot_samples, l1_sparsity):
    if random_start:
        if norm == "linf":
            delta = (2 * rand_uniform(x.shape, generator, x) - 1) * eps
        else:  # a random direction at a random radius inside the ball
            radius = rand_uniform((x.shape[0],), generator, x) * eps
            delta = unit_sphere(x, norm, generator) * per_sample(radius, x)
        x_adv = perturb(x, delta, eps, norm)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y, eot_samples)
        if norm == "linf":
            step = grad.sign()
        elif norm == "l2":
            step = grad / per_sample(lp_norm(grad, "l2").clamp_min(1e-12), grad)
        else:
            step = _l1_step(grad, x_adv, l1_sparsity)
        x_adv = perturb(x, x_adv + step_size * step - x, eps, norm)
    return x_adv


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    eot_samples: int = 1,
    l1_sparsity: float = 0.99,
) -> torch.Tensor:
    """Projected gradient descent maximizing the cross-entropy (Madry et al. 2018).

    Linf steps along the gradient sign; L2 along the L2-normalized gradient; L1 along the
    sparse L1 descent direction (top ``1 - l1_sparsity`` coordinates), followed by the exact
    L1-ball projection and the [0, 1] clip.

    Args:
        model: Maps a float32 batch in [0, 1] to logits.
        x: Clean images (N, C, H, W) in [0, 1].
        y: True labels (N,).
        eps: Radius of the ball, in [0, 1] pixel units, in ``norm``.
        norm: "linf", "l2" or "l1".
        steps: Gradient steps per restart.
        step_size: Step length in ``norm``; default 3/40 * eps (the paper's setting: 20
            steps travel 1.5 * eps in total).
        restarts: Random restarts. Only samples not yet fooled are attacked again, so a
            sample keeps its first successful adversarial, otherwise the last restart's. One
            restart (adversarial training's case) attacks the whole batch as it is: no index
            gather or scatter, and no value read back to the host (which would make it wait
            for the device at every step).
        random_start: Start from a random point of the ball (else from x).
        generator: Source of the random starts (reproducible runs).
        eot_samples: Forward/backward passes averaged per step (Expectation over
            Transformation, for randomized defenses).
        l1_sparsity: Fraction of coordinates left out of each L1 step (0.99: top 1%).

    Returns:
        Adversarial images, same shape as x, float32.
    """
    check_norm(norm)
    x = x.detach().float()
    step_size = 3 / 40 * eps if step_size is None else step_size
    once = (eps, norm, steps, step_size, random_start, generator, eot_samples, l1_sparsity)
    with eval_mode(model):
        if restarts <= 1:  # every step of adversarial training: no success check, nothing read back
            return _pgd_once(model, x, y, *once)
        return _pgd_restarts(model, x, y, restarts, once)


def _pgd_restarts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, restarts: int, once: tuple) -> torch.Tensor:
    """``restarts`` runs of :func:`_pgd_once` (arguments ``once``), each on the samples not yet fooled."""
    x_best = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for r in range(max(1, restarts)):
        idx = (~fooled).nonzero().squeeze(1)  # reads the count back: the host waits for the device
        if idx.numel() == 0:
            break
        adv = _pgd_once(model, x[idx], y[idx], *once)
        x_best[idx] = adv
        if r < restarts - 1:  # the last restart needs no success check
            fooled[idx] = _predict(model, adv) != y[idx]
    return x_best


def trades_examples(
    model: nn.Module,
    x: torch.Tensor,
    p_clean: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
) -> torch.Tensor:
    """TRADES' adversarial images (Zhang et al. 2019): Linf PGD on KL(p_clean || f(x')).

    Starts from ``x + 0.001 * N(0, I)`` (torch's global RNG, so a resumed run replays it) and
    needs no label: it pushes the prediction away from the clean one, ``p_clean`` (the model's
    softmax on ``x``, detached).
    """
    x = x.detach().float()
    loss_fn = _kl_from(p_clean.detach().float())
    with eval_mode(model):
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
        for _ in range(steps):
            grad = _input_grad(model, x_adv, p_clean, loss_fn=loss_fn)
            x_adv = perturb(x, x_adv + step_size * grad.sign() - x, eps, "linf")
    return x_adv


def cw_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    lr: float = 0.01,
    max_norm: float | None = None,
) -> torch.Tensor:
    """Carlini-Wagner L2 attack (2017), untargeted, fixed c, optimized with Adam in tanh space.

    Minimizes ``||x' - x||_2^2 + c * max(z_y - max_{i!=y} z_i, -kappa)`` over
    ``x' = (tanh(w) + 1) / 2``, which keeps x' in [0, 1] without clipping.

    Args:
        c: Weight of the misclassification term (no binary search).
        kappa: Required confidence margin of a success.
        steps: Adam steps.
        lr: Adam learning rate.
        max_norm: If set, the final perturbation is projected onto this L2 ball (the paper
            reports C&W at a fixed L2 budget); the projected image may no longer fool.

    Returns:
        Per sample, the smallest-L2 successful iterate, else the original image.
    """
    x = x.detach().float()
    w = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    best = x.clone()
    best_l2 = torch.full((x.shape[0],), float("inf"), device=x.device)
    with eval_mode(model):
        for _ in range(steps):
            with torch.enable_grad():
                x_adv = (torch.tanh(w) + 1) / 2
                l2 = (x_adv - x).flatten(1).pow(2).sum(1)
                margin = margin_loss(model(x_adv).float(), y)
                loss = (l2 + c * margin.clamp_min(-kappa)).sum()
                w.grad = torch.autograd.grad(loss, w)[0]
            with torch.no_grad():  # bookkeeping on the iterate just evaluated
                better = (margin < -kappa) & (l2 < best_l2)
                best[better] = x_adv[better]
                best_l2[better] = l2[better]
            optimizer.step()
    best = best.detach()
    if max_norm is not None:
        best = perturb(x, best - x, max_norm, "l2")
    return best


class EOT(nn.Module):
    """Averages a randomized model's logits over ``samples`` forward passes.

    For evaluation (a smoothed prediction) or for attacking the averaged logits. For the usual
    EOT attack, which averages the loss gradient instead, use ``pgd(..., eot_samples=n)``.
    """

    def __init__(self, model: nn.Module, samples: int = 10) -> None:
        super().__init__()
        self.model = model
        self.samples = int(samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)
