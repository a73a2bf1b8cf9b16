"""``./run.sh evaluate``: a local leaderboard that tells the truth about GCM.

Every number comes from the exact model ``submit`` builds (:func:`build_defended_model`):

* main table, laid out like the paper's (Top-1, FGSM, PGD-L1, PGD-L2, PGD-Linf, C&W, plus the
  per-sample worst case), with three rows: the undefended model (same members and TTA, no
  GCM / random pad), the defended model under the standard white-box attacks the paper
  reports, and the defended model under adaptive attacks (BPDA straight through GCM, EOT over
  the random resize-pad layer);
* second table on the defended model: Square (score-based black box), transfer attacks from
  the same weights without the defense and from an independent checkpoint, a random-noise
  baseline and corruptions at several severities;
* PGD-Linf accuracy against eps for the three rows, sanity checks and a verdict computed
  from the numbers. :mod:`infer.report` writes them (Markdown, CSV, JSON, two PNGs, W&B).

Randomized models are scored by expected accuracy over ``eval.draws`` forward passes; each
attack and each scoring pass reseeds the random layer, so a run is reproducible.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import albumentations as A
import numpy as np
import torch
from tqdm.auto import tqdm

from gcm import RandomResizePad, bpda
from infer.attacks import EOT, eval_mode, lp_norm, resolve_attack, robust_metrics, worst_case
from infer.defended import DefendedClassifier, build_defended_model, input_size_of, load_members, resolve_checkpoints
from infer.report import write_report
from train.cli import create_parser, parse_config, quiet_libraries, run_cli
from train.config import Config, ConfigError, resolve_path
from train.data import ImageDataset, list_test_images, read_test_labels, resolve_samples
from train.engine import to_float_images
from train.errors import UserError
from train.transforms import create_eval_transform

# The paper's white-box columns, in its order.
COLUMNS = (("fgsm", "FGSM"), ("pgd_l1", "PGD-L1"), ("pgd_l2", "PGD-L2"), ("pgd_linf", "PGD-Linf"), ("cw_l2", "C&W"))
BLACK_BOX = ("square", "transfer", "noise")
NORM_OF = {"fgsm": "linf", "pgd_linf": "linf", "pgd_l2": "l2", "pgd_l1": "l1", "cw_l2": "l2", "square": "linf",
           "noise": "linf"}
MASKING_POINTS = 5.0  # accuracy drop that counts as "the adaptive attack found masked gradients"
_ULP = float(torch.finfo(torch.float32).eps)  # spacing of float32 numbers at 1.0


@dataclass(frozen=True)
class Corruption:
    """A corruption family: severity 1..5 selects ``levels[severity - 1]`` for ``param``."""

    name: str
    param: str
    levels: tuple[float, ...]
    make: Callable[[float, int], A.ImageOnlyTransform]  # (level, image size) -> transform


# ImageNet-C's levels (Hendrycks & Dietterich 2019), applied with albumentations to the uint8
# images at the evaluation size. Blur sigmas are ImageNet-C's 224 px values scaled to the image
# size; brightness adds its level x 255 to every channel (ImageNet-C shifts HSV value).
CORRUPTIONS = (
    Corruption("gaussian_noise", "std (x255)", (0.08, 0.12, 0.18, 0.26, 0.38),
               lambda v, size: A.GaussNoise(std_range=(v, v), p=1.0)),
    Corruption("gaussian_blur", "sigma at 224 px", (1.0, 2.0, 3.0, 4.0, 6.0),
               lambda v, size: A.GaussianBlur(sigma_limit=(v * size / 224,) * 2, blur_limit=0, p=1.0)),
    Corruption("jpeg", "quality", (25, 18, 15, 10, 7),
               lambda v, size: A.ImageCompression(quality_range=(int(v), int(v)), p=1.0)),
    Corruption("brightness", "+ level x 255", (0.1, 0.2, 0.3, 0.4, 0.5),
               lambda v, size: A.RandomBrightnessContrast(brightness_limit=(v, v), contrast_limit=(0.0, 0.0), p=1.0)),
)


# --- configuration and data ----------------------------------------------------------------

def validate_eval_config(cfg: Config) -> None:
    """Checks of the ``eval`` section that a single key's type cannot express."""
    e = cfg.eval
    known = [k for k, _ in COLUMNS] + list(BLACK_BOX)
    for name in e.attacks:
        if name not in known:
            raise ConfigError(f"config key 'eval.attacks': unknown attack '{name}' (known: {', '.join(known)})")
    for key in ("batch_size", "steps", "cw_steps", "square_queries", "eot_samples", "draws", "restarts"):
        if getattr(e, key) < 1:
            raise ConfigError(f"config key 'eval.{key}' must be at least 1")
    if e.subset < 0:
        raise ConfigError("config key 'eval.subset' must be >= 0 (0 = all images)")
    for key in ("eps_linf", "eps_l2", "eps_l1", "step_ratio"):
        if getattr(e, key) <= 0:
            raise ConfigError(f"config key 'eval.{key}' must be positive")
    if e.cw_max_norm < 0 or any(v <= 0 for v in e.eps_curve):
        raise ConfigError("config keys 'eval.cw_max_norm' (>= 0) / 'eval.eps_curve' (> 0) out of range")
    if any(s not in range(1, 6) for s in e.corruption_severities):
        raise ConfigError(f"config key 'eval.corruption_severities': {e.corruption_severities} must be within 1..5")


