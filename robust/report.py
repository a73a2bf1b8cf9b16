"""The evaluation report: Markdown, CSV, JSON, two PNG charts and W&B, from ``evaluate.run``'s result.

Every file is written atomically (whole or not at all). The CSV has one row per (model,
attack); the JSON holds the whole :class:`EvalResult`; the Markdown has the paper-style
table, the black-box / corruption table, the settings, the sanity checks and the verdict.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Callable, Sequence

from core.config import Config
from core.corruptions import group_of
from core.io import atomic_write_files, to_json_safe
from core.outputs import record_owner
from core.tracking import start_run, use_models
from robust.results import ROW_KEYS, EvalResult, Score
from robust.specs import PAPER_COLUMNS

CSV_COLUMNS = ["model", "attack", "clean_acc", "robust_acc", "ar", "eps", "norm", "steps", "n"]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(score: Score) -> str:
    """Robust accuracy with RobustART's AR next to it."""
    return f"{_num(score.robust_acc)} (AR {_num(score.ar)})"


def _columns(result: EvalResult) -> list:
    """The paper's columns that were run, in its order."""
    return [spec for spec in PAPER_COLUMNS if spec.name in result.rows["defended"].attacks]


def _describe_autoattack(s: dict, randomized: bool) -> str:
    """How AutoAttack was run, in words (its authors' standard version, or which subset)."""
    if s["aa_version"] == "standard":
        rand = "; against the random layer in the adaptive row its rand version (APGD-CE, APGD-DLR, EOT 20)"
        return (
            "AutoAttack: the authors' standard version (APGD-CE, APGD-T, FAB-T, Square 5000 queries)"
            + (rand if randomized else "")
            + "."
        )
    return (
        f"AutoAttack: a custom subset ({', '.join(s['aa_attacks'])}; {s['aa_iters']} iterations, "
        f"{s['aa_target_classes']} target classes, {s['aa_queries']} Square queries), not the standard version."
    )


def describe_budgets(result: EvalResult, ran: Sequence[str]) -> str:
    """The budgets line under the main table, naming only the attacks in ``ran``."""
    s = result.settings
    linf = [t for n, t in (("fgsm", "FGSM"), ("pgd_linf", "PGD-Linf"), ("autoattack", "AutoAttack")) if n in ran]
    linf = [", ".join(linf[:-1]) + " and " + linf[-1]] if len(linf) > 1 else linf
    parts = [f"{linf[0]} eps {s['eps_linf']:.4g} ({s['eps_linf'] * 255:.3g}/255)"] if linf else []
    parts += [
        f"{title} {s[key]:g}"
        for name, title, key in (("pgd_l2", "PGD-L2", "eps_l2"), ("pgd_l1", "PGD-L1", "eps_l1"))
        if name in ran
    ]
    budgets = ", ".join(parts)
    if any(name.startswith("pgd_") for name in ran):
        budgets += f"; PGD {s['steps']} steps of {s['step_ratio']:g} x eps, {s['restarts']} restart(s), random start"
    if "cw_l2" in ran:
        budgets += f"; C&W L2 {s['cw_steps']} Adam steps, projected onto L2 <= {s['cw_max_norm']:g}"
    if result.randomized and budgets:
        budgets += f", EOT {s['eot_samples']} samples per step"
    line = f"Budgets (pixels in [0, 1]): {budgets.lstrip('; ')}." if budgets else ""
    if "autoattack" in ran:
        line += f" {_describe_autoattack(s, result.randomized)}"
    if ran:
        line += " Worst case: an image counts only if it survives every attack of its row."
    return line.strip()


