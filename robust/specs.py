"""The attacks ``./run.sh evaluate`` runs: one table, read by the runner, the stage and the report.

Each entry says what an ``eval.attacks`` name means: its column title, its norm, which
``eval`` keys hold its budget and its number of steps, and how to craft it. The config's list
of valid names (``robust.config.EVAL_ATTACKS``) is checked against this table by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from attacks import cw_l2, fgsm, pgd, random_noise
from robust.autoattack import autoattack, square
from robust.config import EvalConfig

# (model, x, y, eps, eval section, generator, EOT samples) -> adversarial images
Craft = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, EvalConfig, torch.Generator, int], torch.Tensor]


def _fgsm(model, x, y, eps, e, generator, eot):
    return fgsm(model, x, y, eps, eot_samples=eot)


def _pgd(norm: str) -> Craft:
    def craft(model, x, y, eps, e, generator, eot):
        return pgd(
            model,
            x,
            y,
            eps,
            norm=norm,
            steps=e.steps,
            step_size=e.step_ratio * eps,
            restarts=e.restarts,
            generator=generator,
            eot_samples=eot,
        )

    return craft


def _cw(model, x, y, eps, e, generator, eot):
    return cw_l2(model, x, y, steps=e.cw_steps, max_norm=eps)


def _autoattack(model, x, y, eps, e, generator, eot):
    return autoattack(model, x, y, eps, e, eot)


def _square(model, x, y, eps, e, generator, eot):
    return square(model, x, y, eps, e.square_queries, e.seed)


def _noise(model, x, y, eps, e, generator, eot):
    return random_noise(x, eps, norm="linf", generator=generator)


@dataclass(frozen=True)
class AttackSpec:
    """What one ``eval.attacks`` name runs.

    Attributes:
        name: The name in ``eval.attacks``.
        title: Column title in the tables.
        norm: ``linf``, ``l2`` or ``l1``: the ball its images stay in.
        budget_key: The ``eval`` key holding its eps; ``budget_fallback`` when that is 0.
        steps_key: The ``eval`` key holding its iterations (queries for Square); ``None``:
            ``fixed_steps``.
        paper: A column of the paper's main table (run on all three model rows); otherwise
            it runs on the defended model only (black box, transfer, noise).
        craft: How to craft it; ``None`` for ``transfer`` (PGD-Linf crafted on another model).
    """

    name: str
    title: str
    norm: str
    budget_key: str
    steps_key: str | None
    paper: bool
    craft: Craft | None
    budget_fallback: str | None = None
    fixed_steps: int = 0

    def budget(self, e: EvalConfig) -> float:
        value = getattr(e, self.budget_key)
        return float(value if value > 0 or self.budget_fallback is None else getattr(e, self.budget_fallback))

    def steps(self, e: EvalConfig) -> int:
        return int(getattr(e, self.steps_key)) if self.steps_key else self.fixed_steps


SPECS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        # The paper's white-box columns, in its order.
        AttackSpec("fgsm", "FGSM", "linf", "eps_linf", None, True, _fgsm, fixed_steps=1),
        AttackSpec("pgd_l1", "PGD-L1", "l1", "eps_l1", "steps", True, _pgd("l1")),
        AttackSpec("pgd_l2", "PGD-L2", "l2", "eps_l2", "steps", True, _pgd("l2")),
        AttackSpec("pgd_linf", "PGD-Linf", "linf", "eps_linf", "steps", True, _pgd("linf")),
        AttackSpec("cw_l2", "C&W", "l2", "cw_max_norm", "cw_steps", True, _cw, budget_fallback="eps_l2"),
        # The field's standard, beside the paper's columns (and in each row's worst case).
        AttackSpec("autoattack", "AutoAttack", "linf", "eps_linf", "aa_iters", True, _autoattack),
        # On the defended model only.
        AttackSpec("square", "Square", "linf", "eps_linf", "square_queries", False, _square),
        AttackSpec("transfer", "transfer", "linf", "eps_linf", "steps", False, None),
        AttackSpec("noise", "random noise", "linf", "eps_linf", None, False, _noise),
    )
}

PAPER_COLUMNS = tuple(spec for spec in SPECS.values() if spec.paper)
