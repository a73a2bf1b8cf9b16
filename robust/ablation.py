"""``./run.sh ablate``: what each part of the submission stack buys, and what it costs.

One config section (``ablation``) names the checkpoints per recipe and the variants; a variant
is ``"+"``-joined parts on top of one standard checkpoint without TTA, GCM or random pad:

* ``hflip``, ``multiscale`` (``ablation.scales``): test-time augmentation views;
* ``ensemble``: the first 2-3 checkpoints of the variant's recipe; ``mixed``: the first
  checkpoint of every recipe given;
* ``gcm``, ``random_pad``: the defense layers (``gcm.*`` / ``random_pad.*`` settings);
* ``temperature``: ``ablation.temperature`` on every member's logits; ``sharpen``:
  ``ablation.sharpen`` (below 1); ``tuned``: the temperature of ``ablation.temperatures`` that
  scores best on the validation split (:func:`infer.temperature.tune_temperature`);
* ``adversarial``, ``corruption``: that recipe's checkpoints instead of the standard ones.

Every variant is the exact model ``submit`` builds (:func:`infer.defended.build_defended_model`),
and per variant the stage measures:

* the Phase-I-like score on a ``make-testset`` folder (``ablation.testset``), with its
  breakdown by kind (clean, corruption, transfer, stacked);
* clean accuracy on the labelled evaluation images (``eval.subset``, as ``evaluate`` picks them);
* AutoAttack at ``eval.eps_linf`` through the whole stack, adaptive (BPDA through GCM, EOT over
  the random pad; :func:`robust.runner.craft`), on ``ablation.attack_subset`` of those images,
  and the naive PGD-Linf (gradients through GCM) beside it;
* prediction time per image (one forward pass of the test set, on this machine).

Every difference to the ``single`` row comes with a 95% paired bootstrap interval over images;
a difference whose interval covers 0 is reported as inside the noise. Outputs in
``ablation.out_dir``: ``ablation.md``, ``ablation.csv``, ``ablation.json``, ``ablation.png``,
and W&B into the run's group.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.checkpoint import resolve_checkpoint_files
from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config, ConfigError, config_to_dict
from core.devices import default_device
from core.errors import UserError
from core.images import load_image, to_float_images
from core.io import atomic_write_files, remove_leftovers, to_json_safe
from core.labels import list_test_images, read_test_labels, select_subset
from core.outputs import check_outputs, hold_output
from core.tracking import model_lineage, start_run, use_models
from core.transforms import create_eval_transform
from gcm import DefendedModel
from infer.defended import build_defended_model, input_size_of, load_members
from infer.temperature import tune_temperature, validation_images, with_temperature
from infer.testset_folder import (
    KINDS,
    MANIFEST_NAME,
    breakdown,
    check_manifest_matches,
    check_not_surrogate,
    hold_folders_for_reading,
    kinds_by_id,
    read_manifest,
)
from robust.eval_images import load_eval_images
from robust.report import figure_png
from robust.runner import Overall, craft, score
from robust.testset import IMAGES_DIR, LABELS_NAME

RECIPES = ("standard", "adversarial", "corruption")
METRICS = ("phase1", "clean", "autoattack")  # the figures with a bootstrap interval against `single`
TITLES = {"phase1": "Phase-I-like", "clean": "clean", "autoattack": "AutoAttack (BPDA/EOT)"}


# --- variants ------------------------------------------------------------------------------


def resolve_checkpoints(parts: set[str], cfg: Config, variant: str) -> list[str]:
    """A variant's checkpoints: its recipe's first, 2-3 of them (``ensemble``) or one per recipe (``mixed``)."""
    a = cfg.ablation
    if "mixed" in parts:
        chosen = [getattr(a, r)[0] for r in RECIPES if getattr(a, r)]
        if len(chosen) < 2:
            raise ConfigError(f"ablation variant {variant!r}: 'mixed' needs checkpoints of two recipes or more")
        return chosen
    recipe = next((r for r in ("adversarial", "corruption") if r in parts), "standard")
    pool = list(getattr(a, recipe))
    if not pool:
        raise ConfigError(f"config key 'ablation.{recipe}' needs at least one checkpoint (variant {variant!r})")
    if "ensemble" in parts:
        if len(pool) < 2:
            raise ConfigError(f"config key 'ablation.{recipe}' needs 2 or 3 checkpoints for variant {variant!r}")
        return pool[:3]
    return pool[:1]


def resolve_variant(variant: str, cfg: Config) -> Config:
    """The config ``submit`` would run for ``variant`` (its checkpoints, TTA, defense, temperature)."""
    parts = set(variant.split("+"))
    a = cfg.ablation
    return dataclasses.replace(
        cfg,
        submit=dataclasses.replace(
            cfg.submit,
            checkpoints=resolve_checkpoints(parts, cfg, variant),
            weights=[],
            temperature=a.sharpen if "sharpen" in parts else a.temperature if "temperature" in parts else 1.0,
        ),
        tta=dataclasses.replace(
            cfg.tta, hflip="hflip" in parts, scales=list(a.scales) if "multiscale" in parts else [1.0]
        ),
        gcm=dataclasses.replace(cfg.gcm, enabled="gcm" in parts),
        random_pad=dataclasses.replace(cfg.random_pad, enabled="random_pad" in parts),
    )


def resolve_variants(cfg: Config) -> list[str]:
    """``ablation.variants`` with ``single`` first (every difference is taken against it)."""
    variants = [v for v in cfg.ablation.variants if v != "single"]
    return ["single", *dict.fromkeys(variants)]


# --- data ----------------------------------------------------------------------------------


def load_testset(folder: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int], dict]:
    """A make-testset folder's images (float in [0, 1] at ``image_size``), labels, ids and manifest,
    read as one set (no make-testset replaces it meanwhile) and checked to be one."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        raise UserError(f"config key 'ablation.testset': {folder} is not a make-testset folder (no {MANIFEST_NAME})")
    with hold_folders_for_reading([folder], "ablation.testset"):
        manifest = read_manifest(folder / MANIFEST_NAME)
        labels = read_test_labels(folder / LABELS_NAME)
        listed = list_test_images(folder / IMAGES_DIR)
        check_manifest_matches(manifest, folder / MANIFEST_NAME, [i for _, i in listed], folder / IMAGES_DIR, labels)
        items = [(p, i) for p, i in listed if i in labels]
        resize = create_eval_transform(image_size)
        images = [torch.from_numpy(resize(image=load_image(p))["image"]).permute(2, 0, 1) for p, _ in items]
    ids = [i for _, i in items]
    return to_float_images(torch.stack(images)), torch.tensor([labels[i] for i in ids]), ids, manifest


