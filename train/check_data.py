"""``./run.sh check-data [--config FILE] [--full] [key=value ...]``: the data a config names, checked
before anything expensive starts.

Stops in one line (exit 2) where training would be wrong or fail: a ``data.*`` path that is not
there, a label file that does not parse, a listed image that is missing, a label outside
``[0, data.num_classes)``, a class without a training image (the label file of another phase).
Then it reads every image's header (threads; ``--full`` decodes the pixels too, as training
will) and reports: per-class counts (min / median / max), image sizes and formats, images in the
training folder that no label lists, files that cannot be read (exit 1 when
``data.bad_images=error`` would stop training on them), the validation split and the test folder.
``train`` runs the first part (up to the class coverage) before any process or GPU is taken.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from core.cli import CheckerParser, parse_config, quiet_libraries, run_checker
from core.config import Config
from core.devices import available_cores
from core.errors import UserError
from core.images import load_image, read_image_header
from core.labels import IMAGE_EXTENSIONS, list_test_images, resolve_path, resolve_samples, train_source

SHOWN = 5  # names shown per finding


def read_headers(paths: Sequence[Path], full: bool, progress: bool) -> list[tuple[int, int, str] | str]:
    """Each image's ``(width, height, format)`` or the reason it cannot be read, in order (threads:
    PIL and OpenCV release the GIL while they read and decode)."""

    def one(path: Path):
        header = read_image_header(path)
        if full and not isinstance(header, str):
            try:
                load_image(path)
            except UserError as exc:
                return str(exc).split(": ", 1)[-1]
        return header

    with ThreadPoolExecutor(max_workers=max(2, 2 * available_cores())) as pool:
        return list(
            tqdm(
                pool.map(one, paths, chunksize=64),
                total=len(paths),
                desc="decoding" if full else "headers",
                disable=not progress,
                leave=False,
                mininterval=1.0,
            )
        )


def unlisted_images(cfg: Config, listed: Sequence[Path]) -> list[str]:
    """Image files directly in the training folder that no label lists (label-file layout only)."""
    if not cfg.data.train_labels:
        return []
    folder = resolve_path(cfg.data.root, cfg.data.train_dir)
    names = {p.name for p in listed if p.parent == folder}
    with os.scandir(folder) as it:
        images = [
            e.name for e in it if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(n for n in images if n not in names)


def describe_counts(labels: Sequence[int], num_classes: int) -> str:
    counts = Counter(labels)
    per_class = [counts.get(c, 0) for c in range(num_classes)]
    low = min(range(num_classes), key=lambda c: (per_class[c], c))
    high = max(range(num_classes), key=lambda c: (per_class[c], -c))
    return (
        f"per class: min {per_class[low]:,} (class {low}), median {statistics.median(per_class):,g}, "
        f"max {per_class[high]:,} (class {high})"
    )


def describe_sizes(headers: Sequence[tuple[int, int, str] | str]) -> str:
    good = [h for h in headers if not isinstance(h, str)]
    if not good:
        return "sizes: no readable image"
    widths, heights = [h[0] for h in good], [h[1] for h in good]
    formats = Counter(h[2] for h in good)
    return (
        f"sizes: width {min(widths)}-{max(widths)} (median {statistics.median(widths):g}), height "
        f"{min(heights)}-{max(heights)} (median {statistics.median(heights):g}); "
        + ", ".join(f"{fmt} {n:,}" for fmt, n in formats.most_common())
    )


def coverage(cfg: Config, train: Sequence[tuple[Path, int]]) -> str:
    """How many classes have training images (every one, unless ``data.allow_missing_classes``)."""
    missing = cfg.data.num_classes - len({label for _, label in train})
    if not missing:
        return "all with training images"
    return f"{missing} without a training image (data.allow_missing_classes=true)"


def check_split(cfg: Config, name: str, samples: list[tuple[Path, int]], full: bool, progress: bool) -> dict:
    """Counts, sizes and unreadable files of one split; prints its lines."""
    start = time.perf_counter()
    headers = read_headers([p for p, _ in samples], full, progress)
    bad = [(p, h) for (p, _), h in zip(samples, headers) if isinstance(h, str)]
    labels = [label for _, label in samples]
    counts = describe_counts(labels, cfg.data.num_classes)
    seconds = time.perf_counter() - start
    print(f"  {name}: {len(samples):,} images, {len(set(labels))} classes; {counts}")
    print(f"    {describe_sizes(headers)} ({'decoded' if full else 'headers read'} in {seconds:.1f} s)")
    for path, reason in bad[:SHOWN]:
        print(f"    unreadable: {path}: {reason}")
    if len(bad) > SHOWN:
        print(f"    ... {len(bad) - SHOWN} more unreadable")
    return {"n": len(samples), "bad": [str(p) for p, _ in bad]}


def check_test(cfg: Config, full: bool, progress: bool) -> dict | None:
    """The test folder's ``N.png`` images (when it is there): names, ids and headers."""
    if not cfg.data.test_dir:
        return None
    folder = resolve_path(cfg.data.root, cfg.data.test_dir)
    if not folder.is_dir():
        print(f"  test: {folder} is not there (submit needs it; make-testset can make one)")
        return None
    items = list_test_images(folder)
    headers = read_headers([p for p, _ in items], full, progress)
    bad = [(p, h) for (p, _), h in zip(items, headers) if isinstance(h, str)]
    print(f"  test: {folder}: {len(items):,} images, ids {items[0][1]}-{items[-1][1]}; {describe_sizes(headers)}")
    for path, reason in bad[:SHOWN]:
        print(f"    unreadable: {path}: {reason}")
    return {"n": len(items), "bad": [str(p) for p, _ in bad]}


