"""Adversarial attacks in [0, 1] pixel space, torch only: what evaluation and adversarial training craft with."""

from attacks.gradient import EOT, cw_l2, eval_mode, fgsm, pgd, trades_examples
from attacks.noise import random_noise
from attacks.norms import NORMS, lp_norm, project, project_l1_ball
from attacks.transfer import ATTACK_KINDS, craft_attack, draw_attack, draw_attacks, input_diversity, mi_fgsm

__all__ = [
    "ATTACK_KINDS",
    "EOT",
    "NORMS",
    "craft_attack",
    "cw_l2",
    "draw_attack",
    "draw_attacks",
    "eval_mode",
    "fgsm",
    "input_diversity",
    "lp_norm",
    "mi_fgsm",
    "pgd",
    "project",
    "project_l1_ball",
    "random_noise",
    "trades_examples",
]
