"""Weights & Biases through accelerate's tracker, never blocking a run.

wandb online with a key but no network blocks for ~100 s and without a key fails at once, so
``mode: auto`` decides up front: online only with a key *and* a server that answers within
``wandb.timeout`` seconds; otherwise offline (sync later with ``wandb sync``).
"""

from __future__ import annotations

import netrc
import os
import socket
from urllib.parse import urlparse

from train.config import Config, config_to_dict


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


def init_tracking(accelerator, cfg: Config, mode: str, reason: str) -> str:
    """Start the W&B run on the main process with a mode from :func:`resolve_wandb_mode`.

    Returns the mode used ('disabled' = none). Call it on every process (accelerate decides
    which one logs); the Accelerator must have been built with ``log_with="wandb"``.
    """
    if mode == "disabled":
        return mode
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    import wandb

    init_kwargs = {
        "name": cfg.name,
        "dir": str(run_dir),
        "mode": mode,
        "settings": wandb.Settings(init_timeout=max(cfg.wandb.timeout, 30.0), console="off"),
    }
    if cfg.wandb.entity:
        init_kwargs["entity"] = cfg.wandb.entity
    accelerator.init_trackers(cfg.wandb.project, config=config_to_dict(cfg), init_kwargs={"wandb": init_kwargs})
    if accelerator.is_main_process:
        where = f" (sync later: wandb sync {run_dir}/wandb/offline-run-*)" if mode == "offline" else ""
        accelerator.print(f"W&B: {mode} - {reason}{where}")
    return mode
