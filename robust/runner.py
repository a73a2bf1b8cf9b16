"""Crafting and scoring, batch by batch: the one way ``evaluate`` runs an attack on a model.

``craft`` makes the adversarial images of one attack from :data:`robust.specs.SPECS` (BPDA
through GCM and EOT over the random layer when ``adaptive``) and checks every image stays in
its budget; ``score`` says which images a model gets right, averaged over draws of a
randomized model.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from attacks import EOT, eval_mode, lp_norm
from core.config import Config
from gcm import DefendedModel, bpda
from robust import autoattack
from robust.specs import SPECS, AttackSpec

_ULP = float(torch.finfo(torch.float32).eps)  # spacing of float32 numbers at 1.0


def check_budget(spec: AttackSpec, x: torch.Tensor, adv: torch.Tensor, eps: float) -> None:
    """Raise if an adversarial image left its eps-ball or [0, 1] (a bug in an attack, never a result)."""
    size = float(lp_norm(adv - x, spec.norm).max()) if len(x) else 0.0
    # x + delta is rounded to float32: up to one ulp at 1.0 per coordinate, summed by the norm.
    d = x[0].numel() if len(x) else 1
    tol = _ULP * {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d)}[spec.norm]
    if size > eps + tol or float(adv.min()) < 0.0 or float(adv.max()) > 1.0:
        raise RuntimeError(
            f"attack {spec.name} left its budget: {spec.norm} norm {size:.6g} > eps {eps:.6g}, "
            f"or pixels outside [0, 1] ({float(adv.min()):.4g}..{float(adv.max()):.4g})"
        )


class Overall:
    """A stage's work counted in units (attacks, images, variants): how far along it is and, at the
    pace so far, about how long the rest takes (units differ in cost, so it is a rough figure)."""

    def __init__(self, total: int, unit: str) -> None:
        self.total, self.unit, self.done = total, unit, 0
        self.start = time.perf_counter()

    def step(self, n: int = 1) -> str:
        """Count ``n`` more units done; returns "3/14 attacks, about 6 min left"."""
        self.done += n
        text = f"{self.done}/{self.total} {self.unit}"
        left = self.total - self.done
        if left > 0 and self.done:
            seconds = (time.perf_counter() - self.start) / self.done * left
            text += f", about {format_duration(seconds)} left"
        return text


def format_duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.0f} min"
        if seconds < 5400
        else f"{seconds / 3600:.1f} h"
    )


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``: every batch draws on its own, so the result does not depend on
    how the batches are spread over processes."""
    return seed * 1_000_003 + index


def spread_batches(fn: Callable[[int], torch.Tensor], n: int, batch_size: int) -> list[torch.Tensor]:
    """``fn(start)`` for each batch ``[start, start + batch_size)`` of ``n`` items, in order.

    Under a multi-process launch (``./run.sh evaluate --num_processes N``, every GPU by default)
    each process computes every N-th batch and all of them receive every result (accelerate's
    ``gather_object``); every process must therefore make the same calls in the same order, which
    the stages do (the same config, images and results on every process).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    starts = list(range(0, n, batch_size))
    state = PartialState()
    if state.num_processes == 1:
        return [fn(start) for start in starts]
    mine = [(start, fn(start).cpu()) for start in starts[state.process_index :: state.num_processes]]
    return [t for _, t in sorted(gather_object(mine), key=lambda item: item[0])]


def craft(
    name: str,
    model: DefendedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: Config,
    *,
    eps: float | None = None,
    adaptive: bool = False,
    progress: bool = False,
    desc: str = "",
    spec: AttackSpec | None = None,
) -> torch.Tensor:
    """Adversarial images of attack ``name`` against ``model``, batch by batch (returned on CPU).

    ``spec`` runs an attack outside :data:`SPECS` the same way (the Phase-II-like draws).

    ``adaptive`` attacks the defense as it is: BPDA (straight-through gradient) through GCM and,
    when the model has the random resize-pad layer, ``eval.eot_samples`` gradient samples per
    step (C&W attacks the logits averaged over that many draws). The result is checked to lie
    in the eps-ball and in [0, 1]. Each batch draws its random start and the random layer's boxes
    from its own seed (:func:`batch_seed`), so the batches can be spread over processes.
    """
    spec = SPECS[name] if spec is None else spec
    eps = spec.budget(cfg.eval) if eps is None else float(eps)
    eot = cfg.eval.eot_samples if adaptive and model.randomized else 1
    target = EOT(model, eot) if name == "cw_l2" and eot > 1 else model
    device = next(model.parameters()).device
    bs = cfg.eval.batch_size
    # In images (this process's batches): a one-batch attack still says how much it has to do.
    bar = tqdm(total=len(x), desc=desc or name, unit="img", disable=not progress, leave=False)

    def one(start: int) -> torch.Tensor:
        seed = batch_seed(cfg.eval.seed, start // bs)
        generator = torch.Generator().manual_seed(seed)
        model.reseed(seed)
        xb, yb = x[start : start + bs].to(device).float(), y[start : start + bs].to(device)
        adv = spec.craft(target, xb, yb, eps, cfg.eval, generator, eot).detach().cpu()
        bar.update(len(xb))
        return adv

    autoattack.on_part = bar.set_postfix_str if progress else None
    try:
        with bpda(model) if adaptive else contextlib.nullcontext():
            adv = torch.cat(spread_batches(one, len(x), bs)) if len(x) else x.clone()
    finally:
        autoattack.on_part = None
        bar.close()
    check_budget(spec, x, adv, eps)
    return adv


@torch.no_grad()
def score(model: DefendedModel, x: torch.Tensor, y: torch.Tensor, cfg: Config, spread: bool = True) -> torch.Tensor:
    """Correctness per image (N,), or per draw and image (draws, N) for a randomized model.

    Scoring draws are seeded apart from the attack's (``eval.seed + 1``): the attacker does not
    get to know the defender's draws. Clean and adversarial images see the same draws.
    ``spread=False`` scores on this process alone (a caller that spreads its own work).
    """
    draws = cfg.eval.draws if model.randomized else 1
    device = next(model.parameters()).device
    bs = cfg.eval.batch_size

    def one(start: int) -> torch.Tensor:
        model.reseed(batch_seed(cfg.eval.seed + 1, start // bs))
        xb, yb = x[start : start + bs].to(device), y[start : start + bs].to(device)
        return torch.stack([model(xb).argmax(1) == yb for _ in range(draws)]).cpu()

    with eval_mode(model):
        if spread:
            parts = spread_batches(one, len(x), bs)
        else:
            parts = [one(start) for start in range(0, len(x), bs)]
    out = torch.cat(parts, dim=1) if parts else torch.zeros(draws, 0, dtype=torch.bool)
    return out[0] if draws == 1 else out


def accuracy(correct: torch.Tensor) -> float:
    """Percent correct (over draws too, for a randomized model's correctness)."""
    return 100.0 * float(correct.float().mean())
