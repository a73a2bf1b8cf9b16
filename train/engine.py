"""One epoch of training and one pass of evaluation, all distributed work via the Accelerator."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core.errors import UserError
from core.images import to_float_images
from train.setup import Training


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues mid-epoch."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already consumed
    global_step: int = 0  # optimizer steps
    best_acc: float = -1.0
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def fgsm_examples(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float, loss_fn: Callable
) -> torch.Tensor:
    """FGSM images for adversarial regularization (the 2nd-place recipe).

    ``model`` should be the unwrapped module: the input gradient needs no DDP gradient sync.
    """
    x_adv = x.detach().clone().requires_grad_(True)
    was_training = model.training
    model.eval()  # no drop-path randomness in the attack step
    with torch.enable_grad():
        loss = loss_fn(model(x_adv), target)
        (grad,) = torch.autograd.grad(loss, x_adv)
    model.train(was_training)
    return (x + eps * grad.sign()).clamp_(0.0, 1.0).detach()


def train_one_epoch(
    training: Training,
    loader,
    progress: Progress,
    epoch: int,
    on_optimizer_step: Callable[[], None] | None = None,
    on_first_batch: Callable[[torch.Tensor], None] | None = None,
) -> dict:
    """Train until the loader is exhausted (or ``train.max_steps``); returns mean loss and throughput.

    ``loader`` is ``training.train_loader`` or a resumed view of it. ``progress.batch`` counts
    consumed batches of this epoch, so the caller can resume with
    ``accelerator.skip_first_batches``. ``on_optimizer_step`` runs after every optimizer step
    (checkpointing lives there).
    """
    t = training.cfg.train
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    loss_fn, mixup_fn, ema, accelerator = training.loss_fn, training.mixup_fn, training.ema, training.accelerator
    channels_last = training.cfg.model.channels_last
    model.train()
    raw_model = accelerator.unwrap_model(model)
    total_batches = len(loader) + progress.batch
    bar = tqdm(
        total=total_batches,
        initial=progress.batch,
        desc=f"epoch {epoch}",
        leave=False,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    loss_sum, loss_count, seen = 0.0, 0, 0
    start = time.perf_counter()
    for images, targets in loader:
        x = to_float_images(images, channels_last)
        if on_first_batch is not None:
            on_first_batch(x)
            on_first_batch = None
        if mixup_fn is not None:
            x, targets = mixup_fn(x, targets)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = loss_fn(model(x), targets)
                if t.adv_eps > 0:
                    x_adv = fgsm_examples(raw_model, x, targets, t.adv_eps, loss_fn)
                    loss = (1 - t.adv_weight) * loss + t.adv_weight * loss_fn(model(x_adv), targets)
            value = loss.detach().float().item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"training loss became {value} at epoch {epoch}, batch {progress.batch}; stopped "
                    "(the last good checkpoint is kept: lower train.lr or use train.clip_grad)"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.clip_grad > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        progress.batch += 1
        loss_sum += value
        loss_count += 1
        seen += x.shape[0] * accelerator.num_processes
        bar.update(1)
        if accelerator.sync_gradients:
            progress.global_step += 1
            scheduler.step_update(num_updates=progress.global_step)
            if ema is not None:
                ema.update(raw_model, step=progress.global_step)
            if progress.global_step % t.log_every == 0:
                elapsed = time.perf_counter() - start
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}")
                accelerator.log(
                    {
                        "train/loss": value,
                        "train/lr": lr,
                        "train/epoch": epoch,
                        "train/samples_per_s": seen / max(elapsed, 1e-9),
                    },
                    step=progress.global_step,
                )
            if on_optimizer_step is not None:
                on_optimizer_step()
            if t.max_steps and progress.global_step >= t.max_steps:
                break
    bar.close()
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(loss_count, 1), "samples_per_s": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, channels_last: bool = False, desc: str = "eval") -> dict:
    """Top-1 accuracy (%) and mean cross-entropy over the whole set, gathered across processes."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        x = to_float_images(images, channels_last)
        with accelerator.autocast():
            logits = model(x)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        pred = logits.argmax(dim=1)
        pred, targets, losses = accelerator.gather_for_metrics((pred, targets, losses))
        correct += int((pred == targets).sum())
        total += int(targets.numel())
        loss_sum += float(losses.sum())
    return {"acc": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1), "n": total}
