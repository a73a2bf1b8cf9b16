"""The Phase-II-like score of an exported file: ``phase2.draws`` white-box attacks with drawn settings.

Phase II of the challenge attacked each submitted model white-box with settings sampled at
random per submission (the 5th-place model scored 88.12 to 89.08 across reruns). The local twin
draws k settings, each item independently and uniformly from its list in ``phase2.attack``
(the same distribution type as the test set's transfer attacks, :func:`attacks.draw_attack`):

* attack: ``fgsm`` (one step of eps), ``pgd`` (random start, steps of 2.5 eps / steps),
  ``mifgsm`` (momentum, Dong et al. 2018), ``difgsm`` (momentum + input diversity, Xie et al.
  2019), see :func:`attacks.craft_attack`;
* norm: Linf or L2; budget: one of ``eps_linf`` / ``eps_l2`` for that norm; steps: one of ``steps``.

Each draw runs twice on the file itself (:mod:`phase2.score`): naive, as the organizers
attacked (gradients through the file's GCM), and adaptive (BPDA through the file's GCM, EOT
over its random pad with ``eval.eot_samples`` gradient samples). Per attacker: the accuracy of
each draw, their mean, min, max and standard deviation; the adaptive figures are the ones to
count.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn

from attacks import craft_attack, draw_attacks
from core.config import Config
from robust.runner import accuracy, craft, score
from robust.specs import AttackSpec


def draw_settings(cfg: Config) -> list[dict]:
    """The ``phase2.draws`` attack settings of ``phase2.seed``, in order."""
    return draw_attacks(cfg.phase2.seed, cfg.phase2.attack, cfg.phase2.draws)


def describe_setting(d: dict) -> str:
    eps = f"{d['eps'] * 255:.3g}/255" if d["norm"] == "linf" else f"{d['eps']:.3g}"
    steps = "1 step" if d["kind"] == "fgsm" else f"{d['steps']} steps"
    return f"{d['kind']} {d['norm']} eps {eps}, {steps}"


def create_spec(d: dict) -> AttackSpec:
    """An :class:`AttackSpec` for one drawn setting, so :func:`robust.runner.craft` runs it like any other."""
    generator = torch.Generator().manual_seed(d["seed"])  # the draw's own, continued across batches

    def run(model: nn.Module, x, y, eps, e, _generator, eot):
        return craft_attack(d["kind"], model, x, y, eps, d["norm"], d["steps"], generator, eot)

    return AttackSpec(
        f"draw_{d['kind']}", describe_setting(d), d["norm"], "eps_linf", None, False, run, fixed_steps=d["steps"]
    )


def summarize_draws(accs: Sequence[float]) -> dict:
    return {
        "mean": statistics.fmean(accs),
        "min": min(accs),
        "max": max(accs),
        "std": statistics.pstdev(accs),
        "accs": list(accs),
    }


def run_phase2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, progress: bool = False) -> dict:
    """Accuracy (%) under each drawn attack, naive and adaptive, and the summary over the draws."""
    draws = draw_settings(cfg)
    per_draw = []
    for i, d in enumerate(draws):
        row = {"setting": d, "title": describe_setting(d)}
        for attacker, adaptive in (("naive", False), ("adaptive", True)):
            start = time.perf_counter()
            adv = craft(f"draw_{d['kind']}", model, x, y, cfg, eps=d["eps"], adaptive=adaptive, spec=create_spec(d))
            row[attacker] = accuracy(score(model, adv, y, cfg))
            if progress:
                print(
                    f"  draw {i + 1}/{len(draws)} {row['title']}, {attacker}: {row[attacker]:.1f}% "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
        per_draw.append(row)
    return {
        "draws": per_draw,
        "naive": summarize_draws([r["naive"] for r in per_draw]),
        "adaptive": summarize_draws([r["adaptive"] for r in per_draw]),
        "distribution": {k: list(v) for k, v in vars(cfg.phase2.attack).items()},
        "seed": cfg.phase2.seed,
        "eot": bool(getattr(model, "randomized", False)),
    }


def format_phase2(result: dict) -> str:
    """The Phase-II-like section of ``eval_file.md``."""
    lines = [
        f"Phase-II-like score: {len(result['draws'])} white-box attacks with drawn settings "
        f"(phase2.seed {result['seed']}). Accuracy %:",
        "",
        f"| draw | naive (through the file's GCM) | adaptive (BPDA{' + EOT' if result['eot'] else ''}) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['title']} | {r['naive']:.1f} | {r['adaptive']:.1f} |" for r in result["draws"]]
    for key in ("mean", "min", "max", "std"):
        lines.append(f"| **{key}** | {result['naive'][key]:.1f} | {result['adaptive'][key]:.1f} |")
    return "\n".join(lines) + "\n"
