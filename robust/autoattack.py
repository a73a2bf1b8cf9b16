"""AutoAttack and its Square attack, from their authors' package (``pyautoattack``).

AutoAttack (Croce & Hein 2020) is the field's standard robustness check: parameter-free APGD
on cross-entropy, targeted APGD on the DLR loss, targeted FAB and the score-based Square
attack, each run on the images the previous ones left standing. ``evaluate`` runs it through
:func:`robust.runner.craft` like any other attack, so the adaptive row gets BPDA through GCM,
and a randomized model meets the ``rand`` version (APGD with EOT).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from pyautoattack import AutoAttack
from pyautoattack.square import SquareAttack
from torch import nn

from robust.config import EvalConfig

# The package reports through this logger; our tables say what it found.
logging.getLogger("auto-attack").setLevel(logging.ERROR)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


def _set_iterations(apgd, n_iter: int) -> None:
    """APGD's iteration budget, with the step-size schedule its constructor derives from it
    (checkpoints at 22% of the budget, shrinking by 3% down to 6%): setting ``n_iter`` alone
    after construction would keep the schedule of the old budget."""
    apgd.n_iter = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def create_autoattack(model: nn.Module, x: torch.Tensor, eps: float, e: EvalConfig, eot: int = 1) -> AutoAttack:
    """AutoAttack on ``model`` at Linf ``eps``, set up as ``eval.aa_*`` asks.

    ``aa_version=standard`` keeps the authors' exact budgets (``rand`` with EOT when ``eot`` > 1);
    ``custom`` runs ``aa_attacks`` with ``aa_iters`` iterations, ``aa_target_classes`` targets
    and ``aa_queries`` Square queries (and ``eot`` gradient samples per APGD step). Targets are
    capped at the number of other classes.
    """
    targets = _num_classes(model, x) - 1
    if e.aa_version == "standard":
        version, attacks = ("rand" if eot > 1 else "standard"), None
    else:
        version, attacks = "custom", list(e.aa_attacks)
    aa = AutoAttack(model, attacks=attacks, device=x.device, eps=eps, norm="Linf", seed=e.seed, version=version)
    if version == "custom":
        for apgd in (aa.apgd, aa.apgd_targeted):
            _set_iterations(apgd, e.aa_iters)
        aa.fab.n_iter = e.aa_iters
        aa.apgd.n_restarts = aa.apgd_targeted.n_restarts = aa.fab.n_restarts = 1
        aa.apgd.eot_iter = aa.apgd_targeted.eot_iter = eot
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = e.aa_target_classes
        aa.square.n_queries = e.aa_queries
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, targets)
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, targets)
    return aa


# Set by robust.runner.craft while a progress bar shows: told as each of AutoAttack's parts starts
# (they run one after the other on the whole batch, often minutes each).
on_part: Callable[[str], None] | None = None


def report_parts(aa: AutoAttack) -> None:
    """Call :data:`on_part` with "APGD-T (2/4 parts)" as each part of ``aa`` starts."""
    if on_part is None:
        return
    total, started = len(aa.attacks_to_run), []
    for label, attack in (("APGD", aa.apgd), ("APGD-T", aa.apgd_targeted), ("FAB", aa.fab), ("Square", aa.square)):

        def perturb(*args, _label=label, _original=attack.perturb, **kwargs):
            started.append(_label)
            if on_part is not None:
                on_part(f"{_label} ({len(started)}/{total} parts)")
            return _original(*args, **kwargs)

        attack.perturb = perturb


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, e: EvalConfig, eot: int = 1):
    """AutoAttack's adversarial images of ``x`` (the clean image where every attack failed)."""
    aa = create_autoattack(model, x, eps, e, eot)
    report_parts(aa)
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
    return x_adv.detach()


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int, seed: int) -> torch.Tensor:
    """The Square attack (Andriushchenko et al. 2020, Linf) as AutoAttack runs it, with ``queries`` queries.

    Forward passes only, so gradient masking cannot affect it. Its initial square size
    (``p_init=0.8``) and size schedule (rescaled to the query budget) are the reference ones.
    """
    attack = SquareAttack(
        model, norm="Linf", n_queries=queries, eps=eps, p_init=0.8, n_restarts=1, seed=seed, device=x.device
    )
    with torch.no_grad():
        return attack.perturb(x, y).detach()
