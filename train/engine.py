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

from attacks import pgd
from core.errors import UserError
from core.images import to_float_images
from train.adversarial import adversarial_loss
from train.distill import distill_loss
from train.setup import Training


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues mid-epoch."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already consumed
    global_step: int = 0  # optimizer steps
    best_acc: float = -1.0  # of the accuracy `best` is selected by (robust under adversarial training)
    best_robust_acc: float = -1.0  # the training weights' best robust validation accuracy so far
    collapse_epoch: int = -1  # first epoch whose robust accuracy collapsed (catastrophic overfitting)
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def train_one_epoch(
    training: Training,
    loader,
    progress: Progress,
    epoch: int,
    on_optimizer_step: Callable[[], None] | None = None,
    on_first_batch: Callable[[torch.Tensor], None] | None = None,
) -> dict:
    """Train until the loader is exhausted (or ``train.max_steps``); returns mean loss, throughput and data wait.

    ``loader`` is ``training.train_loader`` or a resumed view of it. ``progress.batch`` counts
    consumed batches of this epoch, so the caller can resume with
    ``accelerator.skip_first_batches``. ``on_optimizer_step`` runs after every optimizer step
    (checkpointing lives there).

    No step waits for the device: the losses stay on it and are read (one host sync) only where
    they are needed anyway: at log points, before a checkpoint and at the end (:class:`LossLog`).
    ``data_wait_s`` is the time the loop spent waiting for the loader's next batch (on a GPU the
    host runs ahead of the device, so a loader that keeps up costs ~0 here), ``data_wait_frac``
    its share of the epoch's time.
    """
    t, accelerator = training.cfg.train, training.accelerator
    training.model.train()
    raw_model = accelerator.unwrap_model(training.model)
    bar = create_bar(len(loader) + progress.batch, progress.batch, epoch, accelerator)
    losses = LossLog(epoch)
    seen = 0
    start = time.perf_counter()
    batches = TimedBatches(loader)
    for images, targets in batches:
        x = to_float_images(images, training.channels_last)
        paired = None  # the device-augmented second view (aug.views=2)
        if training.batch_augment is not None:
            x, paired = training.batch_augment.views(x, epoch, progress.batch)
        if on_first_batch is not None:
            on_first_batch(x if paired is None else torch.stack([x, paired], 1))
            on_first_batch = None
        if training.mixup_fn is not None:
            x, targets = training.mixup_fn(x, targets)
        losses.add(train_step(training, raw_model, x, targets, progress, epoch, paired), progress.batch)
        progress.batch += 1
        seen += x.shape[0] * accelerator.num_processes
        bar.update(1)
        if accelerator.sync_gradients:
            finish_update(training, raw_model, progress)
            step = progress.global_step
            stopping = bool(t.max_steps) and step >= t.max_steps
            logging = step % t.log_every == 0
            if logging or stopping or checkpoint_due(t, step):
                losses.check()  # before a checkpoint: diverged weights are never saved
            if logging:
                so_far = max(time.perf_counter() - start, 1e-9)
                log_step(training, bar, losses.take_recent(), epoch, step, seen / so_far, batches.waited / so_far)
            if on_optimizer_step is not None:
                on_optimizer_step()
            if stopping:
                break
    bar.close()
    losses.check()
    elapsed = time.perf_counter() - start
    loss = mean_over_processes(accelerator, losses.total, losses.count)
    return {
        "loss": loss,
        "samples_per_s": seen / max(elapsed, 1e-9),
        "seconds": elapsed,
        "data_wait_s": batches.waited,
        "data_wait_frac": batches.waited / max(elapsed, 1e-9),
    }


class TimedBatches:
    """``loader``'s batches; ``waited`` sums the seconds spent waiting for each one (the loop's own
    work between batches does not count)."""

    def __init__(self, loader) -> None:
        self.loader, self.waited = loader, 0.0

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            self.waited += time.perf_counter() - asked
            if batch is None:
                return
            yield batch


class DataWait:
    """The time this run's steps waited for the loader (``train_one_epoch``'s ``data_wait_s``), summed over epochs."""

    def __init__(self) -> None:
        self.seconds, self.total = 0.0, 0.0

    def add(self, stats: dict) -> None:
        self.seconds += stats["data_wait_s"]
        self.total += stats["seconds"]

    @property
    def fraction(self) -> float:
        return self.seconds / self.total if self.total > 0 else 0.0


def checkpoint_due(t, step: int) -> bool:
    """Whether optimizer step ``step`` writes a full-state checkpoint (``train.checkpoint_every``)."""
    return bool(t.checkpoint_every) and step % t.checkpoint_every == 0


class LossLog:
    """The batches' losses, kept on the device until read: reading a value (``.item()``) makes the
    host wait for the device, which every step would otherwise do before its backward.

    :meth:`check` reads the pending ones at once (one sync) and stops the run, naming the first
    batch whose loss is not finite.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.total, self.count = 0.0, 0
        self.since_log: list[float] = []

    def add(self, loss: torch.Tensor, batch: int) -> None:
        self.pending.append((batch, loss.detach().float()))

    def check(self) -> None:
        """Read the pending losses (one host sync).

        Raises:
            TrainingDiverged: a pending loss is not finite (the last good checkpoint is kept).
        """
        if self.pending:
            values = torch.stack([loss for _, loss in self.pending]).tolist()
            for (batch, _), value in zip(self.pending, values):
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"training loss became {value} at epoch {self.epoch}, batch {batch}; stopped "
                        "(the last good checkpoint is kept: lower train.lr or use train.clip_grad)"
                    )
            self.pending.clear()
            self.total += sum(values)
            self.count += len(values)
            self.since_log += values

    def take_recent(self) -> list[float]:
        """The losses read since the previous call (the previous log point)."""
        recent, self.since_log = self.since_log, []
        return recent


def create_bar(total: int, initial: int, epoch: int, accelerator) -> tqdm:
    """The epoch's progress bar, on the local main process only."""
    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {epoch}",
        leave=False,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )


