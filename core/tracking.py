"""Weights & Biases for every stage, never blocking a run.

wandb online with a key but no network blocks for ~100 s and without a key fails at once, so
``mode: auto`` decides up front: online only with a key *and* a server that answers within
``wandb.timeout`` seconds; otherwise offline (sync later with ``./run.sh wandb-sync``).

What a team finds in W&B: one group per run name, holding the runs of ``train``, ``submit``
and ``evaluate`` (``job_type``); ``train`` logs its best model as an artifact of type
``model`` (aliases ``best``, ``latest``), ``submit`` and ``evaluate`` declare it as their
input and ``submit`` logs the files it wrote as an artifact of type ``submission``. Offline,
``use_artifact`` is impossible, so the lineage is recorded as the artifact's name and the
weights' sha256 in the run's config (and in the submission's meta file).
"""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from core.config import Config
from core.io import read_json

_DEFAULT_URL = "https://api.wandb.ai"


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", _DEFAULT_URL)


def has_api_key() -> bool:
    """A key in the environment or in ~/.netrc for the W&B host (the key itself is never read out)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(_base_url()).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def server_reachable(timeout: float) -> bool:
    url = urlparse(_base_url())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(requested: str, timeout: float) -> tuple[str, str]:
    """Return ``(mode, reason)`` with mode in online/offline/disabled.

    An explicit ``WANDB_MODE`` in the environment wins over ``auto``, as wandb users expect.
    """
    if requested == "auto":
        env = os.environ.get("WANDB_MODE", "").lower()
        if env in {"online", "offline", "disabled"}:
            requested = env
        elif env == "dryrun":
            requested = "offline"
    if requested == "disabled":
        return "disabled", "wandb.mode=disabled"
    if requested == "offline":
        return "offline", "wandb.mode=offline"
    if not has_api_key():
        return "offline", "no W&B API key found (WANDB_API_KEY or ~/.netrc)"
    if not server_reachable(timeout):
        return "offline", f"W&B server {_base_url()} not reachable within {timeout:g}s"
    return "online", "API key and server found"


def wandb_settings(cfg: Config, mode: str, name: str, run_dir: Path, job_type: str) -> dict:
    """The ``wandb.init`` keyword arguments every stage uses (train passes them through accelerate)."""
    import wandb

    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    stage_artifacts_in(run_dir / "wandb")
    kwargs = {
        "name": name,
        "group": cfg.name,
        "dir": str(run_dir),
        "mode": mode,
        "job_type": job_type,
        "settings": wandb.Settings(init_timeout=max(cfg.wandb.timeout, 30.0), console="off"),
    }
    if cfg.wandb.entity:
        kwargs["entity"] = cfg.wandb.entity
    return kwargs


# The WANDB_DATA_DIR this process set (a value the user set is theirs to keep).
_staging: list[str] = []


def stage_artifacts_in(folder: Path) -> None:
    """Stage artifact files under ``folder``: wandb copies every file it logs to
    ``$WANDB_DATA_DIR/artifacts/staging`` (default ``~/.local/share/wandb``, outside the run) and an
    offline run's record points there until ``wandb sync`` uploads it."""
    current = os.environ.get("WANDB_DATA_DIR")
    if current is None or current in _staging:
        os.environ["WANDB_DATA_DIR"] = str(Path(folder).resolve())
        _staging.append(os.environ["WANDB_DATA_DIR"])


def sync_command(run_dir: Path) -> str:
    """What uploads a run's offline W&B data later (with the login step where no key is found)."""
    login = "" if has_api_key() else "; once, before it: .venv/bin/wandb login"
    return f"./run.sh wandb-sync {run_dir}{login}"


def describe_mode(mode: str, reason: str, run_dir: Path) -> str:
    """The console line saying where the run's W&B data goes."""
    where = f" (sync later: {sync_command(run_dir)})" if mode == "offline" else ""
    return f"W&B: {mode} - {reason}{where}"


def start_run(cfg: Config, job_type: str, config: dict):
    """A W&B run of ``submit`` or ``evaluate`` in the run name's group, or ``None`` when W&B is disabled.

    Same mode resolution and settings as training (its files go to ``runs/<name>/wandb`` too);
    the caller logs into it and calls ``finish()``.
    """
    mode, reason = resolve_wandb_mode(cfg.wandb.mode, cfg.wandb.timeout)
    if mode == "disabled":
        return None
    import wandb

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    kwargs = wandb_settings(cfg, mode, f"{cfg.name}-{job_type}", run_dir, job_type)
    run = wandb.init(project=cfg.wandb.project, config=config, **kwargs)
    print(describe_mode(mode, reason, run_dir))
    return run


# --- artifacts and lineage -----------------------------------------------------------------

LINEAGE_SUFFIX = ".wandb.json"  # beside an exported model: which artifact holds it


def model_lineage(checkpoint: Path, info: dict) -> dict:
    """Which W&B artifact (if any) holds an exported model, and its weights' sha256."""
    path = Path(f"{checkpoint}{LINEAGE_SUFFIX}")
    try:
        lineage = read_json(path)
    except (OSError, ValueError):
        lineage = {}
    lineage = lineage if isinstance(lineage, dict) else {}
    return {
        "artifact": lineage.get("artifact"),
        "qualified": lineage.get("qualified"),
        "logged_by_run": lineage.get("run"),
        "sha256": info.get("sha256"),
    }


def use_models(run, lineages: list[dict]) -> None:
    """Declare the models a run used: ``use_artifact`` online where the artifact was logged
    online (offline W&B cannot), and always their names and sha256 in the run's config."""
    run.config.update({"input_models": lineages}, allow_val_change=True)
    if run.offline:
        return
    for lineage in lineages:
        if lineage.get("qualified"):
            run.use_artifact(lineage["qualified"])
