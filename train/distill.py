"""Distillation of an ensemble into one model (``train.distill``): robust soft labels, as RSLAD.

RSLAD (Zi, Zhao, Ma & Jiang, "Revisiting Adversarial Robustness Distillation: Robust Soft Labels
Make Student Better", ICCV 2021) trains the student on the teacher's soft labels of the *clean*
image only, on both the clean and the adversarial input::

    L = 5/6 * KL(S(x') || T(x)) + 1/6 * KL(S(x) || T(x)),

with ``x'`` found by PGD on ``KL(S(x') || T(x))`` (its inner maximisation: TRADES' attack with the
teacher's labels in place of the student's own; the authors' code, github.com/zibojia/RSLAD,
``rslad_loss.py``: from ``x + 0.001 N(0, I)``, sign steps, Linf projection). Here ``T(x)`` is the mean of the teachers'
softmax outputs (an ensemble's robust soft label), both sides softened by
``train.distill.temperature`` (RSLAD uses 1; the KL is scaled by its square, as Hinton et al.
2015, so the gradient's size does not depend on it). The attack is on when ``train.adv`` is
(``pgd``: ``train.adv.steps`` steps, ``fgsm_rs``: one, with the mode's eps ramp and step size;
the other modes, AugMix's consistency loss and ``aug.views=2`` are config errors with it);
without it only the clean term is left. ``train.distill.weight`` is the share of this loss, the
configured label loss (on ``x'`` under adversarial training, else on ``x``) gets the rest.

The teachers are exported models (``runs/X/best``), loaded once per process on its device, in
eval mode with their gradients off: never trained, never wrapped for distributed training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks import trades_examples
from core.checkpoint import load_model
from core.config import Config
from core.errors import UserError
from train.adversarial import eps_at, step_size_of

ADV_SHARE = 5 / 6  # RSLAD's weight of the adversarial term (the clean one gets 1/6)


@dataclass
class Teachers:
    """The frozen teachers of ``train.distill`` and the temperature of their soft labels."""

    models: list[nn.Module]
    temperature: float

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [model(x).float() for model in self.models]

    def soft_labels(self, x: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """The teachers' mean softmax on ``x`` at ``temperature`` (default: the configured one)."""
        t = self.temperature if temperature is None else temperature
        return torch.stack([F.softmax(z / t, dim=1) for z in self.logits(x)]).mean(0)


def load_teachers(cfg: Config, device: torch.device, channels_last: bool = False) -> Teachers | None:
    """``train.distill.teachers`` on ``device``, frozen and in eval mode; None when there are none.

    Raises:
        UserError: A teacher that does not load, or predicts another number of classes than
            ``data.num_classes`` (one line naming the key and the file).
    """
    paths = cfg.train.distill.teachers
    if not paths:
        return None
    models = []
    for path in paths:
        try:
            model, info = load_model(path)
        except UserError as exc:
            raise UserError(f"train.distill.teachers: {exc}") from None
        if int(info["num_classes"]) != cfg.data.num_classes:
            raise UserError(
                f"train.distill.teachers: {path} predicts {info['num_classes']} classes, "
                f"data.num_classes is {cfg.data.num_classes}"
            )
        model = model.to(device).eval().requires_grad_(False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
    return Teachers(models, cfg.train.distill.temperature)


def soft_kl(student_logits: torch.Tensor, soft: torch.Tensor, temperature: float) -> torch.Tensor:
    """``temperature^2 * KL(soft || softmax(student / temperature))``, mean over the batch."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p, soft, reduction="batchmean")


def distill_loss(
    model: nn.Module,
    attack_model: nn.Module,
    loss_fn: nn.Module,
    teachers: Teachers,
    x: torch.Tensor,
    targets: torch.Tensor,
    cfg: Config,
    epoch: float,
) -> torch.Tensor:
    """The loss of one batch with teachers (call it under the accelerator's autocast).

    Args:
        model: The student as trained (wrapped for distributed training).
        attack_model: The same student unwrapped, to craft with (each process attacks its own batch).
        loss_fn: The configured label loss.
        teachers: From :func:`load_teachers`.
        x: Images in [0, 1].
        targets: Labels (or mixup's soft targets).
        cfg: The run's config (``train.adv``, ``train.distill``).
        epoch: Where training stands, in epochs (for the eps warm-up).
    """
    adv, d = cfg.train.adv, cfg.train.distill
    soft = teachers.soft_labels(x)
    eps = eps_at(adv, epoch)
    if adv.mode == "none" or eps <= 0:
        logits = model(x)
        kl = soft_kl(logits, soft, d.temperature)
        label_logits = logits
    else:
        steps = 1 if adv.mode == "fgsm_rs" else adv.steps
        # RSLAD's inner maximisation: away from the teachers' label (at temperature 1, as the paper)
        target = soft if d.temperature == 1 else teachers.soft_labels(x, 1.0)
        x_adv = trades_examples(attack_model, x, target, eps, steps, step_size_of(adv, eps))
        clean, attacked = model(torch.cat([x, x_adv])).chunk(2)
        kl = ADV_SHARE * soft_kl(attacked, soft, d.temperature) + (1 - ADV_SHARE) * soft_kl(clean, soft, d.temperature)
        label_logits = attacked
    if d.weight >= 1:
        return kl
    return d.weight * kl + (1 - d.weight) * loss_fn(label_logits, targets)
