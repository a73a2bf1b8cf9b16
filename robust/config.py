"""The settings of the robustness stages, and their checks: ``eval`` (``./run.sh evaluate``),
``testset`` (``make-testset``) and ``ablation`` (``ablate``), and the attack-draw distribution
make-testset and the Phase-II-like score share. Registered with the config
(:func:`core.config.register_section`), so every stage's config file and command line take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from core.config import (
    Config,
    ConfigError,
    at_least_one,
    list_of,
    one_of,
    one_of_each,
    register_section,
    within,
)
from core.corruptions import ALL_CORRUPTIONS, COMMON
from core.errors import echo

# What ``eval.attacks`` may name; ``robust.specs.SPECS`` says what each one runs.
EVAL_ATTACKS = ("fgsm", "pgd_l1", "pgd_l2", "pgd_linf", "cw_l2", "autoattack", "square", "transfer", "noise")
AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")


@dataclass
class EvalConfig:
    subset: int = within("[0, 1e12]", 500)  # labelled images evaluated (seeded choice); 0 -> all
    batch_size: int = within("[1, 1048576]", 50)
    seed: int = within("[0, 4294967295]", 0)
    # the paper's white-box columns and AutoAttack, then Square (score-based), transfer and the noise baseline
    attacks: list = one_of_each(EVAL_ATTACKS, lambda: list(EVAL_ATTACKS))
    # eps in [0,1] pixel units; the paper's values at 224 px (small images: see configs/default.yaml)
    eps_linf: float = within("(0, 1]", 8 / 255)
    eps_l2: float = within("(0, 1e6]", 8.0)
    eps_l1: float = within("(0, 1e9]", 1600.0)
    steps: int = within("[1, 100000]", 20)
    step_ratio: float = within("(0, 100]", 0.075)  # step = 3/40 * eps, as in the paper
    restarts: int = within("[1, 10000]", 1)
    cw_steps: int = within("[1, 100000]", 100)
    cw_max_norm: float = within("[0, 1e6]", 0.0)  # C&W result projected onto this L2 ball; 0 -> eps_l2
    square_queries: int = within("[1, 1e9]", 1000)
    # AutoAttack (Croce & Hein 2020, its authors' pyautoattack): "standard" is their exact setting
    # (APGD-CE, APGD-T, FAB-T, Square 5000 queries); "custom" runs aa_attacks with the budgets below,
    # a cheaper subset for CPU runs. Against a randomized model the "rand" version (APGD with EOT) runs.
    aa_version: str = one_of(("standard", "custom"), "standard")
    aa_attacks: list = one_of_each(AA_ATTACKS, lambda: ["apgd-ce", "apgd-t"])
    aa_iters: int = within("[1, 100000]", 100)
    aa_target_classes: int = within("[1, 100000]", 9)
    aa_queries: int = within("[1, 1e9]", 5000)
    eps_curve: list = within("(0, 1]", [1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255])
    eot_samples: int = within("[1, 100000]", 10)  # gradient samples per step against the random resize-pad layer
    draws: int = within("[1, 100000]", 10)  # forward draws for expected accuracy of a randomized model
    surrogate: str = ""  # an independently trained checkpoint for transfer attacks
    file: str = ""  # an exported Phase II file (.onnx or .zip) to attack instead of the checkpoints
    # ImageNet-C (core/corruptions.py): the 15 common corruptions and the 4 held-out ones, severities 1..5
    corruptions: list = one_of_each(ALL_CORRUPTIONS, lambda: list(ALL_CORRUPTIONS))
    corruption_severities: list = within("[1, 5]", [1, 2, 3, 4, 5])
    corruption_baseline: str = ""  # a checkpoint whose errors on the same images give mCE and relative mCE
    out_dir: str = ""  # "" -> runs/<name>/eval


# What `make-testset` and the Phase-II-like score may draw (attacks/transfer.py: ATTACK_KINDS).
ATTACK_DRAW_KINDS = ("fgsm", "pgd", "mifgsm", "difgsm")


@dataclass
class AttackDrawConfig:
    """A distribution over attack settings: each draw picks every item uniformly from its list."""

    kinds: list = one_of_each(ATTACK_DRAW_KINDS, lambda: list(ATTACK_DRAW_KINDS))
    norms: list = one_of_each(("linf", "l2"), lambda: ["linf", "l2"])
    # eps in [0, 1] pixel units; L2 values are for 224 px (scale them by side / 224 for small images)
    eps_linf: list = within("(0, 1]", [2 / 255, 4 / 255, 8 / 255, 16 / 255])
    eps_l2: list = within("(0, 1e6]", [1.0, 2.0, 4.0, 8.0])
    steps: list = within("[1, 100000]", [5, 10, 20])


@dataclass
class TestsetConfig:
    """``./run.sh make-testset``: a Phase-I-like test set from held-out labelled images."""

    out_dir: str = "data/testset"  # written whole (temp folder + rename): test/N.png, test_labels.txt, manifest.json
    overwrite: bool = False  # replace an existing make-testset folder
    subset: int = within("[0, 1e12]", 0)  # source images (seeded choice); 0 -> all labelled ones
    seed: int = within("[0, 4294967295]", 0)
    # the mix: fraction of each kind (they must sum to 1); stacked = attack and corruption, in either order
    clean: float = within("[0, 1]", 0.25)
    corruption: float = within("[0, 1]", 0.25)
    transfer: float = within("[0, 1]", 0.25)
    stacked: float = within("[0, 1]", 0.25)
    surrogates: list = list_of(str)  # checkpoints the transfer attacks are crafted on
    corruptions: list = one_of_each(ALL_CORRUPTIONS, lambda: list(COMMON))
    severities: list = within("[1, 5]", [1, 2, 3, 4, 5])
    attack: AttackDrawConfig = field(default_factory=AttackDrawConfig)


# The stack parts `ablate` can combine ("+"-joined in ablation.variants; robust/ablation.py).
ABLATION_PARTS = (
    "single", "hflip", "multiscale", "ensemble", "gcm", "random_pad", "temperature",
    "adversarial", "corruption", "mixed", "sharpen", "tuned",
)  # fmt: skip


@dataclass
class AblationConfig:
    """``./run.sh ablate``: what each part of the submission stack buys, variant by variant."""

    testset: str = "data/testset"  # a make-testset folder: the Phase-I-like score
    # checkpoints per recipe (2-3 each): standard, adversarially trained, corruption-trained
    standard: list = list_of(str)
    adversarial: list = list_of(str)
    corruption: list = list_of(str)
    # "+"-joined parts of ABLATION_PARTS on top of one standard checkpoint without GCM, TTA or pad
    variants: list = list_of(
        str,
        lambda: [
            "single", "hflip", "multiscale", "ensemble", "gcm", "random_pad", "temperature", "adversarial",
            "corruption", "ensemble+hflip+multiscale", "mixed+hflip+multiscale",
        ],
    )  # fmt: skip
    scales: list = within("(0, 8]", [0.9, 1.0, 1.1])  # the multiscale part's TTA scales
    temperature: float = within("(0, 1e6]", 2.0)  # the temperature part (on a single model it changes no prediction)
    attack_subset: int = within("[0, 1e12]", 100)  # clean images attacked per variant (AutoAttack + BPDA/EOT); 0 -> all
    bootstrap: int = within("[100, 1e9]", 2000)  # resamples over images of each difference's 95% interval
    out_dir: str = ""  # "" -> runs/<name>/ablation
    # issue 38, output sharpening (infer/temperature.py): the sharpen part's temperature (< 1), and the
    # grid the tuned part picks a temperature from on the validation split (accuracy, then cross-entropy)
    sharpen: float = within("(0, 1e6]", 1e-3)
    temperatures: list = within("(0, 1e6]", [1e-3, 0.01, 0.1, 0.5, 1.0, 2.0, 4.0])


def check_eval(cfg: Config) -> None:
    e = cfg.eval
    at_least_one(e, "eval", ("batch_size", "steps", "cw_steps", "square_queries", "eot_samples", "draws", "restarts"))
    if e.subset < 0:
        raise ConfigError("config key 'eval.subset' must be >= 0 (0 = all images)")
    for key in ("eps_linf", "eps_l2", "eps_l1", "step_ratio"):
        if getattr(e, key) <= 0:
            raise ConfigError(f"config key 'eval.{key}' must be positive")
    if e.cw_max_norm < 0 or any(v <= 0 for v in e.eps_curve):
        raise ConfigError("config keys 'eval.cw_max_norm' (>= 0) / 'eval.eps_curve' (> 0) out of range")
    if e.eps_linf > 1 or any(v > 1 for v in e.eps_curve):
        raise ConfigError(
            "config keys 'eval.eps_linf' / 'eval.eps_curve' are Linf budgets in [0, 1] pixel units (8/255 = 0.0314); "
            "more than 1 is no budget at all"
        )
    if any(s not in range(1, 6) for s in e.corruption_severities):
        raise ConfigError(
            f"config key 'eval.corruption_severities': {echo(e.corruption_severities)} must be within 1..5"
        )
    at_least_one(e, "eval", ("aa_iters", "aa_target_classes", "aa_queries"))
    if e.aa_version == "custom" and not e.aa_attacks:
        raise ConfigError("config key 'eval.aa_attacks' needs at least one attack with eval.aa_version=custom")


def check_attack_draws(a: AttackDrawConfig, prefix: str, image_size: int) -> None:
    """Budgets in [0, 1] pixel units: Linf at most 1 (the whole range), L2 at most the norm of a
    white ``data.image_size`` image; anything above is no budget at all."""
    for key in ("kinds", "norms", "steps"):
        if not getattr(a, key):
            raise ConfigError(f"config key '{prefix}.{key}' needs at least one value")
    limits = {"linf": 1.0, "l2": math.sqrt(3) * image_size}
    for norm in a.norms:
        values = getattr(a, f"eps_{norm}")
        if not values or any(v <= 0 for v in values):
            raise ConfigError(f"config key '{prefix}.eps_{norm}' needs one or more positive values")
        if any(v > limits[norm] for v in values):
            unit = " (pixel units: 8/255 = 0.0314)" if norm == "linf" else ""
            raise ConfigError(
                f"config key '{prefix}.eps_{norm}': {echo(values)} exceeds {limits[norm]:.4g}, the largest "
                f"{norm} distance between two {image_size}px images in [0, 1]{unit}"
            )
    if any(s < 1 for s in a.steps):
        raise ConfigError(f"config key '{prefix}.steps': every value must be at least 1")


def check_testset(cfg: Config) -> None:
    t, image_size = cfg.testset, cfg.data.image_size
    fractions = {k: getattr(t, k) for k in ("clean", "corruption", "transfer", "stacked")}
    if any(v < 0 for v in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"config keys 'testset.clean/corruption/transfer/stacked' must be >= 0 and sum to 1, "
            f"got {echo(list(fractions.values()))}"
        )
    if t.subset < 0:
        raise ConfigError("config key 'testset.subset' must be >= 0 (0 = all images)")
    if fractions["corruption"] + fractions["stacked"] > 0 and (not t.corruptions or not t.severities):
        raise ConfigError("config keys 'testset.corruptions'/'testset.severities' need values for corrupted images")
    if any(s not in range(1, 6) for s in t.severities):
        raise ConfigError(f"config key 'testset.severities': {echo(t.severities)} must be within 1..5")
    check_attack_draws(t.attack, "testset.attack", image_size)


def check_ablation(cfg: Config) -> None:
    a = cfg.ablation
    for i, variant in enumerate(a.variants):
        for part in str(variant).split("+"):
            if part not in ABLATION_PARTS:
                raise ConfigError(
                    f"config key 'ablation.variants[{i}]': {echo(part)} is not a part ({', '.join(ABLATION_PARTS)})"
                )
    if not a.scales or any(s <= 0 for s in a.scales) or a.temperature <= 0:
        raise ConfigError("config keys 'ablation.scales' (positive factors) / 'ablation.temperature' (> 0) bad")
    if a.attack_subset < 0 or a.bootstrap < 100:
        raise ConfigError("config keys 'ablation.attack_subset' (>= 0) / 'ablation.bootstrap' (>= 100) out of range")


register_section("eval", EvalConfig, check_eval)
register_section("testset", TestsetConfig, check_testset)
register_section("ablation", AblationConfig, check_ablation)
