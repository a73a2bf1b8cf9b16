"""Adversarial training: the loss of one batch under ``train.adv.mode``.

* ``none``: the clean loss.
* ``fgsm_reg``: the clean loss mixed with the loss on FGSM images from ``x`` (Goodfellow et al.
  2015; the 2nd-place team's regularizer), ``train.adv.weight`` on the adversarial part.
* ``fgsm_rs``: fast adversarial training (Wong, Rice & Kolter 2020): one FGSM step of 1.25 eps
  from a uniform random start in the eps-ball; trains on the adversarial images only.
* ``pgd``: PGD-AT (Madry et al. 2018): ``train.adv.steps`` steps from a random start.
* ``trades``: TRADES (Zhang et al. 2019): clean loss + ``beta`` x KL(f(x) || f(x')), x' found by
  PGD on that KL.

With AugMix's consistency loss (``aug.augmix.jsd_weight > 0``) a batch holds three views of each
image (clean, AugMix, AugMix): :func:`consistency_loss` trains on them, the clean view replaced by
its adversarial example under ``fgsm_rs`` and ``pgd``.

With two views of each image (``aug.views=2``: the loader's and its device-augmented copy),
:func:`paired_loss` attacks both and trains on both, plus ``train.adv.consistency`` x the
Jensen-Shannon divergence between the two predictions (DAJAT's consistency between adversarial
views, Addepalli et al. 2022).

The attack runs on the unwrapped network in eval mode (no drop-path, no gradient sync across
processes: each process attacks its own batch), with the loss in float32, and never through GCM
(its gradient is noise by design). Its random starts come from torch's global RNG, seeded per
process (``train.setup.seed_process``: each GPU draws its own) and saved in the checkpoints, so a
run resumed mid-epoch replays them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attacks import eval_mode, fgsm, pgd, trades_examples
from core.config import AdvConfig


def eps_at(adv: AdvConfig, epoch: float) -> float:
    """The attack radius at ``epoch`` (fractional): ramped linearly from 0 over ``warmup_epochs``."""
    if adv.warmup_epochs <= 0:
        return adv.eps
    return adv.eps * min(1.0, max(0.0, epoch) / adv.warmup_epochs)


def step_size_of(adv: AdvConfig, eps: float) -> float:
    """The step of ``adv.mode`` at radius ``eps`` (``adv.step_size`` scales with the warm-up)."""
    if adv.step_size > 0:
        return adv.step_size * eps / adv.eps
    if adv.mode == "fgsm_rs":
        return 1.25 * eps
    if adv.mode in ("pgd", "trades"):
        return 2.5 * eps / adv.steps
    return eps


def adversarial_loss(
    model: nn.Module,
    attack_model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    adv: AdvConfig,
    epoch: float,
    paired: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of one batch (call it under the accelerator's autocast).

    Args:
        model: The network as trained (wrapped for distributed training).
        attack_model: The same network unwrapped, to craft with.
        loss_fn: The classification loss (label smoothing, soft targets).
        x: Images in [0, 1].
        targets: Labels (or soft targets with mixup, fgsm_reg only).
        adv: The ``train.adv`` section.
        epoch: Where training stands, in epochs (for the eps warm-up).
        paired: A second view of each image of ``x`` (``aug.views=2``): :func:`paired_loss`.
    """
    if paired is not None:
        return paired_loss(model, attack_model, loss_fn, x, paired, targets, adv, epoch)
    if x.dim() == 5:
        return consistency_loss(model, attack_model, loss_fn, x, targets, adv, epoch)
    if adv.mode == "none":
        return loss_fn(model(x), targets)
    eps = eps_at(adv, epoch)
    if eps <= 0:  # the first step of a warm-up: nothing to craft yet
        return loss_fn(model(x), targets)
    step = step_size_of(adv, eps)
    if adv.mode == "fgsm_reg":
        x_adv = fgsm(attack_model, x, targets, eps)
        clean, attacked = model(torch.cat([x, x_adv])).chunk(2)
        return (1 - adv.weight) * loss_fn(clean, targets) + adv.weight * loss_fn(attacked, targets)
    if adv.mode == "fgsm_rs":
        return loss_fn(model(pgd(attack_model, x, targets, eps, steps=1, step_size=step)), targets)
    if adv.mode == "pgd":
        return loss_fn(model(pgd(attack_model, x, targets, eps, steps=adv.steps, step_size=step)), targets)
    if adv.mode == "trades":
        with torch.no_grad(), eval_mode(attack_model):  # the reference crafts against the eval-mode prediction
            p_clean = F.softmax(attack_model(x).float(), dim=1)
        x_adv = trades_examples(attack_model, x, p_clean, eps, adv.steps, step)
        clean, attacked = model(torch.cat([x, x_adv])).float().chunk(2)
        kl = F.kl_div(F.log_softmax(attacked, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return loss_fn(clean, targets) + adv.beta * kl
    raise ValueError(f"unknown train.adv.mode {adv.mode!r}")


def consistency_loss(
    model: nn.Module,
    attack_model: nn.Module,
    loss_fn: nn.Module,
    views: torch.Tensor,
    targets: torch.Tensor,
    adv: AdvConfig,
    epoch: float,
) -> torch.Tensor:
    """AugMix's loss on N x 3 x C x H x W views (clean, AugMix, AugMix), in one forward.

    ``loss_fn`` is timm's ``JsdCrossEntropy``: cross-entropy on the first view plus the weighted
    Jensen-Shannon divergence between the three predictions. Under ``fgsm_rs`` and ``pgd`` the
    first view is the adversarial example of the clean image, so the classifier trains on the
    attack (as without AugMix) and the AugMix views are pulled towards its prediction; the AugMix
    views themselves are not attacked (that would double the cost of every step).
    """
    clean, *mixed = views.unbind(1)
    clean = attacked_view(attack_model, clean, targets, adv, epoch, "AugMix consistency loss")
    return loss_fn(model(torch.cat([clean, *mixed])), targets)


def attacked_view(
    attack_model: nn.Module, x: torch.Tensor, targets: torch.Tensor, adv: AdvConfig, epoch: float, loss: str
) -> torch.Tensor:
    """``x`` replaced by its adversarial example under ``fgsm_rs`` / ``pgd`` (unchanged under ``none``
    or while the eps ramp is at 0); the other modes train on two views of their own, so a ``loss``
    built on views has no meaning for them (validate_config refuses the combination)."""
    eps = eps_at(adv, epoch)
    if adv.mode in ("fgsm_rs", "pgd") and eps > 0:
        steps = 1 if adv.mode == "fgsm_rs" else adv.steps
        return pgd(attack_model, x, targets, eps, steps=steps, step_size=step_size_of(adv, eps))
    if adv.mode not in ("none", "fgsm_rs", "pgd"):
        raise ValueError(f"train.adv.mode={adv.mode} has no {loss} (validate_config refuses it)")
    return x


def paired_loss(
    model: nn.Module,
    attack_model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    paired: torch.Tensor,
    targets: torch.Tensor,
    adv: AdvConfig,
    epoch: float,
) -> torch.Tensor:
    """The loss on two views of every image, in one attack and one forward.

    Under ``pgd`` / ``fgsm_rs`` both views are replaced by their adversarial examples (one attack on
    the 2N batch: its loss is a sum over images, so each view is attacked on its own); the loss is the
    classification loss over all 2N plus ``adv.consistency`` x the Jensen-Shannon divergence between
    the two views' predictions (DAJAT's term; ``mode=none`` compares the clean predictions).
    """
    labels = torch.cat([targets, targets])
    both = attacked_view(attack_model, torch.cat([x, paired]), labels, adv, epoch, "two-view loss")
    logits = model(both)
    loss = loss_fn(logits, labels)
    if adv.consistency > 0:
        loss = loss + adv.consistency * js_divergence(*logits.float().chunk(2))
    return loss


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between the softmax predictions of two logit batches (batch mean)."""
    p, q = F.softmax(a, dim=1), F.softmax(b, dim=1)
    log_mixture = ((p + q) / 2).clamp(1e-7, 1).log()
    return (F.kl_div(log_mixture, p, reduction="batchmean") + F.kl_div(log_mixture, q, reduction="batchmean")) / 2
