"""Lp balls in pixel space: norms, projections, random directions and starts.

Every attack keeps ``x + delta`` inside the eps-ball of ``x`` in its norm and inside the
[0, 1] box; these are the pieces that guarantee it.
"""

from __future__ import annotations

import math

import torch

NORMS = ("linf", "l2", "l1")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def rand_uniform(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) noise drawn on the generator's device (a CPU generator also serves CUDA inputs)."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def rand_sign(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return torch.where(rand_uniform(shape, generator, like) < 0.5, -1.0, 1.0)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (N,) to broadcast against a batch (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a batch of perturbations, shape (N,), in delta's dtype.

    L1/L2 sums are accumulated in float64: over ~150k coordinates a float32 sum drifts by
    ~1e-6 relative, enough to make a projected perturbation look outside its ball.
    """
    flat = delta.flatten(1)
    if check_norm(norm) == "linf":
        return flat.abs().amax(1)
    return flat.double().norm(p=2 if norm == "l2" else 1, dim=1).to(delta.dtype)


def unit_sphere(like: torch.Tensor, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """Random directions of unit norm: random signs (linf), normalized Gaussian (l2) or
    normalized Laplace (l1) noise; the last two are uniform on their spheres."""
    if norm == "linf":
        return rand_sign(like.shape, generator, like)
    u = rand_uniform(like.shape, generator, like)
    if norm == "l2":  # Box-Muller: Gaussian noise from the same generator
        v = rand_uniform(like.shape, generator, like)
        d = torch.sqrt(-2 * torch.log1p(-u)) * torch.cos(2 * math.pi * v)
    else:  # Laplace: exponential magnitude, random sign
        d = -torch.log1p(-u) * rand_sign(like.shape, generator, like)
    return d / per_sample(lp_norm(d, norm).clamp_min(1e-12), d)


def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each sample onto the L1 ball of radius eps (Duchi et al. 2008).

    Soft-thresholds |delta| by the theta that makes the L1 norm exactly eps; samples already
    inside the ball are returned unchanged. Computed in float64 so the cumulative sums over
    ~150k coordinates do not drift past the radius.
    """
    flat = delta.flatten(1).double()
    mag = flat.abs()
    inside = mag.sum(1) <= eps
    srt = mag.sort(dim=1, descending=True).values
    cssv = srt.cumsum(1)
    j = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    # rho = the largest j with srt_j > (cssv_j - eps) / j; the condition holds on a prefix.
    rho = ((srt * j > cssv - eps) * j).amax(1).clamp_min(1)
    theta = (cssv.gather(1, rho.long().unsqueeze(1) - 1).squeeze(1) - eps) / rho
    out = flat.sign() * (mag - theta.unsqueeze(1)).clamp_min(0)
    out = torch.where(inside.unsqueeze(1), flat, out)
    return out.to(delta.dtype).view_as(delta)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project a batch of perturbations onto the eps-ball of ``norm`` (per sample)."""
    if check_norm(norm) == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        scale = (eps / lp_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
        return delta * per_sample(scale, delta)
    return project_l1_ball(delta, eps)


def perturb(x: torch.Tensor, delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """x + delta projected onto the ball, then clipped to the box. Clipping only moves each
    coordinate of delta towards 0 (x is in the box), so every norm can only shrink: the
    result stays in the ball."""
    return (x + project(delta, eps, norm)).clamp(0.0, 1.0)