# --- measuring one variant -----------------------------------------------------------------


def per_image(correct: torch.Tensor) -> np.ndarray:
    """Correctness per image, averaged over the draws of a randomized model."""
    return (correct.float().mean(0) if correct.dim() == 2 else correct.float()).numpy()


def attack_variant(
    model: DefendedModel, x: torch.Tensor, y: torch.Tensor, cfg: Config, desc: str = ""
) -> dict[str, np.ndarray]:
    """Per-image correctness under AutoAttack through the whole stack (adaptive: BPDA through GCM, EOT
    over the random pad) and under the naive PGD-Linf (through GCM), both at ``eval.eps_linf``; with
    ``desc``, each attack shows its progress bar under that name."""
    shown = {"progress": bool(desc)}
    adaptive = craft("autoattack", model, x, y, cfg, adaptive=True, desc=f"{desc}: AutoAttack", **shown)
    naive = craft("pgd_linf", model, x, y, cfg, adaptive=False, desc=f"{desc}: PGD-Linf", **shown)
    return {
        "autoattack": per_image(score(model, adaptive, y, cfg)),
        "pgd_naive": per_image(score(model, naive, y, cfg)),
    }


def time_per_image(model: DefendedModel, x: torch.Tensor, cfg: Config) -> float:
    """Milliseconds per image of one forward pass over ``x`` in ``submit.batch_size`` batches."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), cfg.submit.batch_size):
            model(x[i : i + cfg.submit.batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the forwards are queued: wait for them before reading the clock
    return 1000.0 * (time.perf_counter() - start) / max(1, len(x))


def measure_variant(model: DefendedModel, data: dict, cfg: Config, desc: str = "") -> dict:
    """Every figure of one variant, with the per-image vectors the bootstrap resamples (``desc``:
    the attacks' progress bars under that name)."""
    phase1 = per_image(score(model, data["test_x"], data["test_y"], cfg))
    clean = per_image(score(model, data["clean_x"], data["clean_y"], cfg))
    attacked = attack_variant(model, data["attack_x"], data["attack_y"], cfg, desc)
    by_kind = breakdown(dict(zip(data["test_ids"], phase1.tolist())), data["kinds"])
    return {
        "vectors": {"phase1": phase1, "clean": clean, **attacked},
        "by_kind": by_kind,
        "ms_per_image": time_per_image(model, data["test_x"], cfg),
    }


# --- statistics ----------------------------------------------------------------------------


def bootstrap_difference(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict:
    """Mean of ``a - b`` over images (percentage points) and its 95% paired bootstrap interval."""
    diff = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) * 100.0
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(diff.mean()), "lo": float(lo), "hi": float(hi), "noise": bool(lo <= 0.0 <= hi)}


