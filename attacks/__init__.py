"""Adversarial attacks in [0, 1] pixel space, torch only: what evaluation and adversarial training craft with."""

from attacks.black_box import random_noise, square_linf
from attacks.gradient import EOT, cw_l2, eval_mode, fgsm, pgd
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
    "square_linf",
]
