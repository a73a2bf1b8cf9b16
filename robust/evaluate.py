"""``./run.sh evaluate``: a local leaderboard that tells the truth about GCM.

Every number comes from the exact model ``submit`` builds (:func:`build_defended_model`):

* main table, laid out like the paper's (Top-1, FGSM, PGD-L1, PGD-L2, PGD-Linf, C&W, plus the
  per-sample worst case), with three rows: the undefended model (same members and TTA, no
  GCM / random pad), the defended model under the standard white-box attacks the paper
  reports, and the defended model under adaptive attacks (BPDA straight through GCM, EOT over
  the random resize-pad layer);
* second table on the defended model: Square (score-based black box), transfer attacks from
  the same weights without the defense and from an independent checkpoint and a random-noise
  baseline;
* ImageNet-C's 15 common and 4 held-out corruptions at severities 1..5 on the defended model
  (:mod:`robust.corruptions`), with mCE against ``eval.corruption_baseline``;
* PGD-Linf accuracy against eps for the three rows, sanity checks and a verdict computed
  from the numbers (:mod:`robust.verdict`). :mod:`robust.report` writes them (Markdown, CSV,
  JSON, two PNGs, W&B).

Randomized models are scored by expected accuracy over ``eval.draws`` forward passes; each
attack and each scoring pass reseeds the random layer, so a run is reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from core.checkpoint import resolve_checkpoint_files
from core.cli import create_parser, parse_config, quiet_libraries, run_cli
from core.config import Config
from core.devices import create_accelerator, default_device
from core.errors import UserError
from core.io import remove_leftovers
from core.outputs import check_outputs, hold_output
from core.tracking import model_lineage
from gcm import DefendedModel
from infer.defended import build_defended_model, input_size_of, load_members, resolve_member_paths
from robust.corruptions import add_mce, run_corruptions, summarize, training_counterparts
from robust.eval_images import load_eval_images
from robust.metrics import worst_case
from robust.report import eval_out_dir, report_files, write_report
from robust.results import EvalResult, Row, Score
from robust.runner import Overall, accuracy, craft, score
from robust.specs import PAPER_COLUMNS, SPECS
from robust.verdict import describe_defense, sanity_checks, verdict

# --- rows and tables -----------------------------------------------------------------------


# The run's attacks done of those planned (set by evaluate_into while it prints progress).
_overall: list[Overall] = []


def _progress_line(progress: bool, label: str, correct: torch.Tensor, start: float) -> None:
    if progress:
        overall = f"; {_overall[-1].step()}" if _overall else ""
        print(f"  {label}: {accuracy(correct):.1f}% ({time.perf_counter() - start:.0f} s{overall})", flush=True)


def count_attacks(cfg: Config, reused: dict[str, str], surrogate: bool) -> int:
    """The attacks :func:`evaluate_into` runs with a progress line (the corruption cells count as
    one): the total of its overall progress."""
    e = cfg.eval
    rows = 3 - sum(key in reused for key in ("defended", "adaptive"))
    per_row = sum(spec.name in e.attacks for spec in PAPER_COLUMNS)
    known = "pgd_linf" in e.attacks and any(math.isclose(v, e.eps_linf, rel_tol=1e-3) for v in e.eps_curve)
    curve = len(e.eps_curve) - known
    corruptions = bool(e.corruptions and e.corruption_severities)
    black_box = ("square" in e.attacks) + ("transfer" in e.attacks and surrogate)
    return rows * (per_row + curve) + black_box + corruptions


def run_row(
    model: DefendedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: Config,
    *,
    adaptive: bool = False,
    clean: torch.Tensor | None = None,
    keep: Sequence[str] = (),
    progress: bool = False,
    desc: str = "",
) -> dict:
    """Clean and per-attack correctness for one row of the main table.

    Returns ``{"clean": ..., "attacks": {name: correctness}, "adv": {name: images}}`` with the
    adversarial images of the attacks named in ``keep`` (reused as transfer attacks).
    """
    clean = score(model, x, y, cfg) if clean is None else clean
    attacks, kept = {}, {}
    for spec in PAPER_COLUMNS:
        if spec.name not in cfg.eval.attacks:
            continue
        start = time.perf_counter()
        adv = craft(spec.name, model, x, y, cfg, adaptive=adaptive, progress=progress, desc=f"{desc}: {spec.title}")
        attacks[spec.name] = score(model, adv, y, cfg)
        if spec.name in keep:
            kept[spec.name] = adv
        _progress_line(progress, f"{desc}: {spec.title}", attacks[spec.name], start)
    return {"clean": clean, "attacks": attacks, "adv": kept}


def summarize_row(label: str, clean: torch.Tensor, attacks: dict[str, torch.Tensor], cfg: Config) -> Row:
    """Top-1 and RobustART metrics per attack, plus the per-sample worst case over the row's attacks."""
    row = Row(label, accuracy(clean))
    for name, correct in attacks.items():
        spec = SPECS[name]
        row.attacks[name] = Score.measure(
            name, spec.title, spec.norm, spec.budget(cfg.eval), spec.steps(cfg.eval), clean, correct
        )
    if attacks:
        row.worst_case = Score.measure("worst_case", "worst case", "all", None, 0, clean, worst_case(attacks))
    return row


