"""Section ``ablation`` (opt-in): what ``./run.sh ablate`` costs against one ``submit`` of the same images.

The bench's demo data and random checkpoints stand in for the recipes (every recipe gets the
same two exports, a third is the surrogate of a ``make-testset`` folder): throughput does not
depend on the weights, but AutoAttack only attacks the images a model gets right, so random
weights make its share smaller than on trained ones. The row says how many variants and images
were timed; the README's demo run gives the figure with trained checkpoints.
"""

from __future__ import annotations

import time

import torch

from bench.measure import BenchContext, Row, quiet
from bench.submit import run_submit
from core.checkpoint import export_model
from core.model import create_classifier
from robust import ablation, testset


def export_random(ctx: BenchContext, name: str, seed: int) -> str:
    cfg = ctx.config()
    torch.manual_seed(seed)
    model = create_classifier(cfg.model, cfg.data.num_classes).eval()
    stem = cfg.run_dir.parent / name / "best"
    meta = {"arch": cfg.model.name, "num_classes": cfg.data.num_classes, "image_size": cfg.data.image_size}
    export_model(model, stem, meta)
    return str(stem)


def bench_ablation(ctx: BenchContext) -> None:
    quick = ctx.settings.quick
    images, attacked = (16, 4) if quick else (100, 20)
    other, surrogate = export_random(ctx, "second", 1), export_random(ctx, "surrogate", 2)
    members = f"[{ctx.checkpoint},{other}]"
    folder = ctx.workdir / "testset"
    with quiet():
        testset.run(
            ctx.config(
                f"testset.subset={images}", f"testset.surrogates=[{surrogate}]", f"testset.out_dir={folder}",
                "testset.overwrite=true",
            ),
            progress=False,
        )  # fmt: skip
    cfg = ctx.config(
        f"ablation.testset={folder}", f"ablation.standard={members}", f"ablation.adversarial={members}",
        f"ablation.corruption={members}", f"ablation.attack_subset={attacked}", f"eval.subset={images}",
        "eval.aa_version=custom", "eval.aa_iters=50", "eval.aa_target_classes=3", "eval.steps=10",
        "eval.eot_samples=5", "eval.draws=5", f"ablation.out_dir={ctx.workdir / 'ablation'}",
    )  # fmt: skip
    start = time.perf_counter()
    with quiet():
        ablation.run(cfg, progress=False)
    seconds = time.perf_counter() - start
    submit_seconds = images / run_submit(ctx, f"submit.checkpoints=[{ctx.checkpoint}]", "gcm.enabled=false")
    variants = len(ablation.resolve_variants(cfg))
    ctx.rows.append(
        Row(
            "ablation",
            f"ablate ({variants} variants) / one submit, same {images} test images",
            seconds / submit_seconds,
            f"{seconds:.0f} s vs {submit_seconds:.1f} s; {attacked} images attacked per variant, random weights",
        )
    )