def select_subset(n: int, subset: int, seed: int) -> np.ndarray:
    """A fixed, seeded choice of ``subset`` of ``n`` indices in their original order (all if 0)."""
    if not subset or subset >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=subset, replace=False))


def load_eval_images(cfg: Config, image_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Labelled images as one float tensor in [0, 1] at ``image_size``, their labels, and the source.

    The test folder when its hidden labels (``data.test_labels``) exist, else the validation
    split of the training data. ``eval.subset`` picks a seeded subset.
    """
    labels_path = resolve_path(cfg.data.root, cfg.data.test_labels) if cfg.data.test_labels else None
    if labels_path is not None and labels_path.is_file():
        labels = read_test_labels(labels_path, cfg.data.num_classes)
        samples = [(p, labels[i]) for p, i in list_test_images(resolve_path(cfg.data.root, cfg.data.test_dir))
                   if i in labels]
        source = f"test set ({labels_path})"
    else:
        samples = resolve_samples(cfg.data)[1]
        source = "validation split" + (f" ({labels_path} not found)" if labels_path is not None else "")
    if not samples:
        raise UserError("evaluate: no labelled images (set data.test_labels, or data.val_fraction > 0 for a "
                        "validation split)")
    samples = [samples[i] for i in select_subset(len(samples), cfg.eval.subset, cfg.eval.seed)]
    dataset = ImageDataset(samples, create_eval_transform(image_size), cfg.data.bad_images, cfg.data.max_bad_images)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return to_float_images(torch.stack(images)), torch.tensor(labels), source


def corrupt(x: torch.Tensor, corruption: Corruption, severity: int, seed: int) -> torch.Tensor:
    """``x`` (float in [0, 1], exactly k/255 values) through one corruption at ``severity``."""
    transform = corruption.make(corruption.levels[severity - 1], x.shape[-1])
    transform.set_random_seed(seed)
    raw = x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.stack([transform(image=img)["image"] for img in raw])
    return to_float_images(torch.from_numpy(out).permute(0, 3, 1, 2))


# --- attacking and scoring -----------------------------------------------------------------

def is_randomized(model: DefendedClassifier) -> bool:
    return isinstance(model.random_pad, RandomResizePad)


def reseed(model: DefendedClassifier, seed: int) -> None:
    """Restart the random layer's draws, so every attack and scoring pass is reproducible."""
    if is_randomized(model):
        model.random_pad.reset(seed)


def budget_of(cfg: Config, name: str) -> float:
    """The eps of attack ``name`` in its norm (C&W: ``cw_max_norm``, 0 -> ``eps_l2``)."""
    e = cfg.eval
    if name == "cw_l2" and e.cw_max_norm > 0:
        return e.cw_max_norm
    return {"linf": e.eps_linf, "l2": e.eps_l2, "l1": e.eps_l1}[NORM_OF[name]]


def attack_params(cfg: Config, name: str, eps: float, eot_samples: int = 1) -> dict:
    """Registry parameters (:data:`infer.attacks.ATTACKS`) of attack ``name`` from ``cfg.eval``."""
    e = cfg.eval
    params = {"eps": eps, "generator": torch.Generator().manual_seed(e.seed)}
    if name.startswith("pgd"):
        params.update(steps=e.steps, step_size=e.step_ratio * eps, restarts=e.restarts)
    elif name == "cw_l2":
        params["steps"] = e.cw_steps
    elif name == "square":
        params["steps"] = e.square_queries
    if eot_samples > 1 and name in ("fgsm", "pgd_linf", "pgd_l2", "pgd_l1"):
        params["eot_samples"] = eot_samples
    return params


def check_budget(name: str, x: torch.Tensor, adv: torch.Tensor, eps: float) -> None:
    """Raise if an adversarial image left its eps-ball or [0, 1] (a bug in an attack, never a result)."""
    norm = NORM_OF[name]
    size = float(lp_norm(adv - x, norm).max()) if len(x) else 0.0
    # x + delta is rounded to float32: up to one ulp at 1.0 per coordinate, summed by the norm.
    d = x[0].numel() if len(x) else 1
    tol = _ULP * {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d)}[norm]
    if size > eps + tol or float(adv.min()) < 0.0 or float(adv.max()) > 1.0:
        raise RuntimeError(f"attack {name} left its budget: {norm} norm {size:.6g} > eps {eps:.6g}, "
                           f"or pixels outside [0, 1] ({float(adv.min()):.4g}..{float(adv.max()):.4g})")


