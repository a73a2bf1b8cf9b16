"""Robustness metrics: clean and robust accuracy, RobustART's AR, the per-sample worst case."""

from __future__ import annotations

import torch


def robust_metrics(clean_correct: torch.Tensor, adv_correct: torch.Tensor) -> dict[str, float]:
    """Clean accuracy, robust accuracy and RobustART's AR, all in percent.

    AR = #(clean-correct and adv-correct) / #(clean-correct) x 100: the share of the correctly
    classified samples that survive the attack. When nothing is clean-correct AR is undefined
    and reported as NaN (not 0, which would read as "no robustness").

    Args:
        clean_correct: Bool per sample (N,), or per draw and sample (D, N).
        adv_correct: Same; the two broadcast. With a draw axis the metrics are computed per
            draw and averaged (expected accuracy / expected AR).
    """
    clean, adv = torch.broadcast_tensors(clean_correct.bool(), adv_correct.bool())
    if clean.numel() == 0:
        raise ValueError("robust_metrics: no samples")
    clean, adv = clean.reshape(-1, clean.shape[-1]).cpu(), adv.reshape(-1, adv.shape[-1]).cpu()
    n_clean = clean.sum(1).double()
    both = (clean & adv).sum(1).double()
    ar = torch.where(n_clean > 0, both / n_clean.clamp_min(1), torch.full_like(n_clean, float("nan")))
    return {
        "clean_acc": 100.0 * clean.double().mean().item(),
        "robust_acc": 100.0 * adv.double().mean().item(),
        "ar": 100.0 * ar.mean().item(),
    }


def worst_case(correct_by_attack: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample AND over attacks: a sample is robust only if it survives every attack."""
    if not correct_by_attack:
        raise ValueError("worst_case: no attacks given")
    tensors = torch.broadcast_tensors(*[t.bool() for t in correct_by_attack.values()])
    return torch.stack(tensors).all(0)
