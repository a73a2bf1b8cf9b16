"""``./run.sh evaluate``: a local leaderboard that tells the truth about GCM.

Three rows on the exact model ``submit`` builds: the undefended model (same members and TTA,
no GCM / random pad), the GCM model under the standard white-box attacks the paper reports,
and the GCM model under adaptive attacks (BPDA straight through GCM, EOT over the random
resize-pad layer). Columns as in the paper: Top-1, FGSM, PGD-L1, PGD-L2, PGD-Linf, C&W, plus
the per-sample worst case. A second table has the gradient-free and transfer attacks,
random noise and corruptions. Sanity checks and a verdict computed from the numbers follow.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

import albumentations as A
import numpy as np
import torch

from gcm import RandomResizePad, bpda
from infer.attacks import robust_metrics, run_attack, worst_case
from infer.defended import DefendedClassifier, build_defended_model, input_size_of, load_members, resolve_checkpoints
from train.cli import create_parser, parse_config, quiet_libraries, run_cli
from train.config import Config, resolve_path
from train.data import list_test_images, load_image, read_test_labels, resolve_samples
from train.errors import UserError
from train.io import atomic_write_bytes, atomic_write_text
from train.transforms import create_eval_transform

COLUMNS = [("fgsm", "FGSM"), ("pgd_l1", "PGD-L1"), ("pgd_l2", "PGD-L2"), ("pgd_linf", "PGD-Linf"), ("cw_l2", "C&W")]
ROWS = [("undefended", "undefended"), ("gcm", "GCM (standard white-box, as in the paper)"),
        ("adaptive", "GCM (adaptive: BPDA through GCM, EOT over random pad)")]

# Corruption severity -> albumentations transform (deterministic strength, always applied).
CORRUPTIONS = {
    "gauss_noise": lambda s: A.GaussNoise(std_range=(0.04 * s, 0.04 * s), p=1.0),
    "gaussian_blur": lambda s: A.GaussianBlur(blur_limit=(2 * s + 1, 2 * s + 1), p=1.0),
    "jpeg": lambda s: A.ImageCompression(quality_range=(max(5, 60 - 11 * s),) * 2, p=1.0),
    "brightness": lambda s: A.RandomBrightnessContrast(brightness_limit=(0.1 * s, 0.1 * s),
                                                       contrast_limit=(0.0, 0.0), p=1.0),
}


def load_eval_images(cfg: Config, image_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, str]:
    """Labelled images: the test folder with hidden labels if present, else the validation split.

    Returns float images in [0,1], labels, the uint8 images (for corruptions) and a source name.
    """
    labels_path = resolve_path(cfg.data.root, cfg.data.test_labels) if cfg.data.test_labels else None
    if labels_path is not None and labels_path.is_file():
        labels = read_test_labels(labels_path, cfg.data.num_classes)
        samples = [(p, labels[i]) for p, i in list_test_images(resolve_path(cfg.data.root, cfg.data.test_dir))
                   if i in labels]
        source = f"test set ({labels_path.name})"
    else:
        samples = resolve_samples(cfg.data)[1]
        source = "validation split"
    if not samples:
        raise UserError("evaluate: no labelled images (set data.test_labels or data.val_fraction > 0)")
    order = np.random.default_rng(cfg.eval.seed).permutation(len(samples))
    if cfg.eval.subset:
        order = order[: cfg.eval.subset]
    transform = create_eval_transform(image_size)
    raw = np.stack([transform(image=load_image(samples[i][0]))["image"] for i in order])
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div(255.0)
    y = torch.tensor([samples[i][1] for i in order])
    return x, y, raw, source


def reseed(model: DefendedClassifier, seed: int) -> None:
    if isinstance(model.random_pad, RandomResizePad):
        model.random_pad.reset(seed)


@torch.no_grad()
def predict_correct(model: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                      for i in range(0, len(x), batch_size)])


def attack_params(cfg: Config, name: str, randomized: bool, adaptive: bool) -> dict:
    e = cfg.eval
    eps = {"fgsm": e.eps_linf, "pgd_linf": e.eps_linf, "pgd_l2": e.eps_l2, "pgd_l1": e.eps_l1,
           "cw_l2": e.eps_l2, "square": e.eps_linf, "noise": e.eps_linf}[name]
    params: dict = {"eps": eps}
    if name.startswith("pgd"):
        params.update(steps=e.steps, step_size=e.step_ratio * eps, restarts=e.restarts)
    if name == "cw_l2":
        params["steps"] = e.cw_steps
    if name == "square":
        params["steps"] = e.square_queries
    if adaptive and randomized and name in ("fgsm", "pgd_linf", "pgd_l2", "pgd_l1"):
        params["eot_samples"] = e.eot_samples
    return params


def run_row(model: DefendedClassifier, x, y, cfg: Config, adaptive: bool, progress: bool) -> dict:
    """Clean and per-attack correctness for one row (white-box attacks of the paper's table)."""
    randomized = isinstance(model.random_pad, RandomResizePad)
    draws = cfg.eval.draws if randomized else 1
    results = {}
    reseed(model, cfg.eval.seed)
    clean = run_attack("noise", model, x, y, cfg.eval.batch_size, draws=draws, eps=0.0)
    for name, _ in COLUMNS:
        if name not in cfg.eval.attacks:
            continue
        reseed(model, cfg.eval.seed)
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        params = attack_params(cfg, name, randomized, adaptive)
        if name != "cw_l2" and name != "fgsm":
            params["generator"] = gen
        if adaptive:
            with bpda(model):
                results[name] = run_attack(name, model, x, y, cfg.eval.batch_size, draws=draws, progress=progress,
                                           **params)
        else:
            results[name] = run_attack(name, model, x, y, cfg.eval.batch_size, draws=draws, progress=progress,
                                       **params)
    return {"clean": clean, "attacks": results}


def _expected(correct: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness; for (draws, N) a sample counts if correct in most draws."""
    return correct if correct.dim() == 1 else correct.float().mean(0) >= 0.5


def summarize(row: dict) -> dict:
    clean = row["clean"]
    out = {"top1": robust_metrics(clean, clean)["clean_acc"]}
    for name, correct in row["attacks"].items():
        out[name] = robust_metrics(clean, correct)
    if row["attacks"]:
        worst = worst_case({k: _expected(v) for k, v in row["attacks"].items()})
        out["worst"] = robust_metrics(_expected(clean), worst)
    return out


def black_box(model, undefended, surrogate, x, y, raw, cfg: Config, progress: bool) -> dict:
    """Square on the defended model, transfer attacks, random noise and corruptions."""
    e = cfg.eval
    bs = e.batch_size
    randomized = isinstance(model.random_pad, RandomResizePad)
    draws = e.draws if randomized else 1
    out = {}
    reseed(model, e.seed)
    gen = torch.Generator().manual_seed(e.seed)
    out["Square (score-based, Linf)"] = run_attack("square", model, x, y, bs, draws=draws, progress=progress,
                                                   eps=e.eps_linf, steps=e.square_queries, generator=gen)
    sources = [("transfer PGD-Linf from the same weights without GCM", undefended)]
    if surrogate is not None:
        sources.append(("transfer PGD-Linf from an independent checkpoint", surrogate))
    for label, source in sources:
        gen = torch.Generator().manual_seed(e.seed)
        adv = torch.cat([_pgd_on(source, x[i:i + bs], y[i:i + bs], cfg, gen) for i in range(0, len(x), bs)])
        reseed(model, e.seed)
        out[label] = run_attack("noise", model, adv, y, bs, draws=draws, eps=0.0)
    gen = torch.Generator().manual_seed(e.seed)
    reseed(model, e.seed)
    out["random noise (Linf, same eps)"] = run_attack("noise", model, x, y, bs, draws=draws, eps=e.eps_linf,
                                                      generator=gen)
    for name, make in CORRUPTIONS.items():
        for severity in e.corruption_severities:
            transform = make(int(severity))
            transform.set_random_seed(e.seed)
            images = np.stack([transform(image=img)["image"] for img in raw])
            xc = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
            reseed(model, e.seed)
            out[f"corruption {name} s{severity}"] = run_attack("noise", model, xc, y, bs, draws=draws, eps=0.0)
    return out


def _pgd_on(model, x, y, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    from infer.attacks import pgd

    eps = cfg.eval.eps_linf
    return pgd(model, x, y, eps, norm="linf", steps=cfg.eval.steps, step_size=cfg.eval.step_ratio * eps,
               restarts=cfg.eval.restarts, generator=gen)


def eps_curve(models: dict, x, y, cfg: Config) -> dict:
    """PGD-Linf accuracy vs eps for each row (adaptive = BPDA + EOT)."""
    e = cfg.eval
    curves = {}
    for key, model in models.items():
        accs = []
        for eps in e.eps_curve:
            reseed(model, e.seed)
            randomized = isinstance(model.random_pad, RandomResizePad)
            params = {"eps": float(eps), "steps": e.steps, "step_size": e.step_ratio * float(eps),
                      "generator": torch.Generator().manual_seed(e.seed)}
            if key == "adaptive" and randomized:
                params["eot_samples"] = e.eot_samples
            draws = e.draws if randomized else 1
            if key == "adaptive":
                with bpda(model):
                    correct = run_attack("pgd_linf", model, x, y, e.batch_size, draws=draws, **params)
            else:
                correct = run_attack("pgd_linf", model, x, y, e.batch_size, draws=draws, **params)
            accs.append(100.0 * float(correct.float().mean()))
        curves[key] = accs
    return curves


def sanity_checks(table: dict, bb: dict, curves: dict, cfg: Config) -> list[str]:
    notes = []
    for key, label in ROWS:
        row = table.get(key, {})
        if "fgsm" in row and "pgd_linf" in row and row["pgd_linf"]["robust_acc"] > row["fgsm"]["robust_acc"] + 1e-9:
            notes.append(f"WARNING: {label}: PGD-Linf ({row['pgd_linf']['robust_acc']:.1f}%) is weaker than FGSM "
                         f"({row['fgsm']['robust_acc']:.1f}%): iterative attacks should succeed at least as often")
    und = curves.get("undefended", [])
    if und:
        falling = all(b <= a + 1.0 for a, b in zip(und, und[1:]))
        if not falling or und[-1] > 10.0:
            notes.append(f"WARNING: undefended accuracy along eps {['%.4f' % v for v in cfg.eval.eps_curve]} is "
                         f"{['%.1f' % v for v in und]}: it should fall toward 0; the attack may be too weak")
        else:
            notes.append(f"ok: undefended accuracy falls with eps to {und[-1]:.1f}% at eps={cfg.eval.eps_curve[-1]:.4f}")
    top1 = table["gcm"]["top1"]
    noise = bb["random noise (Linf, same eps)"]["robust_acc"]
    notes.append(f"{'ok' if noise >= top1 - 10 else 'WARNING'}: random noise at the same eps leaves {noise:.1f}% "
                 f"(clean {top1:.1f}%)")
    white = table["gcm"].get("pgd_linf", {}).get("robust_acc")
    if white is not None:
        for label, res in bb.items():
            if (label.startswith("Square") or label.startswith("transfer")) and res["robust_acc"] < white - 1e-9:
                notes.append(f"WARNING: GRADIENT MASKING: {label} ({res['robust_acc']:.1f}%) beats white-box PGD-Linf "
                             f"on the GCM model ({white:.1f}%): the white-box number overstates robustness")
        adaptive = table["adaptive"].get("pgd_linf", {}).get("robust_acc")
        if adaptive is not None and adaptive < white - 5:
            notes.append(f"WARNING: GRADIENT MASKING: BPDA through GCM lowers PGD-Linf accuracy from {white:.1f}% to "
                         f"{adaptive:.1f}%")
    return notes


def verdict(table: dict) -> str:
    und, gcm, ada = (table[k].get("pgd_linf", {}).get("robust_acc") for k in ("undefended", "gcm", "adaptive"))
    if None in (und, gcm, ada):
        return "PGD-Linf was not run: no verdict."
    return (f"GCM raises PGD-Linf accuracy from {und:.1f}% (undefended) to {gcm:.1f}% under the standard white-box "
            f"attack, but the adaptive attack (BPDA through GCM) brings it to {ada:.1f}%: the real white-box "
            f"robustness is {ada:.1f}%, {'about the same as' if abs(ada - und) <= 5 else 'vs'} the undefended "
            f"{und:.1f}%. GCM is gradient masking: it leaves predictions unchanged and only stops attackers who "
            "differentiate through it naively (as the challenge's standard white-box attacks may); it buys nothing "
            "against adaptive, transfer or score-based attacks.")


def _fmt(res: dict) -> str:
    ar = res["ar"]
    return f"{res['robust_acc']:.1f} (AR {ar:.1f})" if not math.isnan(ar) else f"{res['robust_acc']:.1f}"


def render_markdown(table: dict, bb: dict, notes: list[str], text: str, meta: dict) -> str:
    cols = [(k, t) for k, t in COLUMNS if k in next(iter(table.values()))]
    lines = [f"Evaluated {meta['n']} images from the {meta['source']}; eps Linf {meta['eps_linf']:.4f}, "
             f"L2 {meta['eps_l2']:g}, L1 {meta['eps_l1']:g}; {meta['steps']} PGD steps. "
             "Accuracy % under attack (AR = % of clean-correct images that stay correct, RobustART).", "",
             "| model | Top-1 | " + " | ".join(t for _, t in cols) + " | worst case |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for key, label in ROWS:
        row = table[key]
        cells = [f"{row['top1']:.1f}"] + [_fmt(row[k]) for k, _ in cols] + [_fmt(row["worst"]) if "worst" in row else "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| black-box / transfer / corruption (on the GCM model) | accuracy % | AR |", "|---|---|---|"]
    for label, res in bb.items():
        ar = "-" if math.isnan(res["ar"]) else f"{res['ar']:.1f}"
        lines.append(f"| {label} | {res['robust_acc']:.1f} | {ar} |")
    lines += ["", "Sanity checks:", ""] + [f"- {n}" for n in notes] + ["", f"**Verdict.** {text}", ""]
    return "\n".join(lines)


def render_csv(table: dict, bb: dict, meta: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "attack", "clean_acc", "robust_acc", "ar", "n"])
    for key, _ in ROWS:
        for name, res in table[key].items():
            if name != "top1":
                writer.writerow([key, name, f"{res['clean_acc']:.2f}", f"{res['robust_acc']:.2f}", f"{res['ar']:.2f}",
                                 meta["n"]])
    for label, res in bb.items():
        writer.writerow(["gcm", label, f"{res['clean_acc']:.2f}", f"{res['robust_acc']:.2f}", f"{res['ar']:.2f}",
                         meta["n"]])
    return buf.getvalue()


def plot_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def bars_png(table: dict) -> bytes:
    names = ["top1"] + [k for k, _ in COLUMNS if k in table["gcm"]]
    titles = dict(COLUMNS, top1="Top-1")

    def draw(ax):
        width = 0.8 / len(ROWS)
        for i, (key, label) in enumerate(ROWS):
            vals = [table[key]["top1"] if n == "top1" else table[key][n]["robust_acc"] for n in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=label)
        ax.set_xticks([j + width for j in range(len(names))], [titles[n] for n in names])
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)

    return plot_png(draw)


def curve_png(curves: dict, eps: Sequence[float]) -> bytes:
    def draw(ax):
        for key, label in ROWS:
            ax.plot([e * 255 for e in eps], curves[key], marker="o", label=label)
        ax.set_xlabel("PGD Linf eps (x/255)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)

    return plot_png(draw)


def log_wandb(cfg: Config, out_dir: Path, md: str, table_rows: list) -> str:
    from train.tracking import resolve_wandb_mode

    mode, _ = resolve_wandb_mode(cfg.wandb.mode, cfg.wandb.timeout) if cfg.wandb.mode != "disabled" else ("disabled", "")
    if mode == "disabled":
        return mode
    import wandb

    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=f"{cfg.name}-eval",
                     dir=str(out_dir), mode=mode, job_type="evaluate",
                     settings=wandb.Settings(init_timeout=max(cfg.wandb.timeout, 30.0), console="off"))
    run.log({"eval/table": wandb.Table(columns=["model", "attack", "clean_acc", "robust_acc", "ar"], data=table_rows),
             "eval/bars": wandb.Image(str(out_dir / "eval_bars.png")),
             "eval/eps_curve": wandb.Image(str(out_dir / "eval_eps_curve.png"))})
    run.finish()
    return mode


def _clean_json(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean_json(v) for v in obj]
    return obj


def run(cfg: Config, progress: bool = True) -> dict:
    """Evaluate and write the report; returns the numbers."""
    torch.manual_seed(cfg.eval.seed)
    checkpoints = resolve_checkpoints(cfg)
    members, infos = load_members(checkpoints, cfg.data.num_classes)
    size = input_size_of(infos)
    defended = build_defended_model(members, infos, cfg)
    undefended = build_defended_model(members, infos, cfg, defense=False)
    surrogate = None
    if cfg.eval.surrogate:
        s_members, s_infos = load_members([cfg.eval.surrogate], cfg.data.num_classes)
        surrogate = build_defended_model(s_members, s_infos, cfg, defense=False)
    x, y, raw, source = load_eval_images(cfg, size)
    print(f"evaluate: {len(x)} images from the {source}, {len(members)} member(s), "
          f"GCM {'on' if cfg.gcm.enabled else 'off'}, random pad {'on' if cfg.random_pad.enabled else 'off'}")

    rows = {"undefended": run_row(undefended, x, y, cfg, False, progress),
            "gcm": run_row(defended, x, y, cfg, False, progress),
            "adaptive": run_row(defended, x, y, cfg, True, progress)}
    table = {k: summarize(v) for k, v in rows.items()}
    bb_raw = black_box(defended, undefended, surrogate, x, y, raw, cfg, progress)
    clean = rows["gcm"]["clean"]
    bb = {k: robust_metrics(clean, v) for k, v in bb_raw.items()}
    curves = eps_curve({"undefended": undefended, "gcm": defended, "adaptive": defended}, x, y, cfg)
    notes = sanity_checks(table, bb, curves, cfg)
    text = verdict(table)
    meta = {"n": len(x), "source": source, "eps_linf": cfg.eval.eps_linf, "eps_l2": cfg.eval.eps_l2,
            "eps_l1": cfg.eval.eps_l1, "steps": cfg.eval.steps}
    md = render_markdown(table, bb, notes, text, meta)

    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else cfg.run_dir / "eval"
    atomic_write_text(out_dir / "eval.md", md)
    csv_text = render_csv(table, bb, meta)
    atomic_write_text(out_dir / "eval.csv", csv_text)
    result = {"table": table, "black_box": bb, "eps_curve": {"eps": cfg.eval.eps_curve, **curves},
              "sanity": notes, "verdict": text, **meta, "checkpoints": checkpoints}
    atomic_write_text(out_dir / "eval.json", json.dumps(_clean_json(result), indent=2) + "\n")
    atomic_write_bytes(out_dir / "eval_bars.png", bars_png(table))
    atomic_write_bytes(out_dir / "eval_eps_curve.png", curve_png(curves, cfg.eval.eps_curve))
    table_rows = [r for r in csv.reader(io.StringIO(csv_text))][1:]
    log_wandb(cfg, out_dir, md, [r[:5] for r in table_rows])
    print(md)
    print(f"wrote {out_dir}/eval.md, eval.csv, eval.json, eval_bars.png, eval_eps_curve.png")
    return {**result, "out_dir": str(out_dir)}


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh evaluate", "Local robustness leaderboard.").parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