def run_curve(
    model: DefendedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: Config,
    *,
    adaptive: bool = False,
    known: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "",
) -> list[float]:
    """PGD-Linf accuracy (%) at each ``eval.eps_curve`` eps; ``known`` is the result at ``eval.eps_linf``."""
    accs = []
    for eps in cfg.eval.eps_curve:
        # rel_tol: an eps written in a config with a few digits (0.0314 for 8/255) is the same point
        if known is not None and math.isclose(eps, cfg.eval.eps_linf, rel_tol=1e-3):
            accs.append(accuracy(known))
            continue
        start = time.perf_counter()
        adv = craft(
            "pgd_linf",
            model,
            x,
            y,
            cfg,
            eps=eps,
            adaptive=adaptive,
            progress=progress,
            desc=f"{desc}: eps {eps * 255:.3g}/255",
        )
        correct = score(model, adv, y, cfg)
        _progress_line(progress, f"{desc}: PGD-Linf eps {eps * 255:.3g}/255", correct, start)
        accs.append(accuracy(correct))
    return accs


def run_black_box(
    model: DefendedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: Config,
    clean: torch.Tensor,
    transfers: Sequence[tuple[str, str, torch.Tensor]],
    progress: bool = False,
) -> list[tuple[Score, torch.Tensor]]:
    """Square, transfer attacks and random noise on ``model``, each with its correctness.

    ``clean`` is the model's correctness on ``x``; ``transfers`` are ``(key, label, adversarial
    images crafted on another model)``.
    """
    e = cfg.eval
    out = []

    def add(attack: str, label: str, norm: str, eps: float | None, steps: int, images: torch.Tensor) -> None:
        correct = score(model, images, y, cfg)
        out.append((Score.measure(attack, label, norm, eps, steps, clean, correct), correct))

    if "square" in e.attacks:
        start = time.perf_counter()
        spec = SPECS["square"]
        adv = craft("square", model, x, y, cfg, progress=progress, desc="defended: Square")
        add(
            "square",
            f"Square (score-based black box, Linf, {e.square_queries} queries)",
            spec.norm,
            spec.budget(e),
            spec.steps(e),
            adv,
        )
        _progress_line(progress, "defended: Square", out[-1][1], start)
    spec = SPECS["transfer"]
    for key, label, adv in transfers:
        add(key, label, spec.norm, spec.budget(e), spec.steps(e), adv)
    if "noise" in e.attacks:
        spec = SPECS["noise"]
        add(
            "noise",
            "random noise (Linf, full budget)",
            spec.norm,
            spec.budget(e),
            spec.steps(e),
            craft("noise", model, x, y, cfg),
        )
    return out


