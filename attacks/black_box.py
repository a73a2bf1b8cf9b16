"""Attacks that need no gradient: the Square attack (score-based) and the random-noise baseline.

Forward passes only, so gradient masking cannot affect them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attacks.gradient import eval_mode, margin_loss
from attacks.norms import check_norm, per_sample, perturb, rand_sign, rand_uniform, unit_sphere


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    """Schedule of the fraction of pixels changed per query (reference implementation)."""
    it = int(it / n_iters * 10000)
    for bound, div in (
        (10, 1),
        (50, 2),
        (200, 4),
        (500, 8),
        (1000, 16),
        (2000, 32),
        (4000, 64),
        (6000, 128),
        (8000, 256),
        (10000, 512),
    ):
        if it <= bound:
            return p_init / div
    return p_init


@torch.no_grad()
def square_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int = 1000,
    p_init: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Square Attack, Linf (Andriushchenko et al. 2020): score-based black box.

    Starts from vertical stripes of +-eps, then proposes random squares of +-eps (one sign
    per channel) of shrinking size and keeps a proposal when it lowers the margin loss
    (true logit minus best other logit). Forward passes only, so gradient masking cannot
    affect it. A sample stops as soon as it is misclassified; samples misclassified on the
    clean image are returned unchanged.

    Args:
        queries: Forward passes per sample after the clean one (including the stripes).
        p_init: Initial fraction of pixels in a square.

    Returns:
        Adversarial images, same shape as x.
    """
    x = x.detach().float()
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    with eval_mode(model):
        x_best = x.clone()
        margin = margin_loss(model(x).float(), y)
        idx = (margin > 0).nonzero().squeeze(1)
        if idx.numel():
            stripes = (x[idx] + eps * rand_sign((idx.numel(), c, 1, w), generator, x)).clamp(0, 1)
            x_best[idx] = stripes
            margin[idx] = margin_loss(model(stripes).float(), y[idx])
        for it in range(queries - 1):
            idx = (margin > 0).nonzero().squeeze(1)
            k = idx.numel()
            if k == 0:
                break
            xc, xb = x[idx], x_best[idx]
            s = int(round(math.sqrt(_square_p(p_init, it, queries) * h * w)))
            s = min(max(s, 1), min(h, w) - 1) if min(h, w) > 1 else 1
            top = (rand_uniform((k,), generator, x) * (h - s + 1)).long()
            left = (rand_uniform((k,), generator, x) * (w - s + 1)).long()
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)
            window = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (k, 1, h, w)
            delta = xb - xc
            redraw = torch.ones(k, dtype=torch.bool, device=x.device)
            # Redraw the square's signs while the proposal equals the current image (e.g. the
            # same signs again, or a clipped corner), as the reference code does.
            for _ in range(10):
                signs = rand_sign((k, c, 1, 1), generator, x)
                delta = torch.where(window & per_sample(redraw, delta), eps * signs, delta)
                x_new = (xc + delta).clamp(0, 1)
                changed = (((x_new - xb).abs() > 1e-7) & window).flatten(1).any(1)
                redraw &= ~changed
                if not redraw.any():
                    break
            new_margin = margin_loss(model(x_new).float(), y[idx])
            better = new_margin < margin[idx]
            x_best[idx[better]] = x_new[better]
            margin[idx[better]] = new_margin[better]
    return x_best


def random_noise(
    x: torch.Tensor,
    eps: float,
    norm: str = "linf",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random-noise baseline: a random point on the sphere of radius eps (the full budget:
    random signs for linf, uniform directions for l2/l1), clipped to [0, 1]."""
    x = x.detach().float()
    return perturb(x, eps * unit_sphere(x, check_norm(norm), generator), eps, norm)
