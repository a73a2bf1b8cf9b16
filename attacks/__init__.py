"""Adversarial attacks in [0, 1] pixel space, torch only: what evaluation and adversarial training craft with."""

from attacks.gradient import EOT, cw_l2, eval_mode, fgsm, pgd, trades_examples
from attacks.noise import random_noise
from attacks.norms import NORMS, lp_norm, project, project_l1_ball

__all__ = [
    "EOT",
    "NORMS",
    "cw_l2",
    "eval_mode",
    "fgsm",
    "lp_norm",
    "pgd",
    "project",
    "project_l1_ball",
    "random_noise",
    "trades_examples",
]