def run_corruption_rows(
    defended: DefendedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    keys: Sequence[str],
    cfg: Config,
    clean: torch.Tensor,
    infos: Sequence[dict],
    progress: bool = False,
) -> dict:
    """ImageNet-C on the defended model (and the ``eval.corruption_baseline`` model, for mCE), each
    cell corrupted once and scored by both; the summary per model as a plain dict.

    The defended model's figures are also the adaptive row's (a corruption uses no gradient, so
    BPDA changes nothing) and, without a random layer, the undefended row's (GCM changes no
    prediction).
    """
    e = cfg.eval
    if not e.corruptions or not e.corruption_severities:
        return {}
    models = {"defended": defended}
    if e.corruption_baseline:
        b_members, b_infos = load_members([e.corruption_baseline], cfg.data.num_classes)
        device = next(defended.parameters()).device
        models["baseline"] = build_defended_model(b_members, b_infos, cfg, defense=False).to(device)
    start = time.perf_counter()
    correct = run_corruptions(models, x, y, keys, cfg, progress)
    summaries = {"defended": summarize(correct["defended"], clean)}
    if "baseline" in models:
        summaries["baseline"] = summarize(correct["baseline"], score(models["baseline"], x, y, cfg))
        add_mce(summaries["defended"], summaries["baseline"])
    if progress:
        mean = summaries["defended"].imagenet_c
        overall = f"; {_overall[-1].step()}" if _overall else ""
        print(
            f"  corruptions: {len(correct['defended'])} cells ({time.perf_counter() - start:.0f} s{overall})",
            flush=True,
        )
        if mean is not None:
            print(f"  ImageNet-C mean over the common cells run: {mean:.1f}%", flush=True)
    saved = infos[0].get("config", {}) if infos else {}
    return {
        "models": {k: dataclasses.asdict(v) for k, v in summaries.items()},
        "baseline": e.corruption_baseline,
        "training_counterparts": training_counterparts(saved),
    }


# --- the stage -----------------------------------------------------------------------------


def run(cfg: Config, progress: bool = True) -> EvalResult:
    """Evaluate the defended model of ``cfg``, write the report and return the numbers.

    ``./run.sh evaluate eval.file=FILE`` attacks an exported Phase II file instead: the launcher
    runs :mod:`phase2.score` for it.
    """
    if cfg.eval.file:
        raise UserError("eval.file: run ./run.sh evaluate eval.file=FILE (phase2.score attacks a file)")
    out_dir = eval_out_dir(cfg)
    check_outputs(list(report_files(out_dir).values()), "evaluate", "eval.out_dir")  # before hours of attacks
    accelerator = create_accelerator("no")  # attacks in float32: a coarser gradient is a weaker attack
    progress = progress and accelerator.is_main_process
    with hold_output(out_dir, "evaluate", "eval.out_dir", accelerator):
        if accelerator.is_main_process:  # the lock's holder: leftovers of a killed run
            remove_leftovers(report_files(out_dir).values())
        return evaluate_into(cfg, out_dir, progress, accelerator)


@dataclasses.dataclass
class Models:
    """The models one evaluation attacks, built once from the checkpoints of ``cfg``."""

    checkpoints: list
    infos: list[dict]
    undefended: DefendedModel
    defended: DefendedModel
    surrogate: DefendedModel | None


def build_models(cfg: Config, device: torch.device) -> Models:
    """The defended model ``submit`` predicts with, its undefended twin and the transfer surrogate."""
    checkpoints = resolve_member_paths(cfg)
    members, infos = load_members(checkpoints, cfg.data.num_classes)
    surrogate = None
    if cfg.eval.surrogate and "transfer" in cfg.eval.attacks:
        s_members, s_infos = load_members([cfg.eval.surrogate], cfg.data.num_classes)
        surrogate = build_defended_model(s_members, s_infos, cfg, defense=False).to(device)
    return Models(
        checkpoints=checkpoints,
        infos=infos,
        undefended=build_defended_model(members, infos, cfg, defense=False).to(device),
        defended=build_defended_model(members, infos, cfg).to(device),
        surrogate=surrogate,
    )


