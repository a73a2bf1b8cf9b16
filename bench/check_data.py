"""Section ``checkdata`` (opt-in): ``./run.sh check-data`` on a Phase-II-sized training folder.

127,390 small JPEGs (50 distinct random images of 80 x 64-113 px, about 7 KB each, written as
separate files) with a 100-class ``label.txt``, made once in the work folder; then
``train.check_data.run`` reads every header. The page cache is whatever the machine left (the
files were just written, so mostly warm; README quotes a cold-cache run too).
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from bench.measure import BenchContext, Row, quiet
from core.config import load_config
from train import check_data

PHASE2_IMAGES = 127_390


def create_folder(ctx: BenchContext, n: int):
    root = ctx.workdir / "checkdata"
    folder = root / "train_p2"
    if not (root / "label.txt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        variants = []
        for i in range(50):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64 + i, 80, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            variants.append(buf.getvalue())
        for i in range(n):
            (folder / f"{i}.JPEG").write_bytes(variants[i % len(variants)])
        (root / "label.txt").write_text("".join(f"{i}.JPEG {i % 100}\n" for i in range(n)), encoding="utf-8")
    return root


def bench_check_data(ctx: BenchContext) -> None:
    n = 2_000 if ctx.settings.quick else PHASE2_IMAGES
    root = create_folder(ctx, n)
    cfg = load_config(None, [*ctx.overrides, f"data.root={root}", "data.train_dir=train_p2", "data.num_classes=100"])
    start = time.perf_counter()
    with quiet():
        report = check_data.run(cfg, progress=False)
    seconds = time.perf_counter() - start
    ctx.rows.append(
        Row(
            "checkdata",
            f"check-data on {n:,} small JPEGs, 100 classes (labels, coverage, every header)",
            seconds,
            f"{n / seconds:.0f} images/s; problems: {len(report['problems'])}",
            ("<", 60.0) if n == PHASE2_IMAGES else None,
            unit="s",
        )
    )