def run(cfg: Config, full: bool = False, progress: bool = True) -> dict:
    """Check the data of ``cfg``; returns the findings (``problems``: what makes training stop)."""
    start = time.perf_counter()
    train, val = resolve_samples(cfg.data)  # layout, labels, listed files, class coverage: one line each
    print(f"check-data: {train_source(cfg.data)} ({cfg.data.num_classes} classes, {coverage(cfg, train)})")
    report = {"train": check_split(cfg, "train", train, full, progress)}
    if val:
        how = (
            cfg.data.val_labels
            or f"stratified {cfg.data.val_fraction:g} of the training images, seed {cfg.data.split_seed}"
        )
        report["val"] = check_split(cfg, f"validation ({how})", val, full, progress)
    unlisted = unlisted_images(cfg, [p for p, _ in train + val])
    report["unlisted"] = unlisted
    if unlisted:
        shown = ", ".join(unlisted[:SHOWN]) + (", ..." if len(unlisted) > SHOWN else "")
        print(f"  unlisted: {len(unlisted):,} images in the training folder that no label lists ({shown})")
    report["test"] = check_test(cfg, full, progress)
    bad = report["train"]["bad"] + report.get("val", {}).get("bad", [])
    report["problems"] = (
        [f"{len(bad)} training/validation images cannot be read (data.bad_images=error stops training on them)"]
        if bad and cfg.data.bad_images == "error"
        else []
    )
    report["seconds"] = round(time.perf_counter() - start, 1)
    verdict = "; ".join(report["problems"]) or "OK"
    print(f"check-data: {verdict} ({report['seconds']} s)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    parser = CheckerParser(prog="run.sh check-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--full", action="store_true", help="decode every image (slower), not only its header")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args: argparse.Namespace = parser.parse_args(argv)
    cfg = parse_config(args)
    if cfg.data.demo and not Path(cfg.data.root).is_dir():
        raise UserError(f"{cfg.data.root}: the demo data are generated by ./run.sh train (or ./run.sh demo-data)")
    return 1 if run(cfg, args.full)["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(run_checker(main))