def train_step(
    training: Training,
    raw_model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    progress: Progress,
    epoch: int,
    paired: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward, backward and (when gradients sync) an optimizer step on one batch; returns its loss,
    detached and still on the device (reading it would make the host wait: :class:`LossLog`).

    ``paired``: the batch's device-augmented second view (``aug.views=2``), trained on beside ``x``.
    """
    t, model, accelerator = training.cfg.train, training.model, training.accelerator
    with accelerator.accumulate(model):
        with accelerator.autocast():
            epoch_now = progress.global_step / max(1, training.updates_per_epoch)
            if training.teachers is not None:
                loss = distill_loss(
                    model, raw_model, training.loss_fn, training.teachers, x, targets, training.cfg, epoch_now
                )
            else:
                loss = adversarial_loss(model, raw_model, training.loss_fn, x, targets, t.adv, epoch_now, paired)
        accelerator.backward(loss)
        if accelerator.sync_gradients and t.clip_grad > 0:
            accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
        training.optimizer.step()
        training.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def finish_update(training: Training, raw_model: nn.Module, progress: Progress) -> None:
    """After an optimizer step: count it, step the schedule, update the EMA weights."""
    progress.global_step += 1
    training.scheduler.step_update(num_updates=progress.global_step)
    if training.ema is not None:
        training.ema.update(raw_model, step=progress.global_step)


def log_step(
    training: Training,
    bar: tqdm,
    losses: list[float],
    epoch: int,
    step: int,
    samples_per_s: float,
    data_wait_frac: float,
) -> None:
    """Loss since the last log point (mean over batches and processes), learning rate, throughput and
    the share of the epoch so far spent waiting for data, to the bar and the trackers."""
    lr = training.optimizer.param_groups[0]["lr"]
    logged_loss = mean_over_processes(training.accelerator, sum(losses), len(losses))
    bar.set_postfix(loss=f"{logged_loss:.3f}", lr=f"{lr:.2e}", data_wait=f"{data_wait_frac:.0%}")
    training.accelerator.log(
        {
            "train/loss": logged_loss,
            "train/lr": lr,
            "train/epoch": epoch,
            "train/samples_per_s": samples_per_s,
            "train/data_wait_frac": data_wait_frac,
        },
        step=step,
    )


def mean_over_processes(accelerator, total: float, count: int) -> float:
    """``total / count`` over every process: each one's loss is of its own shard of the batch, so
    what is logged (console, W&B, history) is the mean of all of them, not rank 0's alone."""
    if accelerator.num_processes > 1:
        both = torch.tensor([total, float(count)], dtype=torch.float64, device=accelerator.device)
        total, count = accelerator.reduce(both, reduction="sum").tolist()
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, channels_last: bool = False, desc: str = "eval") -> dict:
    """Top-1 accuracy (%) and mean cross-entropy over the whole set, gathered across processes."""
    model.eval()
    correct, loss_sum, total = 0, 0.0, 0  # sums stay on the device until the end: no wait per batch
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        x = to_float_images(images, channels_last)
        with accelerator.autocast():
            logits = model(x)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        pred = logits.argmax(dim=1)
        pred, targets, losses = accelerator.gather_for_metrics((pred, targets, losses))
        correct += (pred == targets).sum()
        total += targets.numel()
        loss_sum += losses.double().sum()
    correct, loss_sum = int(correct), float(loss_sum)
    return {"acc": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1), "n": total}


def evaluate_robust(
    model: nn.Module,
    loader,
    accelerator,
    eps: float,
    steps: int,
    seed: int,
    channels_last: bool = False,
    desc: str = "robust eval",
) -> float:
    """PGD-Linf accuracy (%) over the whole set, gathered across processes.

    ``steps`` steps of 2.5 eps / steps from a random start drawn from a generator seeded by
    ``seed`` and the batch, so every epoch meets the same attack: the numbers are comparable
    across epochs (model selection) without touching torch's global RNG. ``model`` is the
    unwrapped network (each process attacks its own batches).
    """
    model.eval()
    correct = total = 0
    step = 2.5 * eps / steps
    batches = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process)
    for i, (images, targets) in enumerate(batches):
        x = to_float_images(images, channels_last)
        generator = torch.Generator().manual_seed(
            seed * 1_000_003 + i * accelerator.num_processes + accelerator.process_index
        )
        with accelerator.autocast():
            x_adv = pgd(model, x, targets, eps, steps=steps, step_size=step, generator=generator)
            with torch.no_grad():
                pred = model(x_adv).argmax(dim=1)
        pred, targets = accelerator.gather_for_metrics((pred, targets))
        correct += (pred == targets).sum()  # on the device until the end
        total += targets.numel()
    return 100.0 * int(correct) / max(total, 1)
