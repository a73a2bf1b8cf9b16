"""The evaluation report: Markdown, CSV, JSON, two PNG charts and W&B, from ``evaluate.run``'s numbers.

Every file is written atomically (whole or not at all). The CSV has one row per (model,
attack); the JSON holds everything ``run`` returns; the Markdown has the paper-style table,
the black-box / corruption table, the settings, the sanity checks and the verdict.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Callable

from train.config import Config
from train.io import atomic_write_bytes, atomic_write_text

# Kept here (not imported from evaluate) so evaluate can import this module without a cycle.
PAPER_COLUMNS = (("fgsm", "FGSM"), ("pgd_l1", "PGD-L1"), ("pgd_l2", "PGD-L2"), ("pgd_linf", "PGD-Linf"),
                 ("cw_l2", "C&W"))
ROW_KEYS = ("undefended", "defended", "adaptive")
CSV_COLUMNS = ["model", "attack", "clean_acc", "robust_acc", "ar", "eps", "norm", "steps", "n"]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(res: dict) -> str:
    """Robust accuracy with RobustART's AR next to it."""
    return f"{_num(res['robust_acc'])} (AR {_num(res['ar'])})"


def _steps_of(result: dict, attack: str) -> int:
    s = result["settings"]
    return {"fgsm": 1, "cw_l2": s["cw_steps"]}.get(attack, s["steps"] if attack.startswith("pgd") else 0)


