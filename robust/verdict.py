"""The judgement under the tables: sanity checks and a plain-words verdict, computed from the numbers."""

from __future__ import annotations

from core.config import Config
from robust.results import EvalResult

MASKING_POINTS = 5.0  # accuracy drop that counts as "the adaptive attack found masked gradients"


def describe_defense(cfg: Config) -> tuple[str, str]:
    """Names of the defense and of the adaptive attack on it, from the config."""
    parts = (["GCM"] if cfg.gcm.enabled else []) + (["random pad"] if cfg.random_pad.enabled else [])
    adaptive = (["BPDA through GCM"] if cfg.gcm.enabled else []) + (
        ["EOT over random pad"] if cfg.random_pad.enabled else []
    )
    return " + ".join(parts) or "no defense", ", ".join(adaptive) or "no defense layer to adapt to"


def _beats_white_box(attack: str) -> bool:
    """Attacks that must not beat white-box PGD on a model with honest gradients."""
    return attack == "square" or attack.startswith("transfer")


def sanity_checks(result: EvalResult) -> list[str]:
    """The checks printed under the table: each line starts with ``ok:`` or ``WARNING:``."""
    notes = ["ok: every adversarial image lies inside its eps-ball and [0, 1] (checked for every attack)"]
    for row in result.rows.values():
        notes += row_checks(row)
    notes += curve_checks(result)
    notes += black_box_checks(result)
    return notes


def row_checks(row) -> list[str]:
    """Within one row: the iterative attack at least as strong as the single step, AutoAttack not far below PGD."""
    notes = []
    if "fgsm" in row.attacks and "pgd_linf" in row.attacks:
        fgsm, pgd = row.attacks["fgsm"].robust_acc, row.attacks["pgd_linf"].robust_acc
        if pgd > fgsm + 1e-9:
            notes.append(
                f"WARNING: {row.label}: PGD-Linf ({pgd:.1f}%) is weaker than single-step FGSM "
                f"({fgsm:.1f}%): an iterative attack must succeed at least as often; a sign of gradient "
                "masking or of too few / too small steps"
            )
        else:
            notes.append(f"ok: {row.label}: PGD-Linf ({pgd:.1f}%) at least as strong as FGSM ({fgsm:.1f}%)")
    if "autoattack" in row.attacks and "pgd_linf" in row.attacks:
        aa, pgd = row.attacks["autoattack"].robust_acc, row.attacks["pgd_linf"].robust_acc
        if aa < pgd - MASKING_POINTS:
            # Fixed-step PGD (the paper's 3/40 eps steps) can stop well short of APGD's adaptive steps.
            notes.append(
                f"WARNING: {row.label}: AutoAttack leaves {aa:.1f}% where PGD-Linf leaves {pgd:.1f}%: the "
                "PGD column overstates robustness here; quote AutoAttack (or raise eval.steps / eval.restarts)"
            )
    return notes


def curve_checks(result: EvalResult) -> list[str]:
    """The undefended model's accuracy must fall towards 0 as eps grows (else the attack is too weak)."""
    curve = result.eps_curve
    und = curve.get("undefended", [])
    if not und:
        return []
    one = 100.0 / max(result.n, 1) + 1e-9  # one image, in percent: the resolution of the numbers
    eps = ", ".join(f"{v * 255:.3g}" for v in curve["eps"])
    if all(b <= a + one for a, b in zip(und, und[1:])) and und[-1] <= 10.0:
        return [f"ok: undefended accuracy falls as eps grows ({eps} /255) to {und[-1]:.1f}%"]
    return [
        f"WARNING: undefended accuracy along eps ({eps} /255) is "
        f"{', '.join(f'{v:.1f}' for v in und)}%: it should fall toward 0; the attack may be too weak "
        "(more eval.steps, a larger eval.step_ratio or more eval.restarts)"
    ]


def black_box_checks(result: EvalResult) -> list[str]:
    """Noise against clean accuracy, and gradient masking: a weaker attacker beating the white box."""
    notes = []
    by_key = {s.attack: s for s in result.black_box}
    top1 = result.rows["defended"].top1
    if "noise" in by_key:
        noise = by_key["noise"].robust_acc
        tag = "ok" if noise >= top1 - 10.0 else "WARNING"
        notes.append(
            f"{tag}: random noise at the full Linf budget leaves {noise:.1f}% (clean {top1:.1f}%)"
            + ("" if tag == "ok" else ": the model is fragile to plain noise of this size")
        )
    white = result.robust_acc("defended", "pgd_linf")
    if white is None:
        return notes
    for s in result.black_box:
        if _beats_white_box(s.attack) and s.robust_acc < white - 1e-9:
            notes.append(
                f"WARNING: GRADIENT MASKING: {s.label} ({s.robust_acc:.1f}%) beats standard "
                f"white-box PGD-Linf on the {result.defense} model ({white:.1f}%): a weaker attacker "
                "does better, so the white-box number overstates robustness"
            )
    adaptive = result.robust_acc("adaptive", "pgd_linf")
    if adaptive is not None and adaptive < white - MASKING_POINTS:
        notes.append(
            f"WARNING: GRADIENT MASKING: the adaptive attack ({result.adaptive_attack}) lowers PGD-Linf "
            f"accuracy on the {result.defense} model from {white:.1f}% to {adaptive:.1f}%"
        )
    return notes


def verdict(result: EvalResult) -> str:
    """The plain-words conclusion, computed from the PGD-Linf column and the black-box table."""
    und, std, ada = (result.robust_acc(k, "pgd_linf") for k in ("undefended", "defended", "adaptive"))
    defense, adaptive_attack = result.defense, result.adaptive_attack
    if None in (und, std, ada):
        return "PGD-Linf was not run (eval.attacks): no verdict."
    if defense == "no defense":
        return (
            f"No defense layer is enabled (gcm.enabled and random_pad.enabled are false): all rows measure the "
            f"undefended model, {und:.1f}% under PGD-Linf."
        )
    text = [
        f"{defense} {'raises' if std > und else 'changes'} PGD-Linf accuracy from {und:.1f}% (undefended) to "
        f"{std:.1f}% in the standard white-box setting"
    ]
    masked = std - ada > MASKING_POINTS
    if masked:
        text.append(
            f", but the adaptive attack ({adaptive_attack}) brings it to {ada:.1f}%: the real robustness is {ada:.1f}%."
        )
    else:
        text.append(f"; the adaptive attack ({adaptive_attack}) gets {ada:.1f}%.")
    gain = ada - und
    if abs(gain) <= MASKING_POINTS:
        text.append(
            f" Against an adaptive attacker the defense buys nothing measurable ({ada:.1f}% vs {und:.1f}% undefended)."
        )
    elif gain > 0:
        text.append(f" Against an adaptive attacker it keeps {gain:.1f} points over the undefended model.")
    attacks = [s for s in result.black_box if _beats_white_box(s.attack)]
    if attacks:
        best = min(attacks, key=lambda s: s.robust_acc)
        text.append(f" The strongest black-box/transfer attack ({best.label}) leaves {best.robust_acc:.1f}%.")
    if masked and "GCM" in defense:
        clean_und, clean_def = result.rows["undefended"].top1, result.rows["defended"].top1
        text.append(
            f" GCM is gradient masking: clean accuracy is {clean_def:.1f}% with it and {clean_und:.1f}% "
            "without, it only scrambles the input gradient, so it stops attackers who differentiate "
            "through it naively (as the challenge's standard white-box attacks may) and not adaptive, "
            "transfer or score-based ones."
        )
    return "".join(text)
