"""A run's files: its folder, full training states for ``resume``, and the exported ``best``/``last`` models.

Full states live in ``runs/<name>/checkpoints/e<epoch>_b<batch>/``: accelerate's own state
(model, optimizer, RNG) plus ours as JSON and safetensors, published by an atomic rename so a
kill never leaves a half-written checkpoint under a final name.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import time
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.checkpoint import export_model, state_dict_of
from core.config import Config, config_to_dict, read_yaml
from core.errors import UserError, echo
from core.io import check_writable, publishing, remove_folder
from core.outputs import CLAIMS_NAME, claim_names, hold_output, record_owner
from train.engine import Progress, TrainingDiverged
from train.init_from import apply_init_from
from train.setup import Training

CHECKPOINT_PREFIX = "e"
TRAIN_STATE = "train_state.json"
EMA_WEIGHTS = "ema.safetensors"


# Keys a training state depends on: resuming under other values cannot load it.
STATE_KEYS = ("model.name", "model.stem", "data.num_classes", "train.opt", "train.ema", "train.select")
EXPORTS = ("best", "last")


def check_run_name(cfg: Config) -> None:
    """Never replace a run silently: a name that already holds one needs ``resume`` or ``overwrite``."""
    if cfg.resume or cfg.overwrite:
        return
    run_dir = cfg.run_dir
    held = [f"{name}.safetensors" for name in EXPORTS if (run_dir / f"{name}.safetensors").exists()]
    held += [f"{len(checkpoint_dirs(run_dir))} checkpoint(s)"] if checkpoint_dirs(run_dir) else []
    if held:
        raise UserError(
            f"name={cfg.name}: {run_dir} already holds a run ({', '.join(held)}); continue it with resume=auto, "
            "train under another name=..., or replace it with overwrite=true"
        )


@contextlib.contextmanager
def run_folder(cfg: Config, accelerator) -> Iterator[Path]:
    """The run's folder, locked for this run (``core.outputs``: a second ``train`` of the same name
    refuses), created up front (an unwritable ``out_dir`` fails before any training) and removed
    again if the run fails before writing anything into it."""
    run_dir = cfg.run_dir
    existed = run_dir.exists()
    check_writable(run_dir, "out_dir")
    with hold_output(run_dir, "train", "name", accelerator):
        check_run_name(cfg)  # every process checks, so none waits at a barrier for a failed one
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            claim_names(run_dir, "train", "model checkpoint", EXPORTS)  # before best/last exist
        try:
            yield run_dir
        except BaseException:
            if accelerator.is_main_process and not existed and run_dir.is_dir():
                remove_if_only_claims(run_dir)
            raise


def remove_if_only_claims(run_dir: Path) -> None:
    """Remove a run folder this run created and wrote nothing into but its claims."""
    if {p.name for p in run_dir.iterdir()} <= {CLAIMS_NAME}:
        (run_dir / CLAIMS_NAME).unlink(missing_ok=True)
        run_dir.rmdir()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete full-state checkpoints, oldest first (a torn write lies under a hidden temporary name)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and not p.name.endswith(".tmp")
    )


def launch_of(training: Training) -> dict:
    """How the run is spread: what a resume must repeat to continue exactly where it stopped."""
    scaling = training.scaling
    return {
        "processes": training.accelerator.num_processes,
        "global_batch": scaling.global_batch if scaling is not None else None,
        # a mid-epoch position counts loader batches of this size (64 x 1 -> 32 x 2 kept the global
        # batch and resumed "batch 3" at image 96 instead of 192)
        "batch_size": training.cfg.train.batch_size,
        "grad_accum_steps": training.cfg.train.grad_accum_steps,
    }


def save_extra_state(folder: Path, progress: Progress, scheduler, ema, launch: dict | None = None) -> None:
    """Our own state beside accelerate's, as JSON and safetensors.

    accelerate unpickles registered objects with ``weights_only=False``; keeping progress,
    scheduler and EMA out of it means a checkpoint is never loaded through pickle.
    """
    state = {"progress": progress.state_dict(), "scheduler": scheduler.state_dict(), "launch": launch or {}}
    (folder / TRAIN_STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    if ema is not None:
        save_file(state_dict_of(ema.module), str(folder / EMA_WEIGHTS))


def load_extra_state(folder: Path, progress: Progress, scheduler, ema) -> None:
    try:
        state = json.loads((folder / TRAIN_STATE).read_text(encoding="utf-8"))
        progress.load_state_dict(state["progress"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(load_file(str(folder / EMA_WEIGHTS), device=str(ema_device(ema))))
    except (OSError, KeyError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(
            f"resume: {folder} is not a complete checkpoint of this run ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def ema_device(ema) -> torch.device:
    return next(ema.module.parameters()).device


def save_checkpoint(training: Training, progress: Progress) -> Path:
    """Full training state into ``checkpoints/e<epoch>_b<batch>``, published by an atomic rename.

    A kill at any point leaves either the previous checkpoints or the new one complete, never
    a half-written folder under a final name; the ``train.keep_checkpoints`` newest are kept.
    """
    accelerator, model, run_dir = training.accelerator, training.model, training.cfg.run_dir
    if not all(bool(p.isfinite().all()) for p in accelerator.unwrap_model(model).parameters()):
        raise TrainingDiverged(
            f"weights became NaN/inf by step {progress.global_step}; stopped without "
            "saving them (the last good checkpoint is kept: lower train.lr or use train.clip_grad)"
        )
    root = run_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{progress.epoch:04d}_b{progress.batch:06d}"
    # Every process writes its part into the same temporary folder; the main one makes and publishes
    # it (a checkpoint of the same step is replaced), or removes it on any failure or stop signal.
    with publishing(final, accelerator.is_main_process) as tmp:
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                save_extra_state(tmp, progress, training.scheduler, training.ema, launch_of(training))
        except OSError as exc:
            raise UserError(
                f"cannot write checkpoint {final}: {exc.strerror or exc}; earlier checkpoints are intact"
            ) from None
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in checkpoint_dirs(run_dir)[: -training.cfg.train.keep_checkpoints]:
            remove_folder(old)
    accelerator.wait_for_everyone()
    return final


# train_state.json's progress as this code writes it: a hand-edited or damaged one is refused, not trained on.
PROGRESS_TYPES = {"epoch": int, "batch": int, "global_step": int, "best_acc": (int, float), "history": list}
REQUIRED_PROGRESS = ("epoch", "batch", "global_step")


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None. Cheap, and nothing is unpickled: our JSON as
    we write it, every safetensors file (accelerate's model, our EMA) whole as its header says, every
    ``torch.save`` file (optimizer, RNG states) a zip whose directory is there (a cut file loses it)."""
    try:
        state = json.loads((folder / TRAIN_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {TRAIN_STATE}"
    except (OSError, ValueError, RecursionError) as exc:
        return f"{TRAIN_STATE} is not readable JSON ({type(exc).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
        return f"{TRAIN_STATE} is a JSON {type(state).__name__}, not a training state with a 'progress' object"
    if not isinstance(state.get("scheduler"), dict):
        return f"{TRAIN_STATE} has no 'scheduler' object"
    progress = state["progress"]
    for key, kind in PROGRESS_TYPES.items():
        value = progress.get(key)
        if key in REQUIRED_PROGRESS and key not in progress:
            return f"{TRAIN_STATE} has no progress.{key}"
        if key in progress and (isinstance(value, bool) or not isinstance(value, kind)):
            return f"{TRAIN_STATE}: progress.{key} is {echo(value)}, not a number of the kind this code writes"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type varies by version
            return f"{path.name} is damaged ({(str(exc).splitlines() or [type(exc).__name__])[0][:160]})"
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pkl", ".pt", ".pth")):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is damaged (not a whole torch.save file: cut short?)"
    return None


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``run_dir`` that :func:`checkpoint_problem` passes, and the newer ones
    it skipped with why. Every one damaged is one line: resuming from nothing would start over."""
    found = checkpoint_dirs(run_dir)
    skipped = []
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    if skipped:
        newest, why = skipped[0]
        raise UserError(
            f"resume: no intact checkpoint in {run_dir / 'checkpoints'} ({len(skipped)} damaged; the newest, "
            f"{newest.name}: {why}); train under a new name=..., or start again with overwrite=true"
        )
    return None, []


def resolve_resume(cfg: Config) -> Path | None:
    return resolve_resume_noting(cfg)[0]


def resolve_resume_noting(cfg: Config) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint ``resume`` names (``auto``: the newest intact one) and the damaged ones skipped."""
    if not cfg.resume:
        return None, []
    if cfg.resume == "auto":
        return newest_intact_checkpoint(cfg.run_dir)
    path = Path(cfg.resume)
    if not path.is_dir():
        raise UserError(f"resume: no checkpoint folder {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"resume: {path} cannot be resumed from: {problem}")
    return path, []


def restore(training: Training, progress: Progress) -> None:
    """Continue from ``resume`` (a folder, or ``auto``: the newest checkpoint) or start fresh
    (from ``train.init_from``'s weights when it names a model).

    A fresh run under an old name removes the old checkpoints, which a later ``resume=auto``
    would otherwise pick up.
    """
    cfg, accelerator = training.cfg, training.accelerator
    run_dir = cfg.run_dir
    resume_from, skipped = resolve_resume_noting(cfg)
    for folder, why in skipped:
        accelerator.print(f"note: resume: skipped {folder}: {why}; the previous intact checkpoint is used")
    if resume_from is not None:
        check_resumable(cfg, resume_from)
        check_same_launch(resume_from, launch_of(training))
        try:
            accelerator.load_state(str(resume_from))
        except pickle.UnpicklingError:
            raise UserError(f"resume: {refused_pickle(resume_from)}") from None
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"resume: {resume_from} does not fit this config ({first})") from None
        load_extra_state(resume_from, progress, training.scheduler, training.ema)
        accelerator.print(
            f"resumed from {resume_from} (epoch {progress.epoch}, batch {progress.batch}, step {progress.global_step})"
        )
    elif cfg.resume == "auto":
        accelerator.print(f"resume=auto: no checkpoint in {run_dir}/checkpoints, starting fresh")
    elif accelerator.is_main_process and cfg.overwrite:
        # A fresh run under an old name (overwrite=true): nothing of the old run may be mistaken
        # for this one's, neither its checkpoints (resume=auto) nor its exports (submit).
        old = checkpoint_dirs(run_dir) + [p for n in EXPORTS for p in run_dir.glob(f"{n}.*")]
        if old:
            accelerator.print(f"overwrite=true: removing the earlier run's checkpoints and exports in {run_dir}")
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            for path in old:
                path.unlink(missing_ok=True) if path.is_file() else None
    if resume_from is None and cfg.train.init_from:  # a resumed run continues its own weights
        accelerator.print(apply_init_from(accelerator.unwrap_model(training.model), training.ema, cfg))
    accelerator.wait_for_everyone()


def check_same_launch(folder: Path, now: dict) -> None:
    """Refuse a resume on another number of processes or another global batch: the data order,
    each process's shard, the skipped batches of a mid-epoch stop and the learning rate all
    depend on them, so the run could not continue exactly where it stopped."""
    try:
        state = json.loads((folder / TRAIN_STATE).read_text(encoding="utf-8"))
        was, batch = state.get("launch") or {}, state["progress"].get("batch", 0)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return  # load_extra_state names a damaged checkpoint
    for key in ("processes", "global_batch"):
        if was.get(key) is not None and was[key] != now[key]:
            raise UserError(
                f"resume: {folder} was trained on {was['processes']} process(es) with a global batch of "
                f"{was.get('global_batch')}; this run has {now['processes']} and {now['global_batch']}: it could "
                f"not continue exactly where it stopped. Resume with --num_processes {was['processes']} and the "
                "same train.batch_size / train.grad_accum_steps, or train under a new name=..."
            )
    # Mid-epoch, the position is a count of loader batches: it means other images under another batch size.
    for key in ("batch_size", "grad_accum_steps"):
        if batch and was.get(key) is not None and was[key] != now[key]:
            raise UserError(
                f"resume: {folder} stopped after batch {batch} of an epoch with train.batch_size={was['batch_size']} "
                f"and train.grad_accum_steps={was.get('grad_accum_steps')}; this run has {now['batch_size']} and "
                f"{now['grad_accum_steps']}, so that batch would be other images (some trained twice, some never). "
                "Resume with the same two values, or train under a new name=..."
            )


def refused_pickle(folder: Path) -> str:
    """Name the file of ``folder`` that ``torch.load(weights_only=True)`` refuses (a pickle that
    asks for more than tensors and plain data: never loaded, it could run code)."""
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pkl", ".pt", ".pth")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = str(exc).strip().splitlines() or [""]
            why = next((line for line in lines if "GLOBAL" in line), lines[0])[:160]  # torch's own reason
            return f"{path}: refused to unpickle it: it holds more than tensors and plain data ({why})"
        except Exception:  # noqa: BLE001 - other damage is not what we are looking for here
            continue
    return f"{folder}: a file of this checkpoint holds a pickle that is not plain tensors; refused to load it"


def check_resumable(cfg: Config, folder: Path) -> None:
    """Refuse, naming the key, to resume a state saved under another model, class count or optimizer."""
    saved_path = folder.parent.parent / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = read_yaml(saved_path)
    except UserError:
        return
    current = config_to_dict(cfg)
    for key in STATE_KEYS:
        section, name = key.split(".")
        was, now = saved.get(section, {}).get(name), current[section][name]
        if was is not None and was != now:
            raise UserError(
                f"resume: {folder} was trained with {key}={was}, this config says {key}={now}; set it back "
                "or train under a new name=..."
            )


def selection_of(cfg: Config, metrics: dict) -> str:
    """The validation figure ``best`` is picked by: ``train.select``, where ``auto`` is robust under
    adversarial training (robust overfitting: Rice et al. 2020) when it was measured, else clean;
    ``score`` is the Phase-II-like score of ``train.score`` (:mod:`train.select`)."""
    select = cfg.train.select
    if select == "auto":
        select = "clean" if cfg.train.adv.mode == "none" else "robust"
    if select == "score":
        return "score" if "score" in metrics else "clean"
    return select if "robust_acc" in metrics else "clean"


SELECTED_KEYS = {"clean": "acc", "robust": "robust_acc", "score": "score"}


def pick_weights(metrics: dict, by: str) -> tuple[bool, float]:
    """``(use the EMA weights, their score)``: whichever of the weights and their EMA validates better."""
    key = SELECTED_KEYS[by]
    score, ema_score = metrics[key], metrics.get(f"ema_{key}", -1.0)
    return ema_score >= score, max(score, ema_score)


def export_models(training: Training, progress: Progress, metrics: dict, improved: bool) -> None:
    """Write ``last`` (and ``best`` when improved) on the main process: the EMA weights when they validate better."""
    accelerator, model, ema, cfg = training.accelerator, training.model, training.ema, training.cfg
    if not accelerator.is_main_process:
        return
    by = selection_of(cfg, metrics)
    use_ema, _ = pick_weights(metrics, by)
    use_ema = use_ema and ema is not None
    weights = ema.module if use_ema else accelerator.unwrap_model(model)
    prefix = "ema_" if use_ema else ""
    meta = {
        "arch": cfg.model.name,
        "num_classes": cfg.data.num_classes,
        "image_size": cfg.data.image_size,
        "weights": "ema" if use_ema else "model",
        "epoch": progress.epoch,
        "global_step": progress.global_step,
        "val_acc": metrics[f"{prefix}acc"],
        "val_n": metrics["n"],
        "stem": cfg.model.stem,
        "selected_by": by,
        **(
            {"val_robust_acc": metrics[f"{prefix}robust_acc"], "adversarial_training": config_to_dict(cfg.train.adv)}
            if "robust_acc" in metrics
            else {}
        ),
        **(
            {"val_score": metrics[f"{prefix}score"], "val_score_parts": metrics[f"{prefix}score_parts"]}
            if "score" in metrics
            else {}
        ),
        **({"collapse_epoch": progress.collapse_epoch} if progress.collapse_epoch >= 0 else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_to_dict(cfg),
        **record_owner("train", "model checkpoint"),
    }
    try:
        export_model(weights, cfg.run_dir / "last", meta)
        if improved:
            export_model(weights, cfg.run_dir / "best", meta)
    except OSError as exc:
        raise UserError(
            f"cannot write the exported model {exc.filename or cfg.run_dir}: {exc.strerror or exc}; "
            "earlier exports and checkpoints are intact"
        ) from None
