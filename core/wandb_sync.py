"""``./run.sh wandb-sync [FOLDER ...]``: upload the offline W&B runs under run folders.

Offline runs (``wandb.mode=offline``, or ``auto`` without a key or a server) are written to
``runs/<name>/wandb/offline-run-*``, their artifact files staged beside them
(:func:`core.tracking.stage_artifacts_in`). This runs the virtual environment's own ``wandb sync``
on them (a plain ``wandb`` is not on the PATH of a user who never activated ``.venv``); the
files of a resumed run, which share one run id, are uploaded into that one run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from core.cli import run_cli, user_path
from core.errors import UserError
from core.tracking import has_api_key

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_RUN = "offline-run-*"


def wandb_executable() -> Path:
    """The ``wandb`` command installed beside this interpreter (``.venv/bin/wandb``)."""
    return Path(sys.executable).parent / "wandb"


def find_offline_runs(folder: Path) -> list[Path]:
    """``folder`` itself if it is an offline run, else every offline run below it, oldest first."""
    if folder.name.startswith("offline-run-"):
        return [folder]
    return sorted(p for p in folder.rglob(OFFLINE_RUN) if p.is_dir() and p.parent.name == "wandb")


def resolve_folder(text: str) -> Path:
    """A folder as typed: from the folder the command was run in, else from the repository (where
    the runs' own lines name it)."""
    typed = user_path(text)
    if typed is not None and typed.exists():
        return typed
    if (ROOT / text).exists():
        return ROOT / text
    raise UserError(f"wandb-sync: no folder {text}")


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.sh wandb-sync", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", default=["runs"], help="run folders or offline runs (default: runs)")
    args = parser.parse_args(argv)
    runs = [run for text in args.folders for run in find_offline_runs(resolve_folder(text))]
    if not runs:
        raise UserError(
            f"wandb-sync: no offline W&B run ({OFFLINE_RUN}) under {' '.join(args.folders)}; runs trained with "
            "wandb.mode=offline (or auto without a key) write them to runs/<name>/wandb/"
        )
    if not has_api_key():
        raise UserError(
            "wandb-sync: no W&B API key (WANDB_API_KEY or ~/.netrc): run .venv/bin/wandb login once, then this again"
        )
    print(f"wandb-sync: {len(runs)} offline run(s): {wandb_executable()} sync {' '.join(map(str, runs))}", flush=True)
    code = subprocess.run([str(wandb_executable()), "sync", *map(str, runs)], check=False).returncode
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