def craft(name: str, model: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, cfg: Config, *,
          eps: float | None = None, adaptive: bool = False, progress: bool = False, desc: str = "") -> torch.Tensor:
    """Adversarial images of attack ``name`` against ``model``, batch by batch (returned on CPU).

    ``adaptive`` attacks the defense as it is: BPDA (straight-through gradient) through GCM and,
    when the model has the random resize-pad layer, ``eval.eot_samples`` gradient samples per
    step (C&W attacks the logits averaged over that many draws). The result is checked to lie
    in the eps-ball and in [0, 1].
    """
    eps = budget_of(cfg, name) if eps is None else float(eps)
    eot = cfg.eval.eot_samples if adaptive and is_randomized(model) else 1
    params = attack_params(cfg, name, eps, eot)
    attack = resolve_attack(name)
    target = EOT(model, eot) if name == "cw_l2" and eot > 1 else model
    device = next(model.parameters()).device
    bs = cfg.eval.batch_size
    reseed(model, cfg.eval.seed)
    out = []
    with bpda(model) if adaptive else contextlib.nullcontext():
        for i in tqdm(range(0, len(x), bs), desc=desc or name, disable=not progress, leave=False):
            out.append(attack(target, x[i:i + bs].to(device), y[i:i + bs].to(device), **params).detach().cpu())
    adv = torch.cat(out)
    check_budget(name, x, adv, eps)
    return adv


