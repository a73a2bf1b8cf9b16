"""The random-noise baseline: what plain noise of the attack's full budget does (no model involved)."""

from __future__ import annotations

import torch

from attacks.norms import check_norm, perturb, unit_sphere


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
