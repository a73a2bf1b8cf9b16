"""Crafting and scoring, batch by batch: the one way ``evaluate`` runs an attack on a model.

``craft`` makes the adversarial images of one attack from :data:`robust.specs.SPECS` (BPDA
through GCM and EOT over the random layer when ``adaptive``) and checks every image stays in
its budget; ``score`` says which images a model gets right, averaged over draws of a
randomized model.
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from attacks import EOT, eval_mode, lp_norm
from core.config import Config
from gcm import DefendedModel, bpda
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
    in the eps-ball and in [0, 1].
    """
    spec = SPECS[name] if spec is None else spec
    eps = spec.budget(cfg.eval) if eps is None else float(eps)
    eot = cfg.eval.eot_samples if adaptive and model.randomized else 1
    target = EOT(model, eot) if name == "cw_l2" and eot > 1 else model
    generator = torch.Generator().manual_seed(cfg.eval.seed)  # continues across batches
    device = next(model.parameters()).device
    bs = cfg.eval.batch_size
    model.reseed(cfg.eval.seed)
    out = []
    with bpda(model) if adaptive else contextlib.nullcontext():
        for i in tqdm(range(0, len(x), bs), desc=desc or name, disable=not progress, leave=False):
            xb, yb = x[i : i + bs].to(device).float(), y[i : i + bs].to(device)
            out.append(spec.craft(target, xb, yb, eps, cfg.eval, generator, eot).detach().cpu())
    adv = torch.cat(out)
    check_budget(spec, x, adv, eps)
    return adv


@torch.no_grad()
def score(model: DefendedModel, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Correctness per image (N,), or per draw and image (draws, N) for a randomized model.

    Scoring draws are seeded apart from the attack's (``eval.seed + 1``): the attacker does not
    get to know the defender's draws. Clean and adversarial images see the same draws.
    """
    draws = cfg.eval.draws if model.randomized else 1
    device = next(model.parameters()).device
    bs = cfg.eval.batch_size
    model.reseed(cfg.eval.seed + 1)
    parts = []
    with eval_mode(model):
        for i in range(0, len(x), bs):
            xb, yb = x[i : i + bs].to(device), y[i : i + bs].to(device)
            parts.append(torch.stack([model(xb).argmax(1) == yb for _ in range(draws)]).cpu())
    out = torch.cat(parts, dim=1)
    return out[0] if draws == 1 else out


def accuracy(correct: torch.Tensor) -> float:
    """Percent correct (over draws too, for a randomized model's correctness)."""
    return 100.0 * float(correct.float().mean())