@torch.no_grad()
def score(model: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Correctness per image (N,), or per draw and image (draws, N) for a randomized model.

    Scoring draws are seeded apart from the attack's (``eval.seed + 1``): the attacker does not
    get to know the defender's draws. Clean and adversarial images see the same draws.
    """
    draws = cfg.eval.draws if is_randomized(model) else 1
    device = next(model.parameters()).device
    bs = cfg.eval.batch_size
    reseed(model, cfg.eval.seed + 1)
    parts = []
    with eval_mode(model):
        for i in range(0, len(x), bs):
            xb, yb = x[i:i + bs].to(device), y[i:i + bs].to(device)
            parts.append(torch.stack([model(xb).argmax(1) == yb for _ in range(draws)]).cpu())
    out = torch.cat(parts, dim=1)
    return out[0] if draws == 1 else out


def accuracy(correct: torch.Tensor) -> float:
    return 100.0 * float(correct.float().mean())


def _progress_line(progress: bool, label: str, correct: torch.Tensor, start: float) -> None:
    if progress:
        print(f"  {label}: {accuracy(correct):.1f}% ({time.perf_counter() - start:.0f} s)", flush=True)


def run_row(model: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, cfg: Config, *, adaptive: bool = False,
            clean: torch.Tensor | None = None, keep: Sequence[str] = (), progress: bool = False,
            desc: str = "") -> dict:
    """Clean and per-attack correctness for one row of the main table.

    Returns ``{"clean": ..., "attacks": {name: correctness}, "adv": {name: images}}`` with the
    adversarial images of the attacks named in ``keep`` (reused as transfer attacks).
    """
    clean = score(model, x, y, cfg) if clean is None else clean
    attacks, kept = {}, {}
    for name, title in COLUMNS:
        if name not in cfg.eval.attacks:
            continue
        start = time.perf_counter()
        adv = craft(name, model, x, y, cfg, adaptive=adaptive, progress=progress, desc=f"{desc}: {title}")
        attacks[name] = score(model, adv, y, cfg)
        if name in keep:
            kept[name] = adv
        _progress_line(progress, f"{desc}: {title}", attacks[name], start)
    return {"clean": clean, "attacks": attacks, "adv": kept}


def run_curve(model: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, cfg: Config, *, adaptive: bool = False,
              known: torch.Tensor | None = None, progress: bool = False, desc: str = "") -> list[float]:
    """PGD-Linf accuracy (%) at each ``eval.eps_curve`` eps; ``known`` is the result at ``eval.eps_linf``."""
    accs = []
    for eps in cfg.eval.eps_curve:
        # rel_tol: an eps written in a config with a few digits (0.0314 for 8/255) is the same point
        if known is not None and math.isclose(eps, cfg.eval.eps_linf, rel_tol=1e-3):
            accs.append(accuracy(known))
            continue
        start = time.perf_counter()
        adv = craft("pgd_linf", model, x, y, cfg, eps=eps, adaptive=adaptive, progress=progress,
                    desc=f"{desc}: eps {eps * 255:.3g}/255")
        correct = score(model, adv, y, cfg)
        _progress_line(progress, f"{desc}: PGD-Linf eps {eps * 255:.3g}/255", correct, start)
        accs.append(accuracy(correct))
    return accs


def run_black_box(model: DefendedClassifier, x: torch.Tensor, y: torch.Tensor, cfg: Config,
                  transfers: Sequence[tuple[str, str, torch.Tensor]], progress: bool = False) -> list[dict]:
    """Square, transfer attacks, random noise and corruptions on ``model``.

    ``transfers`` are ``(key, label, adversarial images crafted on another model)``. Returns
    records ``{attack, label, norm, eps, steps, correct}``.
    """
    e = cfg.eval
    out = []
    if "square" in e.attacks:
        start = time.perf_counter()
        adv = craft("square", model, x, y, cfg, progress=progress, desc="defended: Square")
        out.append({"attack": "square", "label": "Square (score-based black box, Linf)", "norm": "linf",
                    "eps": e.eps_linf, "steps": e.square_queries, "correct": score(model, adv, y, cfg)})
        _progress_line(progress, "defended: Square", out[-1]["correct"], start)
    for key, label, adv in transfers:
        out.append({"attack": key, "label": label, "norm": "linf", "eps": e.eps_linf, "steps": e.steps,
                    "correct": score(model, adv, y, cfg)})
    if "noise" in e.attacks:
        adv = craft("noise", model, x, y, cfg)
        out.append({"attack": "noise", "label": "random noise (Linf, full budget)", "norm": "linf",
                    "eps": e.eps_linf, "steps": 0, "correct": score(model, adv, y, cfg)})
    for corruption in CORRUPTIONS:
        for severity in e.corruption_severities:
            xc = corrupt(x, corruption, int(severity), e.seed)
            out.append({"attack": f"corruption_{corruption.name}_s{severity}",
                        "label": f"corruption: {corruption.name}, severity {severity}", "norm": "", "eps": None,
                        "steps": 0, "correct": score(model, xc, y, cfg)})
    return out


# --- summaries, checks and verdict ---------------------------------------------------------

def describe_defense(cfg: Config) -> tuple[str, str]:
    """Names of the defense and of the adaptive attack on it, from the config."""
    parts = (["GCM"] if cfg.gcm.enabled else []) + (["random pad"] if cfg.random_pad.enabled else [])
    adaptive = (["BPDA through GCM"] if cfg.gcm.enabled else []) + \
        (["EOT over random pad"] if cfg.random_pad.enabled else [])
    return " + ".join(parts) or "no defense", ", ".join(adaptive) or "no defense layer to adapt to"


def summarize_row(clean: torch.Tensor, attacks: dict[str, torch.Tensor], cfg: Config) -> dict:
    """Top-1 and RobustART metrics per attack, plus the per-sample worst case over the row's attacks."""
    out: dict = {"top1": accuracy(clean)}
    for name, correct in attacks.items():
        out[name] = {**robust_metrics(clean, correct), "eps": budget_of(cfg, name), "norm": NORM_OF[name]}
    if attacks:
        out["worst_case"] = {**robust_metrics(clean, worst_case(attacks)), "eps": None, "norm": "all"}
    return out


def sanity_checks(rows: dict, black_box: list[dict], curve: dict, labels: dict, n: int, defense: str,
                  adaptive_attack: str) -> list[str]:
    """The checks printed under the table: each line starts with ``ok:`` or ``WARNING:``."""
    notes = ["ok: every adversarial image lies inside its eps-ball and [0, 1] (checked for every attack)"]
    one = 100.0 / max(n, 1) + 1e-9  # one image, in percent: the resolution of the numbers
    for key, row in rows.items():
        if "fgsm" in row and "pgd_linf" in row:
            fgsm, pgd = row["fgsm"]["robust_acc"], row["pgd_linf"]["robust_acc"]
            if pgd > fgsm + 1e-9:
                notes.append(f"WARNING: {labels[key]}: PGD-Linf ({pgd:.1f}%) is weaker than single-step FGSM "
                             f"({fgsm:.1f}%): an iterative attack must succeed at least as often; a sign of gradient "
                             "masking or of too few / too small steps")
            else:
                notes.append(f"ok: {labels[key]}: PGD-Linf ({pgd:.1f}%) at least as strong as FGSM ({fgsm:.1f}%)")
    und = curve.get("undefended", [])
    if und:
        eps = ", ".join(f"{v * 255:.3g}" for v in curve["eps"])
        falling = all(b <= a + one for a, b in zip(und, und[1:]))
        if falling and und[-1] <= 10.0:
            notes.append(f"ok: undefended accuracy falls as eps grows ({eps} /255) to {und[-1]:.1f}%")
        else:
            notes.append(f"WARNING: undefended accuracy along eps ({eps} /255) is "
                         f"{', '.join(f'{v:.1f}' for v in und)}%: it should fall toward 0; the attack may be too weak "
                         "(more eval.steps, a larger eval.step_ratio or more eval.restarts)")
    by_key = {r["attack"]: r for r in black_box}
    top1 = rows["defended"]["top1"]
    if "noise" in by_key:
        noise = by_key["noise"]["robust_acc"]
        tag = "ok" if noise >= top1 - 10.0 else "WARNING"
        notes.append(f"{tag}: random noise at the full Linf budget leaves {noise:.1f}% (clean {top1:.1f}%)"
                     + ("" if tag == "ok" else ": the model is fragile to plain noise of this size"))
    white = rows["defended"].get("pgd_linf", {}).get("robust_acc")
    if white is not None:
        for r in black_box:
            if (r["attack"] == "square" or r["attack"].startswith("transfer")) and r["robust_acc"] < white - 1e-9:
                notes.append(f"WARNING: GRADIENT MASKING: {r['label']} ({r['robust_acc']:.1f}%) beats standard "
                             f"white-box PGD-Linf on the {defense} model ({white:.1f}%): a weaker attacker does "
                             "better, so the white-box number overstates robustness")
        adaptive = rows["adaptive"].get("pgd_linf", {}).get("robust_acc")
        if adaptive is not None and adaptive < white - MASKING_POINTS:
            notes.append(f"WARNING: GRADIENT MASKING: the adaptive attack ({adaptive_attack}) lowers PGD-Linf "
                         f"accuracy on the {defense} model from {white:.1f}% to {adaptive:.1f}%")
    return notes


def verdict(rows: dict, black_box: list[dict], defense: str, adaptive_attack: str) -> str:
    """The plain-words conclusion, computed from the PGD-Linf column and the black-box table."""
    und, std, ada = (rows[k].get("pgd_linf", {}).get("robust_acc") for k in ("undefended", "defended", "adaptive"))
    if None in (und, std, ada):
        return "PGD-Linf was not run (eval.attacks): no verdict."
    if defense == "no defense":
        return (f"No defense layer is enabled (gcm.enabled and random_pad.enabled are false): all rows measure the "
                f"undefended model, {und:.1f}% under PGD-Linf.")
    text = [f"{defense} {'raises' if std > und else 'changes'} PGD-Linf accuracy from {und:.1f}% (undefended) to "
            f"{std:.1f}% in the standard white-box setting"]
    masked = std - ada > MASKING_POINTS
    if masked:
        text.append(f", but the adaptive attack ({adaptive_attack}) brings it to {ada:.1f}%: the real robustness "
                    f"is {ada:.1f}%.")
    else:
        text.append(f"; the adaptive attack ({adaptive_attack}) gets {ada:.1f}%.")
    gain = ada - und
    if abs(gain) <= MASKING_POINTS:
        text.append(f" Against an adaptive attacker the defense buys nothing measurable ({ada:.1f}% vs {und:.1f}% "
                    "undefended).")
    elif gain > 0:
        text.append(f" Against an adaptive attacker it keeps {gain:.1f} points over the undefended model.")
    attacks = [r for r in black_box if r["attack"] == "square" or r["attack"].startswith("transfer")]
    if attacks:
        best = min(attacks, key=lambda r: r["robust_acc"])
        text.append(f" The strongest black-box/transfer attack ({best['label']}) leaves {best['robust_acc']:.1f}%.")
    if masked and "GCM" in defense:
        clean_und, clean_def = rows["undefended"]["top1"], rows["defended"]["top1"]
        text.append(f" GCM is gradient masking: clean accuracy is {clean_def:.1f}% with it and {clean_und:.1f}% "
                    "without, it only scrambles the input gradient, so it stops attackers who differentiate "
                    "through it naively (as the challenge's standard white-box attacks may) and not adaptive, "
                    "transfer or score-based ones.")
    return "".join(text)


# --- the stage -----------------------------------------------------------------------------

def run(cfg: Config, progress: bool = True) -> dict:
    """Evaluate the defended model of ``cfg``, write the report and return the numbers."""
    validate_eval_config(cfg)
    start = time.perf_counter()
    e = cfg.eval
    torch.manual_seed(e.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = resolve_checkpoints(cfg)
    members, infos = load_members(checkpoints, cfg.data.num_classes)
    undefended = build_defended_model(members, infos, cfg, defense=False).to(device)
    defended = build_defended_model(members, infos, cfg).to(device)
    surrogate = None
    if e.surrogate and "transfer" in e.attacks:
        s_members, s_infos = load_members([e.surrogate], cfg.data.num_classes)
        surrogate = build_defended_model(s_members, s_infos, cfg, defense=False).to(device)
    x, y, source = load_eval_images(cfg, input_size_of(infos))
    defense, adaptive_attack = describe_defense(cfg)
    labels = {"undefended": "undefended", "defended": f"{defense} (standard white-box, as in the paper)",
              "adaptive": f"{defense} (adaptive: {adaptive_attack})"}
    if progress:
        print(f"evaluate: {len(x)} images from the {source}, {len(members)} member(s), defense: {defense}, "
              f"device {device.type}", flush=True)

    keep = ["pgd_linf"] if "transfer" in e.attacks else []
    raw = {"undefended": run_row(undefended, x, y, cfg, keep=keep, progress=progress, desc="undefended"),
           "defended": run_row(defended, x, y, cfg, progress=progress, desc="defended")}
    raw["adaptive"] = run_row(defended, x, y, cfg, adaptive=True, clean=raw["defended"]["clean"], progress=progress,
                              desc="adaptive")
    rows = {k: summarize_row(v["clean"], v["attacks"], cfg) for k, v in raw.items()}

    transfers = []
    if "transfer" in e.attacks:
        same = raw["undefended"]["adv"].get("pgd_linf")
        if same is None:
            same = craft("pgd_linf", undefended, x, y, cfg)
        transfers.append(("transfer_same_weights", "transfer PGD-Linf from the same weights without the defense", same))
        if surrogate is not None:
            transfers.append(("transfer_surrogate", f"transfer PGD-Linf from an independent checkpoint ({e.surrogate})",
                              craft("pgd_linf", surrogate, x, y, cfg, progress=progress, desc="surrogate")))
    bb_raw = run_black_box(defended, x, y, cfg, transfers, progress)
    clean = raw["defended"]["clean"]
    black_box = [{**{k: v for k, v in r.items() if k != "correct"}, **robust_metrics(clean, r["correct"])}
                 for r in bb_raw]
    adversarial = {f"defended/{k}": v for k, v in raw["defended"]["attacks"].items()}
    adversarial.update({f"adaptive/{k}": v for k, v in raw["adaptive"]["attacks"].items()})
    adversarial.update({r["attack"]: r["correct"] for r in bb_raw
                        if r["attack"] == "square" or r["attack"].startswith("transfer")})
    if adversarial:
        black_box.append({"attack": "worst_case", "label": f"worst case per image over every attack above and in the "
                          f"{defense} rows", "norm": "all", "eps": None, "steps": 0,
                          **robust_metrics(clean, worst_case(adversarial))})

    curve: dict = {"eps": [float(v) for v in e.eps_curve]}
    if e.eps_curve:
        for key, model, adaptive in (("undefended", undefended, False), ("defended", defended, False),
                                     ("adaptive", defended, True)):
            curve[key] = run_curve(model, x, y, cfg, adaptive=adaptive, known=raw[key]["attacks"].get("pgd_linf"),
                                   progress=progress, desc=f"{key} curve")

    result = {
        "n": len(x), "source": source, "defense": defense, "adaptive_attack": adaptive_attack, "labels": labels,
        "checkpoints": checkpoints, "surrogate": e.surrogate if surrogate is not None else "",
        "settings": {k: getattr(e, k) for k in ("eps_linf", "eps_l2", "eps_l1", "steps", "step_ratio", "restarts",
                                                "cw_steps", "square_queries", "eot_samples", "draws", "seed")},
        "cw_max_norm": budget_of(cfg, "cw_l2"), "randomized": is_randomized(defended),
        "rows": rows, "black_box": black_box, "eps_curve": curve,
        "corruptions": [{"name": c.name, "param": c.param, "levels": list(c.levels)} for c in CORRUPTIONS],
        "corruption_severities": list(e.corruption_severities),
    }
    result["sanity"] = sanity_checks(rows, black_box, curve, labels, len(x), defense, adaptive_attack)
    result["verdict"] = verdict(rows, black_box, defense, adaptive_attack)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out_dir = Path(e.out_dir) if e.out_dir else cfg.run_dir / "eval"
    result["files"] = write_report(result, out_dir, cfg, echo=progress)
    result["out_dir"] = str(out_dir)
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    quiet_libraries()
    args = create_parser("run.sh evaluate", "Local robustness leaderboard: clean, corruptions, black-box, "
                                            "white-box and adaptive attacks on the defended model.").parse_args(argv)
    return run(parse_config(args))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
