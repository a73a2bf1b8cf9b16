"""The training run in W&B: its run in the name's group, and the best model as an artifact whose
name ``submit`` and ``evaluate`` find beside the exported model (:func:`core.tracking.model_lineage`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core.config import Config, config_to_dict
from core.io import atomic_write_text
from core.tracking import LINEAGE_SUFFIX, describe_mode, wandb_settings

# Beside the run's W&B files: the id of its training run, so that a resume continues that run.
RUN_ID_FILE = "train-run-id"


def resolve_run_id(cfg: Config, resumed: bool) -> tuple[str, bool]:
    """``(W&B run id, whether it continues an earlier one)``: the id kept in the run folder when the
    training resumes from a checkpoint, else a new one."""
    from wandb.sdk.lib.runid import generate_id

    kept = cfg.run_dir / "wandb" / RUN_ID_FILE
    if resumed and kept.is_file():
        run_id = kept.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id, True
    return generate_id(), False


def init_tracking(accelerator, cfg: Config, mode: str, reason: str, resumed: bool = False) -> str:
    """Start the training run's W&B run on the main process with a mode from :func:`resolve_wandb_mode`.

    ``resumed``: the training continues from a checkpoint, so it continues the run's W&B run too
    (its id is kept in ``runs/<name>/wandb/train-run-id``; offline, ``wandb sync`` uploads the
    resumed parts into that one run). Returns the mode used ('disabled' = none). Call it on every
    process (accelerate decides which one logs); the Accelerator must have been built with
    ``log_with="wandb"``.
    """
    if mode == "disabled":
        return mode
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    init_kwargs = wandb_settings(cfg, mode, cfg.name, run_dir, "train")
    run_id, continued = resolve_run_id(cfg, resumed)
    init_kwargs.update(id=run_id, resume="allow")
    accelerator.init_trackers(cfg.wandb.project, config=config_to_dict(cfg), init_kwargs={"wandb": init_kwargs})
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "wandb" / RUN_ID_FILE, run_id + "\n")
        accelerator.print(describe_mode(mode, reason, run_dir) + (f"; continues W&B run {run_id}" if continued else ""))
    return mode


def log_data_wait(accelerator, seconds: float, fraction: float) -> None:
    """The run's time spent waiting for the loader, in the W&B summary (main process): whether
    the loader held the device back over the whole run (the per-step curve is ``train/data_wait_frac``)."""
    if accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.summary.update({"train/data_wait_s": seconds, "train/data_wait_frac": fraction})


def log_model(run, cfg: Config, stem: Path, info: dict) -> dict:
    """Log the exported model ``<stem>.json`` (+ weights) as artifact ``model-<name>``, aliases best/latest.

    With ``wandb.upload_weights=false`` the weights enter as a checksummed ``file://``
    reference instead of an upload (huge runs). Writes ``<stem>.wandb.json`` so ``submit``
    and ``evaluate`` can name this artifact as their input; returns what it wrote there.
    """
    import wandb

    weights = Path(f"{stem}.safetensors").resolve()
    metadata = {
        k: info.get(k)
        for k in (
            "arch",
            "stem",
            "num_classes",
            "image_size",
            "epoch",
            "global_step",
            "val_acc",
            "val_robust_acc",
            "val_score",
            "selected_by",
            "weights",
            "sha256",
        )
    }
    metadata["config_sha256"] = hashlib.sha256(json.dumps(info.get("config", {}), sort_keys=True).encode()).hexdigest()
    artifact = wandb.Artifact(
        f"model-{cfg.name}", type="model", metadata={k: v for k, v in metadata.items() if v is not None}
    )
    artifact.add_file(str(Path(f"{stem}.json")), name="best.json")
    if cfg.wandb.upload_weights:
        artifact.add_file(str(weights), name="best.safetensors")
    else:
        artifact.add_reference(weights.as_uri(), name="best.safetensors")
    run.log_artifact(artifact, aliases=["best", "latest"])
    lineage = {
        "artifact": f"model-{cfg.name}",
        "type": "model",
        "sha256": info.get("sha256"),
        "run": run.id,
        "qualified": None,
    }
    if not run.offline:
        try:  # online: the version exists once committed, so inputs can be pinned to it ("...:v3")
            lineage["qualified"] = artifact.wait(timeout=max(cfg.wandb.timeout, 60)).qualified_name
        except Exception as exc:  # noqa: BLE001 - a slow server must not fail a finished training run
            print(
                f"W&B: the model artifact is still uploading ({type(exc).__name__}); "
                "its users will name it without a version"
            )
    atomic_write_text(Path(f"{stem}{LINEAGE_SUFFIX}"), json.dumps(lineage, indent=1) + "\n")
    return lineage