def render_markdown(result: EvalResult) -> str:
    s, rows = result.settings, result.rows
    cols = _columns(result)
    lines = [
        f"Evaluated {result.n} images from the {result.source} in {result.seconds:.0f} s. Accuracy in % "
        "under each attack, with AR (RobustART: % of the clean-correct images that stay correct) in brackets"
        + (f"; expected accuracy over {s['draws']} draws of the random layer" if result.randomized else "")
        + ".",
        "",
        "| model | Top-1 | " + " | ".join(spec.title for spec in cols) + " | worst case |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for key in ROW_KEYS:
        row = rows[key]
        cells = [_num(row.top1)] + [_cell(row.attacks[spec.name]) for spec in cols]
        cells.append(_cell(row.worst_case) if row.worst_case is not None else "-")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    budgets = describe_budgets(result, [spec.name for spec in cols])
    lines += ["", budgets, ""] if budgets else []
    lines += [
        f"| black box, transfer, noise (on the {result.defense} model) | accuracy % | AR |",
        "|---|---|---|",
    ]
    for score in result.black_box:
        lines.append(f"| {score.label} | {_num(score.robust_acc)} | {_num(score.ar)} |")
    if not result.surrogate:
        lines += ["", "Transfer from an independently trained checkpoint: skipped (set `eval.surrogate=PATH`)."]
    lines += corruption_lines(result)
    curve = result.eps_curve
    if curve["eps"]:
        lines += [
            "",
            "PGD-Linf accuracy % against eps:",
            "",
            "| model | " + " | ".join(f"{e * 255:.3g}/255" for e in curve["eps"]) + " |",
            "|---|" + "---|" * len(curve["eps"]),
        ]
        for key in ROW_KEYS:
            lines.append(f"| {rows[key].label} | " + " | ".join(_num(v) for v in curve[key]) + " |")
    lines += ["", "Sanity checks:", ""] + [f"- {n}" for n in result.sanity]
    lines += ["", f"**Verdict.** {result.verdict}", ""]
    return "\n".join(lines)


def _group_text(groups: dict) -> str:
    names = {"noise": "noise", "blur": "blur", "weather": "weather", "digital": "digital", "held_out": "held-out four"}
    return ", ".join(f"{names[g]} {_num(v)}" for g, v in groups.items() if v is not None)


def corruption_lines(result: EvalResult) -> list[str]:
    """The ImageNet-C section: accuracy per corruption and severity, the summary figures, mCE."""
    c = result.corruption
    if not c:
        return []
    models = c["models"]
    main, base = models["defended"], models.get("baseline")
    severities = sorted({int(s) for cells in main["cells"].values() for s in cells})
    lines = [
        "",
        f"Common corruptions: ImageNet-C (imagecorruptions-imaug 1.1.5) at the model's input size on the uint8 "
        f"images, each image seeded on its own (`eval.seed`), on the {result.defense} model: the adaptive row's "
        "figures too (no gradient is involved), and the undefended row's when no random layer is on. Accuracy %:",
        "",
        "| corruption | group | "
        + " | ".join(f"s{s}" for s in severities)
        + " | mean |"
        + (" baseline mean |" if base else ""),
        "|---|---|" + "---|" * (len(severities) + 1) + ("---|" if base else ""),
    ]
    for name, cells in main["cells"].items():
        values = [cells.get(s, cells.get(str(s))) for s in severities]
        mean = sum(v for v in values if v is not None) / max(1, sum(v is not None for v in values))
        row = f"| {name} | {group_of(name).replace('_', '-')} | " + " | ".join(_num(v) for v in values)
        row += f" | {_num(mean)} |"
        if base:
            b = list(base["cells"].get(name, {}).values())
            row += f" {_num(sum(b) / len(b) if b else None)} |"
        lines.append(row)
    if main["imagenet_c"] is None:
        summary = f"No common corruption ran (clean {_num(main['clean'])}%). "
    else:
        what = (
            "ImageNet-C mean over the 75 common cells (RobustBench's figure)"
            if main["complete"]
            else "mean over the common cells run (not all 75: not RobustBench's figure)"
        )
        summary = f"{what}: **{_num(main['imagenet_c'])}%** (clean {_num(main['clean'])}%). "
    summary += f"Per group: {_group_text(main['groups'])}."
    worst, group = main["worst"], main["worst_group"]
    summary += f" Worst corruption: {worst[0]} ({_num(worst[1])}%)." if worst else ""
    summary += f" Worst group: {group[0]} ({_num(group[1])}%)." if group else ""
    lines += ["", summary]
    if base:
        lines += [
            "",
            f"Against the baseline `{c['baseline']}` (clean {_num(base['clean'])}%, ImageNet-C "
            f"{_num(base['imagenet_c'])}%) on the same corrupted images: mCE {_num(main['mce'])}%, relative mCE "
            f"{_num(main['relative_mce'])}% (100% = the baseline's errors; lower is better).",
        ]
    counterparts = c.get("training_counterparts", {})
    lines += [
        "",
        "Corruptions with a counterpart in this model's training augmentations (partly inside its training "
        "distribution): "
        + ("; ".join(f"{k} ({', '.join(v)})" for k, v in counterparts.items()) if counterparts else "none")
        + ".",
    ]
    return lines


def csv_rows(result: EvalResult) -> list[list]:
    """One row per (model, attack), CSV_COLUMNS order; numbers rounded to 2 decimals."""
    out = []

    def add(model: str, score: Score) -> None:
        out.append(
            [
                model,
                score.attack,
                round(score.clean_acc, 2),
                round(score.robust_acc, 2),
                None if math.isnan(score.ar) else round(score.ar, 2),
                score.eps,
                score.norm,
                score.steps,
                result.n,
            ]
        )

    for key in ROW_KEYS:
        row = result.rows[key]
        add(key, Score("clean", "clean", "", 0.0, 0, row.top1, row.top1, 100.0))
        for score in [*row.attacks.values(), *([row.worst_case] if row.worst_case is not None else [])]:
            add(key, score)
    for score in result.black_box:
        add("defended", score)
    for model, summary in result.corruption.get("models", {}).items():
        for name, cells in summary["cells"].items():
            for severity, acc in cells.items():
                label = f"corruption: {name}, severity {severity}"
                add(model, Score(f"corruption_{name}_s{severity}", label, "", None, 0, summary["clean"], acc, math.nan))
    return out


def render_csv(rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def figure_png(draw: Callable, size: tuple[float, float]) -> bytes:
    """PNG bytes of one matplotlib axes that ``draw(ax)`` fills (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _png(draw: Callable, size: tuple[float, float] = (9, 4.5), legend_below: bool = False) -> bytes:
    def draw_accuracy(ax) -> None:
        draw(ax)
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        if legend_below:  # bars reach 100%: a legend inside the axes would cover them
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
        else:
            ax.legend(fontsize=8)

    return figure_png(draw_accuracy, size)


def bars_png(result: EvalResult) -> bytes:
    """Accuracy per attack (Top-1, the paper's columns, worst case), one bar per model row."""
    rows = result.rows
    cols = _columns(result)
    titles = ["Top-1"] + [spec.title for spec in cols] + (["worst case"] if rows["defended"].worst_case else [])
    width = 0.8 / len(ROW_KEYS)

    def draw(ax):
        for i, key in enumerate(ROW_KEYS):
            row = rows[key]
            values = [row.top1] + [row.attacks[spec.name].robust_acc for spec in cols]
            values += [row.worst_case.robust_acc] if row.worst_case else []
            ax.bar([j + (i - 1) * width for j in range(len(titles))], values, width, label=row.label)
        ax.set_xticks(range(len(titles)), titles)
        ax.set_title(f"Robust accuracy, {result.n} images")

    return _png(draw, (9, 5), legend_below=True)


def curve_png(result: EvalResult) -> bytes:
    """PGD-Linf accuracy against eps (x/255) for the three rows."""
    curve = result.eps_curve

    def draw(ax):
        # Thick translucent undefended line: the adaptive row often lies exactly on top of it.
        for key, style, width in zip(ROW_KEYS, ("o-", "s--", "^:"), (5.0, 1.5, 1.5)):
            ax.plot(
                [e * 255 for e in curve["eps"]],
                curve[key],
                style,
                lw=width,
                alpha=0.5 if width > 2 else 1.0,
                label=result.rows[key].label,
            )
        ax.set_xlabel("PGD-Linf eps (x/255)")
        ax.set_title("Accuracy against attack budget")

    return _png(draw, (7, 4.5))


def log_wandb(cfg: Config, result: EvalResult, rows: list[list], files: dict[str, Path]) -> None:
    """Log the CSV table, the charts and the headline numbers to W&B (nothing when disabled)."""
    run = start_run(cfg, "evaluate", {"eval": result.settings})
    if run is None:
        return
    try:
        import wandb

        use_models(run, result.input_models)
        logged = {"eval/table": wandb.Table(columns=CSV_COLUMNS, data=rows)}
        if "bars" in files:
            logged["eval/bars"] = wandb.Image(str(files["bars"]))
        if "eps_curve" in files:
            logged["eval/eps_curve"] = wandb.Image(str(files["eps_curve"]))
        run.log(logged)
        for key, row in result.rows.items():
            run.summary[f"{key}/top1"] = row.top1
            for name, score in {**row.attacks, **({"worst_case": row.worst_case} if row.worst_case else {})}.items():
                run.summary[f"{key}/{name}"] = score.robust_acc
        for key, summary in result.corruption.get("models", {}).items():
            run.summary[f"{key}/imagenet_c"] = summary["imagenet_c"]
            run.summary.update({f"{key}/corruption_{g}": v for g, v in summary["groups"].items() if v is not None})
        run.summary["verdict"] = result.verdict
        for key in ("bars", "eps_curve", "md"):  # the report itself, for whoever reads the run later
            if key in files:
                run.save(str(files[key]), base_path=str(files[key].parent), policy="now")
    finally:
        run.finish()


def eval_out_dir(cfg: Config) -> Path:
    """Where the reports of ``evaluate`` and of a Phase II file's score go: ``eval.out_dir``, else
    ``runs/<name>/eval``."""
    return Path(cfg.eval.out_dir) if cfg.eval.out_dir else cfg.run_dir / "eval"


def report_files(out_dir: Path) -> dict[str, Path]:
    """Every file :func:`write_report` may write into ``out_dir``."""
    names = {"md": "eval.md", "csv": "eval.csv", "json": "eval.json", "bars": "eval_bars.png"}
    return {**{k: Path(out_dir) / n for k, n in names.items()}, "eps_curve": Path(out_dir) / "eval_eps_curve.png"}


def write_report(result: EvalResult, out_dir: Path, cfg: Config, echo: bool = True) -> dict[str, str]:
    """Write eval.md, eval.csv, eval.json, eval_bars.png, eval_eps_curve.png (as one unit) and log to W&B."""
    out_dir = Path(out_dir)
    md = render_markdown(result)
    rows = csv_rows(result)
    files = report_files(out_dir)
    curve = files.pop("eps_curve")
    contents = {files["md"]: md, files["csv"]: render_csv(rows), files["bars"]: bars_png(result)}
    if result.eps_curve["eps"]:
        files["eps_curve"] = curve
        contents[curve] = curve_png(result)
    names = {k: str(v) for k, v in files.items()}
    payload = {
        **result.to_dict(),
        "files": names,
        "out_dir": str(out_dir),
        **record_owner("evaluate", "evaluation report"),
    }
    contents[files["json"]] = json.dumps(to_json_safe(payload), indent=2) + "\n"
    # One unit: a failure leaves the earlier report whole, and no curve of an earlier run stays beside this one.
    atomic_write_files(contents, remove=[curve])
    log_wandb(cfg, result, rows, files)
    if echo:
        print("\n" + md)
        print(f"wrote {', '.join(str(p) for p in files.values())}")
    return names