def compare_to_single(rows: dict[str, dict], cfg: Config) -> None:
    """Add ``vs_single`` (difference and interval per metric) to every row but ``single``."""
    base = rows["single"]["vectors"]
    for name, row in rows.items():
        if name == "single":
            continue
        row["vs_single"] = {
            m: bootstrap_difference(row["vectors"][m], base[m], cfg.ablation.bootstrap, cfg.eval.seed) for m in METRICS
        }


# --- report --------------------------------------------------------------------------------


def _pct(v: np.ndarray) -> float:
    return 100.0 * float(np.mean(v)) if len(v) else float("nan")


def _delta(row: dict, metric: str) -> str:
    d = row.get("vs_single", {}).get(metric)
    if d is None:
        return ""
    tag = " inside the noise" if d["noise"] else ""
    return f" ({d['diff']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]{tag})"


def _temperature(row: dict) -> str:
    t = row.get("temperature", 1.0)
    return f" (T={t:g})" if t != 1.0 else ""


def table_rows(rows: dict[str, dict]) -> list[dict]:
    """One flat record per variant (the CSV's rows)."""
    out = []
    for name, row in rows.items():
        v = row["vectors"]
        record = {
            "variant": name,
            "members": len(row["checkpoints"]),
            "views": row["views"],
            "temperature": row.get("temperature", 1.0),
            "phase1": _pct(v["phase1"]),
            **{f"phase1_{k}": row["by_kind"].get(k, {}).get("acc") for k in KINDS},
            "clean": _pct(v["clean"]),
            "autoattack": _pct(v["autoattack"]),
            "pgd_naive": _pct(v["pgd_naive"]),
            "ms_per_image": row["ms_per_image"],
        }
        for m in METRICS:
            d = row.get("vs_single", {}).get(m, {})
            record.update({f"{m}_diff": d.get("diff"), f"{m}_lo": d.get("lo"), f"{m}_hi": d.get("hi")})
            record[f"{m}_noise"] = d.get("noise")
        out.append(record)
    return out


def render_markdown(rows: dict[str, dict], info: dict) -> str:
    kinds = " | ".join(f"of which {k}" for k in KINDS)
    lines = [
        f"Ablation of the submission stack: Phase-I-like score on {info['testset_n']} images of {info['testset']}, "
        f"clean accuracy on {info['clean_n']} labelled images, AutoAttack (adaptive: BPDA through GCM, EOT over the "
        f"random pad) and naive PGD-Linf at Linf {info['eps_linf'] * 255:.3g}/255 on {info['attack_n']} of them. "
        "Accuracy %; in brackets the difference to `single` and its 95% bootstrap interval over images.",
        "",
        f"| variant | members x views | Phase-I-like | {kinds} | clean accuracy | AutoAttack (BPDA/EOT) "
        "| PGD (naive) | ms / image |",
        "|---" * (7 + len(KINDS)) + "|",
    ]
    for name, row in rows.items():
        v = row["vectors"]
        by_kind = " | ".join(
            f"{row['by_kind'][k]['acc']:.1f}" if k in row["by_kind"] else "" for k in KINDS
        )  # fmt: skip
        lines.append(
            f"| {name}{_temperature(row)} | {len(row['checkpoints'])} x {row['views']} "
            f"| {_pct(v['phase1']):.1f}{_delta(row, 'phase1')} "
            f"| {by_kind} | {_pct(v['clean']):.1f}{_delta(row, 'clean')} "
            f"| {_pct(v['autoattack']):.1f}{_delta(row, 'autoattack')} | {_pct(v['pgd_naive']):.1f} "
            f"| {row['ms_per_image']:.2f} |"
        )
    lines += ["", "Checkpoints: " + "; ".join(f"{n}: {', '.join(r['checkpoints'])}" for n, r in rows.items())]
    return "\n".join(lines) + "\n"