def same_as_undefended(defended: DefendedModel) -> dict[str, str]:
    """Rows that are provably the undefended row's computation, each with the reason.

    Without a random layer, BPDA through GCM differentiates the undefended model (GCM's backward is
    the identity) and GCM's forward changes no prediction (it moves a pixel by at most 1e-8), so
    the adaptive row repeats the undefended one; without GCM either, so does the standard row.
    Ensemble and TTA are the same in all three rows and change nothing here; random pad does.
    """
    if defended.randomized:
        return {}
    if defended.gcm is None:
        reason = "same as undefended: no defense layer"
        return {"defended": reason, "adaptive": reason}
    return {"adaptive": "same as undefended: BPDA through a deterministic GCM"}


def row_labels(defense: str, adaptive_attack: str, reused: dict[str, str]) -> dict[str, str]:
    labels = {
        "undefended": "undefended",
        "defended": f"{defense} (standard white-box, as in the paper)",
        "adaptive": f"{defense} (adaptive: {adaptive_attack})",
    }
    return {k: f"{v}; {reused[k]}" if k in reused else v for k, v in labels.items()}


def run_rows(
    models: Models, x: torch.Tensor, y: torch.Tensor, cfg: Config, reused: dict[str, str], progress: bool
) -> dict[str, dict]:
    """The main table's three rows (see :func:`run_row`); a row in ``reused`` is the undefended row's."""
    keep = ["pgd_linf"] if "transfer" in cfg.eval.attacks else []
    raw = {"undefended": run_row(models.undefended, x, y, cfg, keep=keep, progress=progress, desc="undefended")}
    for key in ("defended", "adaptive"):
        if key in reused:
            if progress:
                print(f"  {key}: {reused[key]} (not computed again)", flush=True)
            raw[key] = raw["undefended"]
        elif key == "defended":
            raw[key] = run_row(models.defended, x, y, cfg, progress=progress, desc=key)
        else:
            clean = raw["defended"]["clean"]
            raw[key] = run_row(models.defended, x, y, cfg, adaptive=True, clean=clean, progress=progress, desc=key)
    return raw


def craft_transfers(
    models: Models, x: torch.Tensor, y: torch.Tensor, cfg: Config, raw: dict, progress: bool
) -> list[tuple[str, str, torch.Tensor]]:
    """Transfer attacks for :func:`run_black_box`: PGD-Linf from the undefended twin and the surrogate."""
    if "transfer" not in cfg.eval.attacks:
        return []
    same = raw["undefended"]["adv"].get("pgd_linf")
    if same is None:
        same = craft("pgd_linf", models.undefended, x, y, cfg)
    transfers = [("transfer_same_weights", "transfer PGD-Linf from the same weights without the defense", same)]
    if models.surrogate is not None:
        transfers.append(
            (
                "transfer_surrogate",
                f"transfer PGD-Linf from an independent checkpoint ({cfg.eval.surrogate})",
                craft("pgd_linf", models.surrogate, x, y, cfg, progress=progress, desc="surrogate"),
            )
        )
        if progress and _overall:
            print(f"  surrogate: PGD-Linf images crafted ({_overall[-1].step()})", flush=True)
    return transfers


def black_box_with_worst_case(
    measured: list[tuple[Score, torch.Tensor]], raw: dict, clean: torch.Tensor, defense: str
) -> list[Score]:
    """The black-box scores, then the per-image worst case over them and the defended rows' attacks."""
    black_box = [s for s, _ in measured]
    adversarial = {f"defended/{k}": v for k, v in raw["defended"]["attacks"].items()}
    adversarial.update({f"adaptive/{k}": v for k, v in raw["adaptive"]["attacks"].items()})
    adversarial.update({s.attack: c for s, c in measured if s.attack == "square" or s.attack.startswith("transfer")})
    if adversarial:
        label = f"worst case per image over every attack above and in the {defense} rows"
        black_box.append(Score.measure("worst_case", label, "all", None, 0, clean, worst_case(adversarial)))
    return black_box


