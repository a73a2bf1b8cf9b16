"""The command-line shape shared by every stage: ``[--config FILE] [--debug] [key=value ...]``.

Bad input (:class:`UserError`) becomes one ``error: ...`` line and exit code 2; the traceback
is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Sequence

from core.config import Config, load_config
from core.errors import UserError

# Set by core.launch so the launcher can return our exit code through `accelerate launch`.
STATUS_ENV = "ROBUST_PIPELINE_STATUS_FILE"


def create_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def quiet_libraries() -> None:
    """Keep the console to our own lines: progress bars and one-line results."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("timm", "accelerate", "PIL", "matplotlib", "urllib3", "wandb"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def run_cli(fn: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> int:
    """Call ``fn(argv)``; turn a UserError into one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ROBUST_PIPELINE_DEBUG") == "1"
    try:
        fn(argv)
        return 0
    except UserError as exc:
        if debug:
            traceback.print_exc()
        if is_main_rank() or debug:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        status = os.environ.get(STATUS_ENV)
        if status:
            Path(status).write_text(str(UserError.exit_code))
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