def render_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in records])
    return buf.getvalue()


def render_png(records: list[dict]) -> bytes:
    """Difference to ``single`` (points) with its 95% interval, per variant and metric."""
    others = [r for r in records if r["variant"] != "single"]

    def draw(ax) -> None:
        for j, m in enumerate(METRICS):
            ys = [i + (j - 1) * 0.25 for i in range(len(others))]
            xs = [r[f"{m}_diff"] for r in others]
            err = [[r[f"{m}_diff"] - r[f"{m}_lo"] for r in others], [r[f"{m}_hi"] - r[f"{m}_diff"] for r in others]]
            ax.errorbar(xs, ys, xerr=err, fmt="o", capsize=3, label=TITLES[m])
        ax.axvline(0.0, color="grey", lw=1)
        ax.set_yticks(range(len(others)), [r["variant"] for r in others])
        ax.set_xlabel("difference to the single model (points), 95% bootstrap interval")
        ax.legend(fontsize=8)

    return figure_png(draw, (9, 1.2 + 0.45 * max(1, len(others))))


def output_files(out_dir: Path) -> dict[str, Path]:
    return {k: Path(out_dir) / f"ablation.{k}" for k in ("md", "csv", "json", "png")}


def write_outputs(rows: dict[str, dict], info: dict, out_dir: Path, cfg: Config) -> dict[str, str]:
    """The four files (as one unit: all of them new, or none changed) and the W&B run; returns their paths."""
    files = output_files(out_dir)
    records = table_rows(rows)
    payload = {
        **info,
        "rows": {n: {k: v for k, v in r.items() if k != "vectors"} for n, r in rows.items()},
        "table": records,
    }
    atomic_write_files(
        {
            files["md"]: render_markdown(rows, info),
            files["csv"]: render_csv(records),
            files["png"]: render_png(records),
            files["json"]: json.dumps(to_json_safe(payload), indent=2) + "\n",
        }
    )
    log_wandb(cfg, records, files, info)
    return {k: str(v) for k, v in files.items()}


def log_wandb(cfg: Config, records: list[dict], files: dict[str, Path], info: dict) -> None:
    """The table, the plot and each variant's headline figures, in the run name's W&B group."""
    run = start_run(cfg, "ablation", {"ablation": config_to_dict(cfg.ablation)})
    if run is None:
        return
    try:
        import wandb

        use_models(run, info["input_models"])
        columns = list(records[0])
        run.log(
            {
                "ablation/table": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in records]),
                "ablation/differences": wandb.Image(str(files["png"])),
            }
        )
        for r in records:
            run.summary.update({f"{r['variant']}/{m}": r[m] for m in ("phase1", "clean", "autoattack", "ms_per_image")})
        run.save(str(files["md"]), base_path=str(files["md"].parent), policy="now")
    finally:
        run.finish()


# --- the stage -----------------------------------------------------------------------------


def load_data(cfg: Config, image_size: int) -> dict:
    """The test set (Phase-I-like), the clean labelled images and the attacked subset of them."""
    test_x, test_y, test_ids, manifest = load_testset(Path(cfg.ablation.testset), image_size)
    clean_x, clean_y, source, _ = load_eval_images(cfg, image_size)
    pick = torch.from_numpy(select_subset(len(clean_y), cfg.ablation.attack_subset, cfg.eval.seed))
    return {
        "test_x": test_x,
        "test_y": test_y,
        "test_ids": test_ids,
        "kinds": kinds_by_id(manifest),
        "manifest": manifest,
        "clean_x": clean_x,
        "clean_y": clean_y,
        "source": source,
        "attack_x": clean_x[pick],
        "attack_y": clean_y[pick],
    }