def run_curves(
    models: Models, x: torch.Tensor, y: torch.Tensor, cfg: Config, raw: dict, reused: dict[str, str], progress: bool
) -> dict:
    """PGD-Linf accuracy against ``eval.eps_curve`` for the three rows (a reused row's is the undefended one's)."""
    curve: dict = {"eps": [float(v) for v in cfg.eval.eps_curve]}
    if not cfg.eval.eps_curve:
        return curve
    for key, model, adaptive in (
        ("undefended", models.undefended, False),
        ("defended", models.defended, False),
        ("adaptive", models.defended, True),
    ):
        if key in reused:
            curve[key] = curve["undefended"]
            continue
        known = raw[key]["attacks"].get("pgd_linf")
        curve[key] = run_curve(model, x, y, cfg, adaptive=adaptive, known=known, progress=progress, desc=f"{key} curve")
    return curve


# The eval settings eval.json records: how hard each attack tried.
SETTING_KEYS = (
    "eps_linf",
    "eps_l2",
    "eps_l1",
    "steps",
    "step_ratio",
    "restarts",
    "cw_steps",
    "square_queries",
    "aa_version",
    "aa_attacks",
    "aa_iters",
    "aa_target_classes",
    "aa_queries",
    "eot_samples",
    "draws",
    "seed",
)


def evaluate_into(cfg: Config, out_dir: Path, progress: bool = True, accelerator=None) -> EvalResult:
    """The body of :func:`run`, under the lock of ``out_dir``; with several processes only the main
    one writes the report."""
    start = time.perf_counter()
    e = cfg.eval
    torch.manual_seed(e.seed)
    device = accelerator.device if accelerator is not None else default_device()
    processes = accelerator.num_processes if accelerator is not None else 1
    models = build_models(cfg, device)
    x, y, source, keys = load_eval_images(cfg, input_size_of(models.infos))
    defense, adaptive_attack = describe_defense(cfg)
    reused = same_as_undefended(models.defended)
    total = count_attacks(cfg, reused, models.surrogate is not None)
    if progress:
        print(
            f"evaluate: {len(x)} images from the {source}, {len(models.checkpoints)} member(s), defense: {defense}, "
            f"{processes} process(es) on {device.type}; {total} attacks to run",
            flush=True,
        )
        _overall.append(Overall(total, "attacks"))
    try:
        raw = run_rows(models, x, y, cfg, reused, progress)
        labels = row_labels(defense, adaptive_attack, reused)
        clean = raw["defended"]["clean"]
        transfers = craft_transfers(models, x, y, cfg, raw, progress)
        measured = run_black_box(models.defended, x, y, cfg, clean, transfers, progress)
        corruption = run_corruption_rows(models.defended, x, y, keys, cfg, clean, models.infos, progress)
        curve = run_curves(models, x, y, cfg, raw, reused, progress)
        result = EvalResult(
            n=len(x),
            source=source,
            defense=defense,
            adaptive_attack=adaptive_attack,
            checkpoints=models.checkpoints,
            surrogate=e.surrogate if models.surrogate is not None else "",
            settings={**{k: getattr(e, k) for k in SETTING_KEYS}, "cw_max_norm": SPECS["cw_l2"].budget(e)},
            randomized=models.defended.randomized,
            rows={k: summarize_row(labels[k], v["clean"], v["attacks"], cfg) for k, v in raw.items()},
            black_box=black_box_with_worst_case(measured, raw, clean, defense),
            eps_curve=curve,
            corruption=corruption,
            input_models=[
                model_lineage(resolve_checkpoint_files(c)[0].with_suffix(""), info)
                for c, info in zip(models.checkpoints, models.infos)
            ],
        )
        result.sanity = sanity_checks(result)
        result.verdict = verdict(result)
        result.seconds = round(time.perf_counter() - start, 1)
        result.out_dir = str(out_dir)
        if accelerator is None or accelerator.is_main_process:
            result.files = write_report(result, out_dir, cfg, echo=progress)
        return result
    finally:
        _overall.clear()


def main(argv: Sequence[str] | None = None) -> EvalResult:
    quiet_libraries()
    args = create_parser(
        "run.sh evaluate",
        "Local robustness leaderboard: clean, corruptions, black-box, "
        "white-box and adaptive attacks on the defended model.",
    ).parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
