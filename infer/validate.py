"""``./run.sh validate FILE --test-dir DIR [--num-classes N | --config FILE]``: check a submission file.

Prints each problem on its own line, then ``FILE: INVALID (N problems)`` and exits 1, or
``FILE: OK (N predictions for N test images)`` and exits 0. Bad usage (a missing or unusable
test folder, a bad option, no way to know the class count) is one ``error: ...`` line and exit
2, like every other command. The rules are listed in :mod:`infer.submission`.

The class count comes from ``--num-classes``, else from the ``<name>.meta.json`` that ``submit``
wrote beside the file, else from ``--config``; without any of them the labels' range cannot be
checked, so the command refuses rather than pass out-of-range classes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from core.cli import CheckerParser, run_checker, user_path
from core.config import load_config
from core.errors import UserError
from core.io import read_json
from core.labels import resolve_test_dir
from infer.submission import MAX_PROBLEMS, cap_problems, require_test_dir, set_problems, validate_file


def create_validate_parser() -> argparse.ArgumentParser:
    parser = CheckerParser(prog="run.sh validate", description="Check a submission file (.csv or .json).")
    parser.add_argument("file", type=Path, help="submission file, e.g. submissions/cvpr22.csv")
    parser.add_argument(
        "--test-dir", type=Path, default=None, help="folder of test images N.png (default: --config's data.test_dir)"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="labels must be in [0, N) (default: from FILE's .meta.json, else from --config)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="take the test folder and class count from this config (data.test_dir, data.num_classes)",
    )
    parser.add_argument(
        "--max-problems",
        type=int,
        default=MAX_PROBLEMS,
        help=f"list at most this many problems (default {MAX_PROBLEMS}; 0 = all)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def meta_path_of(file: Path) -> Path:
    """``<name>.meta.json`` beside ``<name>.csv`` or ``<name>.json``."""
    return file.with_name(file.name.rsplit(".", 1)[0] + ".meta.json")


def resolve_num_classes(file: Path, given: int | None, config: Path | None) -> int:
    """The class count to check labels against: given, from the meta file, or from the config."""
    if given is not None:
        return given
    meta = meta_path_of(file)
    if meta.is_file():
        try:
            value = read_json(meta)["config"]["data"]["num_classes"]
        except (OSError, ValueError, KeyError, TypeError):
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    if config is not None:
        return load_config(config).data.num_classes
    raise UserError(
        f"{file}: the number of classes is unknown (no readable {meta.name} beside it): give --num-classes N "
        "or --config FILE, so out-of-range classes are caught"
    )


def resolve_validate_test_dir(given: Path | None, config: Path | None) -> Path:
    """``--test-dir`` as typed, else the test folder the config names (``data.root``/``data.test_dir``)."""
    if given is not None:
        return user_path(given)
    if config is not None:
        return resolve_test_dir(load_config(config).data)
    raise UserError("validate: which test images? give --test-dir DIR, or --config FILE to use its data.test_dir")


def run(argv: Sequence[str]) -> int:
    """Check the file named in ``argv`` and print the report; returns 0 (valid) or 1 (invalid)."""
    parser = create_validate_parser()
    args = parser.parse_args(list(argv))
    if args.max_problems < 0:
        parser.error(f"--max-problems must be 0 (all) or more, got {args.max_problems}")
    file, test_dir = user_path(args.file), resolve_validate_test_dir(args.test_dir, user_path(args.config))
    require_test_dir(test_dir)
    num_classes = resolve_num_classes(file, args.num_classes, user_path(args.config))
    result = validate_file(file, test_dir, num_classes)
    result.problems[:0] = set_problems(file)  # a CSV of one run beside the JSON and meta of another
    if not result.ok:
        for line in cap_problems(result.problems, args.max_problems or None):
            print(line)
        count = len(result.problems)
        print(f"{args.file}: INVALID ({count} problem{'' if count == 1 else 's'})", flush=True)
        return 1
    print(f"{args.file}: OK ({result.n_predictions} predictions for {result.n_test_images} test images)", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 valid, 1 invalid submission, 2 bad usage (via :func:`core.cli.run_cli`)."""
    return run_checker(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