def render_markdown(result: dict) -> str:
    s, rows, labels = result["settings"], result["rows"], result["labels"]
    cols = [(k, t) for k, t in PAPER_COLUMNS if k in rows["defended"]]
    lines = [
        f"Evaluated {result['n']} images from the {result['source']} in {result['seconds']:.0f} s. Accuracy in % "
        "under each attack, with AR (RobustART: % of the clean-correct images that stay correct) in brackets"
        + (f"; expected accuracy over {s['draws']} draws of the random layer" if result["randomized"] else "") + ".",
        "",
        "| model | Top-1 | " + " | ".join(t for _, t in cols) + " | worst case |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for key in ROW_KEYS:
        row = rows[key]
        cells = [_num(row["top1"])] + [_cell(row[k]) for k, _ in cols]
        cells.append(_cell(row["worst_case"]) if "worst_case" in row else "-")
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    eot = f", EOT {s['eot_samples']} samples per step" if result["randomized"] else ""
    lines += ["", f"Budgets (pixels in [0, 1]): FGSM and PGD-Linf eps {s['eps_linf']:.4g} ({s['eps_linf'] * 255:.3g}/255), "
              f"PGD-L2 {s['eps_l2']:g}, PGD-L1 {s['eps_l1']:g}; PGD {s['steps']} steps of {s['step_ratio']:g} x eps, "
              f"{s['restarts']} restart(s), random start; C&W L2 {s['cw_steps']} Adam steps, projected onto "
              f"L2 <= {result['cw_max_norm']:g}{eot}. Worst case: an image counts only if it survives every attack "
              "of its row.", ""]
    lines += [f"| black box, transfer, noise, corruptions (on the {result['defense']} model) | accuracy % | AR |",
              "|---|---|---|"]
    for r in result["black_box"]:
        lines.append(f"| {r['label']} | {_num(r['robust_acc'])} | {_num(r['ar'])} |")
    if not result["surrogate"]:
        lines += ["", "Transfer from an independently trained checkpoint: skipped (set `eval.surrogate=PATH`)."]
    if result["corruption_severities"]:
        lines += ["", "Corruption severities (ImageNet-C levels 1..5, albumentations on the uint8 images):", "",
                  "| corruption | parameter | " + " | ".join(str(i) for i in range(1, 6)) + " |",
                  "|---|---|" + "---|" * 5]
        for c in result["corruptions"]:
            lines.append(f"| {c['name']} | {c['param']} | " + " | ".join(f"{v:g}" for v in c["levels"]) + " |")
    curve = result["eps_curve"]
    if curve["eps"]:
        lines += ["", "PGD-Linf accuracy % against eps:", "",
                  "| model | " + " | ".join(f"{e * 255:.3g}/255" for e in curve["eps"]) + " |",
                  "|---|" + "---|" * len(curve["eps"])]
        for key in ROW_KEYS:
            lines.append(f"| {labels[key]} | " + " | ".join(_num(v) for v in curve[key]) + " |")
    lines += ["", "Sanity checks:", ""] + [f"- {n}" for n in result["sanity"]]
    lines += ["", f"**Verdict.** {result['verdict']}", ""]
    return "\n".join(lines)


def csv_rows(result: dict) -> list[list]:
    """One row per (model, attack), CSV_COLUMNS order; numbers rounded to 2 decimals."""
    n, out = result["n"], []

    def add(model: str, attack: str, res: dict, eps, norm: str, steps: int) -> None:
        out.append([model, attack, round(res["clean_acc"], 2), round(res["robust_acc"], 2),
                    None if math.isnan(res["ar"]) else round(res["ar"], 2), eps, norm, steps, n])

    for key in ROW_KEYS:
        row = result["rows"][key]
        add(key, "clean", {"clean_acc": row["top1"], "robust_acc": row["top1"], "ar": 100.0}, 0.0, "", 0)
        for name, res in row.items():
            if name != "top1":
                add(key, name, res, res["eps"], res["norm"], _steps_of(result, name))
    for r in result["black_box"]:
        add("defended", r["attack"], r, r["eps"], r["norm"], r["steps"])
    return out


def render_csv(rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def _json_safe(obj):
    """NaN/inf -> null (strict JSON), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _png(draw: Callable, size: tuple[float, float] = (9, 4.5)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()


def bars_png(result: dict) -> bytes:
    """Accuracy per attack (Top-1, the paper's columns, worst case), one bar per model row."""
    rows = result["rows"]
    names = ["top1"] + [k for k, _ in PAPER_COLUMNS if k in rows["defended"]] + \
        (["worst_case"] if "worst_case" in rows["defended"] else [])
    titles = {"top1": "Top-1", "worst_case": "worst case", **dict(PAPER_COLUMNS)}
    width = 0.8 / len(ROW_KEYS)

    def draw(ax):
        for i, key in enumerate(ROW_KEYS):
            values = [rows[key]["top1"] if n == "top1" else rows[key][n]["robust_acc"] for n in names]
            ax.bar([j + (i - 1) * width for j in range(len(names))], values, width, label=result["labels"][key])
        ax.set_xticks(range(len(names)), [titles[n] for n in names])
        ax.set_title(f"Robust accuracy, {result['n']} images")

    return _png(draw)


def curve_png(result: dict) -> bytes:
    """PGD-Linf accuracy against eps (x/255) for the three rows."""
    curve = result["eps_curve"]

    def draw(ax):
        # Thick translucent undefended line: the adaptive row often lies exactly on top of it.
        for key, style, width in zip(ROW_KEYS, ("o-", "s--", "^:"), (5.0, 1.5, 1.5)):
            ax.plot([e * 255 for e in curve["eps"]], curve[key], style, lw=width, alpha=0.5 if width > 2 else 1.0,
                    label=result["labels"][key])
        ax.set_xlabel("PGD-Linf eps (x/255)")
        ax.set_title("Accuracy against attack budget")

    return _png(draw, (7, 4.5))


def log_wandb(cfg: Config, result: dict, rows: list[list], files: dict[str, Path]) -> str:
    """Log the CSV table, the charts and the headline numbers to W&B; returns the mode used."""
    from train.tracking import resolve_wandb_mode

    mode, reason = resolve_wandb_mode(cfg.wandb.mode, cfg.wandb.timeout)
    if mode == "disabled":
        return mode
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    out_dir = files["md"].parent
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=f"{cfg.name}-eval",
                     job_type="evaluate", dir=str(out_dir), mode=mode, config={"eval": result["settings"]},
                     settings=wandb.Settings(init_timeout=max(cfg.wandb.timeout, 30.0), console="off"))
    try:
        logged = {"eval/table": wandb.Table(columns=CSV_COLUMNS, data=rows)}
        if "bars" in files:
            logged["eval/bars"] = wandb.Image(str(files["bars"]))
        if "eps_curve" in files:
            logged["eval/eps_curve"] = wandb.Image(str(files["eps_curve"]))
        run.log(logged)
        for key, row in result["rows"].items():
            run.summary[f"{key}/top1"] = row["top1"]
            for name, res in row.items():
                if name != "top1":
                    run.summary[f"{key}/{name}"] = res["robust_acc"]
        run.summary["verdict"] = result["verdict"]
    finally:
        run.finish()
    where = f" (sync later: wandb sync {out_dir}/wandb/offline-run-*)" if mode == "offline" else ""
    print(f"W&B: {mode} - {reason}{where}")
    return mode


def write_report(result: dict, out_dir: Path, cfg: Config, echo: bool = True) -> dict[str, str]:
    """Write eval.md, eval.csv, eval.json, eval_bars.png, eval_eps_curve.png (atomically) and log to W&B."""
    out_dir = Path(out_dir)
    md = render_markdown(result)
    rows = csv_rows(result)
    files = {"md": out_dir / "eval.md", "csv": out_dir / "eval.csv", "json": out_dir / "eval.json",
             "bars": out_dir / "eval_bars.png"}
    atomic_write_text(files["md"], md)
    atomic_write_text(files["csv"], render_csv(rows))
    atomic_write_bytes(files["bars"], bars_png(result))
    if result["eps_curve"]["eps"]:
        files["eps_curve"] = out_dir / "eval_eps_curve.png"
        atomic_write_bytes(files["eps_curve"], curve_png(result))
    names = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["json"], json.dumps(_json_safe({**result, "files": names}), indent=2) + "\n")
    log_wandb(cfg, result, rows, files)
    if echo:
        print("\n" + md)
        print(f"wrote {', '.join(str(p) for p in files.values())}")
    return names