def tune_variant(vcfg: Config, cfg: Config, members: dict, paths: list[str], image_size: int) -> Config:
    """The ``tuned`` part: the variant with the temperature of ``ablation.temperatures`` that its
    stack scores best with on the validation split (never the test labels)."""
    x, y = validation_images(cfg, image_size)
    tuned = tune_temperature(
        [members[p][0] for p in paths], [members[p][1] for p in paths], vcfg, cfg.ablation.temperatures, x, y
    )
    return with_temperature(vcfg, tuned["temperature"])


def run_variants(cfg: Config, data: dict, members: dict, progress: bool) -> dict[str, dict]:
    """Build and measure every variant, ``single`` first."""
    rows = {}
    overall = Overall(len(resolve_variants(cfg)), "variants")
    for variant in resolve_variants(cfg):
        start = time.perf_counter()
        vcfg = resolve_variant(variant, cfg)
        paths = list(vcfg.submit.checkpoints)
        if "tuned" in variant.split("+"):
            vcfg = tune_variant(vcfg, cfg, members, paths, data["test_x"].shape[-1])
        model = build_defended_model([members[p][0] for p in paths], [members[p][1] for p in paths], vcfg)
        model = model.to(default_device())  # the GPU when there is one: AutoAttack per variant
        rows[variant] = {
            "checkpoints": paths,
            "views": len(model.model.views),
            "temperature": vcfg.submit.temperature,
            **measure_variant(model, data, vcfg, variant if progress else ""),
        }
        if progress:
            v = rows[variant]["vectors"]
            print(
                f"  {variant}: Phase-I-like {_pct(v['phase1']):.1f}%, clean {_pct(v['clean']):.1f}%, AutoAttack "
                f"(BPDA/EOT) {_pct(v['autoattack']):.1f}% ({time.perf_counter() - start:.0f} s; {overall.step()})",
                flush=True,
            )
    return rows


def run(cfg: Config, progress: bool = True) -> dict:
    """Measure every ``ablation.variants`` entry, write the report and return the rows and files."""
    start = time.perf_counter()
    out_dir = Path(cfg.ablation.out_dir) if cfg.ablation.out_dir else cfg.run_dir / "ablation"
    check_outputs(list(output_files(out_dir).values()), "ablate", "ablation.out_dir")
    with hold_output(out_dir, "ablate", "ablation.out_dir"):
        remove_leftovers(output_files(out_dir).values())  # of a run killed while writing them
        torch.manual_seed(cfg.eval.seed)
        variants = {v: resolve_variant(v, cfg) for v in resolve_variants(cfg)}  # every variant checked first
        paths = list(dict.fromkeys(p for v in variants.values() for p in v.submit.checkpoints))
        loaded, infos = load_members(paths, cfg.data.num_classes)
        members = {p: (m, i) for p, m, i in zip(paths, loaded, infos)}
        data = load_data(cfg, input_size_of(infos))
        check_not_surrogate(data["manifest"], [i.get("sha256") for i in infos], "ablation.testset")
        if progress:
            print(
                f"ablate: {len(variants)} variants, {len(data['test_y'])} test-set images, {len(data['clean_y'])} "
                f"clean images from the {data['source']}, {len(data['attack_y'])} attacked",
                flush=True,
            )
        rows = run_variants(cfg, data, members, progress)
        compare_to_single(rows, cfg)
        info = {
            "testset": cfg.ablation.testset,
            "testset_n": len(data["test_y"]),
            "clean_n": len(data["clean_y"]),
            "attack_n": len(data["attack_y"]),
            "eps_linf": cfg.eval.eps_linf,
            "input_models": [
                model_lineage(resolve_checkpoint_files(p)[0].with_suffix(""), i) for p, i in zip(paths, infos)
            ],
        }
        files = write_outputs(rows, info, out_dir, cfg)
    seconds = round(time.perf_counter() - start, 1)
    if progress:
        print("\n" + Path(files["md"]).read_text())
        print(f"wrote {', '.join(files.values())} ({seconds} s)")
    return {"rows": rows, "table": table_rows(rows), "files": files, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh ablate", "What each part of the submission stack buys, with bootstrap intervals.")
    return run(parse_config(args.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
