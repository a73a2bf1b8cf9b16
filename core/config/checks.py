"""The checks of a loaded config that one field's type cannot express, every section in one place
(:func:`validate_config`): ranges, finite numbers, seeds, names, combinations that make no sense."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from core.config.schema import (
    ABLATION_PARTS,
    PRIME_PRIMITIVES,
    AblationConfig,
    AttackDrawConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    FourierConfig,
    ModelConfig,
    Phase2Config,
    PrimeConfig,
    TestsetConfig,
    TrainConfig,
    range_of,
)
from core.errors import echo
from core.io import submission_name_problem


def validate_config(cfg: Config, check_aug: bool = True) -> None:
    """Every check a single key's type cannot express, for every section, in one place.

    ``load_config`` calls it, so a stage (and ``launch``, before any process starts)
    stops on a bad value with one line naming the key.
    """
    if not cfg.name or any(c in cfg.name for c in "/\\") or cfg.name in {".", ".."}:
        raise ConfigError(f"config key 'name': {echo(cfg.name)} must be a plain name (no path separators)")
    _check_name_lengths(cfg)
    _check_finite(cfg)
    _check_seeds(cfg)
    _check_data(cfg.data)
    _check_train(cfg.train)
    _check_distill(cfg)
    if check_aug:
        check_aug_section(cfg)
    _check_augmix(cfg)
    _check_batch_augment(cfg)
    _check_model(cfg.model)
    _check_predict(cfg)
    _check_eval(cfg.eval)
    _check_testset(cfg.testset, cfg.data.image_size)
    _check_phase2(cfg.phase2, cfg.data.image_size)
    _check_ablation(cfg.ablation)
    _check_ranges(cfg)
    _check_rules(cfg)


# Where each rule of the CVPR 2022 challenge is written (README, "The challenge's rules").
ONE_MODEL_SOURCE = "the Track I 1st-place team's write-up: no model fusion"
NO_PRETRAINED_SOURCE = (
    "the 2nd- and 5th-place teams' READMEs: github.com/ForeverPs/Robust-Classification, "
    "github.com/WindVChen/Solution-For-AISafety-CVPR2022"
)


def _check_rules(cfg: Config) -> None:
    """The challenge's rules a phase config turns on (``rules.*``), unless ``rules.strict=false``."""
    r = cfg.rules
    if not r.strict:
        return
    override = "rules.strict=false overrides it after checking the current rules"
    if r.one_model and len(cfg.submit.checkpoints) > 1:
        raise ConfigError(
            f"rules.one_model: submit.checkpoints lists {len(cfg.submit.checkpoints)} models; the CVPR 2022 "
            f"challenge allowed one ({ONE_MODEL_SOURCE}); {override}"
        )
    if r.no_pretrained and (cfg.model.pretrained or cfg.model.pretrained_file):
        key = "model.pretrained=true" if cfg.model.pretrained else "model.pretrained_file"
        raise ConfigError(
            f"rules.no_pretrained: {key} loads pretrained weights; the CVPR 2022 challenge forbade them "
            f"({NO_PRETRAINED_SOURCE}); {override}"
        )


# `name` and `submit.file_name` become file and folder names with up to 24 more characters (temporary,
# backup and lock files) under the 255-byte limit of common file systems, and W&B artifact names
# (`submission-<name>`: at most 128 characters).
MAX_NAME_BYTES = 100


def _check_name_lengths(cfg: Config) -> None:
    for key, value in (("name", cfg.name), ("submit.file_name", cfg.submit.file_name)):
        size = len(value.encode("utf-8", "surrogateescape"))
        if size > MAX_NAME_BYTES:
            raise ConfigError(
                f"config key '{key}': {echo(value)} is {size} bytes long, more than {MAX_NAME_BYTES} (it becomes "
                "file names, and file systems allow 255 bytes once our suffixes are added)"
            )


# Infinity means "no limit" for these; no other number of the config may be infinite, none NaN.
_MAY_BE_INFINITE = {"budget.max_params", "budget.max_gmacs"}


def _check_finite(node: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and (math.isnan(item) or (math.isinf(item) and key not in _MAY_BE_INFINITE)):
                raise ConfigError(f"config key '{key}': {echo(value)} is not a finite number")


def _check_ranges(node: Any, prefix: str = "") -> None:
    """Every number (and every number of a list) within the range its field states (``within`` in
    the schema): after the checks above, which say more where they apply."""
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{key}.")
            continue
        bounds = range_of(node, f.name)
        if bounds is None:
            continue
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for where, item in items:
            if item not in bounds:
                raise ConfigError(f"config key '{where}': {echo(item)} must be in {bounds.text}")


# numpy's legacy seeding (accelerate's set_seed, the corruptions) takes [0, 2**32); default_rng refuses < 0.
MAX_SEED = 2**32 - 1


def _check_seeds(node: Any, prefix: str = "") -> None:
    """Every ``seed``/``*_seed`` key: an integer in [0, 2**32) (a negative one was a numpy traceback,
    after the attacks in ``evaluate``'s case)."""
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_seeds(value, f"{key}.")
        elif f.name == "seed" or f.name.endswith("_seed"):
            if not 0 <= value <= MAX_SEED:
                raise ConfigError(f"config key '{key}': {echo(value)} must be in [0, {MAX_SEED}]")


def _at_least_one(section: Any, prefix: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(section, key) < 1:
            raise ConfigError(f"config key '{prefix}.{key}' must be at least 1")


def _check_data(d: DataConfig) -> None:
    if d.num_workers < -1:
        raise ConfigError(f"config key 'data.num_workers': {d.num_workers} must be >= 0, or -1 for auto")
    if d.num_classes < 2:
        raise ConfigError("config key 'data.num_classes' must be at least 2")
    if d.image_size < 16:
        raise ConfigError("config key 'data.image_size' must be at least 16")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError("config key 'data.val_fraction' must be in [0, 1)")


def _check_train(t: TrainConfig) -> None:
    _at_least_one(t, "train", ("epochs", "batch_size", "grad_accum_steps", "keep_checkpoints"))
    if t.lr <= 0 or t.warmup_lr < 0 or t.min_lr < 0:
        raise ConfigError(f"config key 'train.lr' must be positive (got {t.lr}); train.warmup_lr/min_lr >= 0")
    if (t.mixup > 0 or t.cutmix > 0) and t.batch_size % 2:
        raise ConfigError("train.batch_size must be even with mixup/cutmix")
    if t.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.mixed_precision=fp16 needs a GPU (none is visible); use bf16 or no on the CPU")
    if t.base_batch_size < 0 or not 0 < t.ema_decay < 1:
        raise ConfigError("config keys 'train.base_batch_size' (>= 0, 0 = no scaling) / 'train.ema_decay' (0..1) bad")
    _check_adv(t)
    _check_select(t)


# train.adv modes whose attack the distillation loss replaces by RSLAD's (train/distill.py)
DISTILL_MODES = ("none", "pgd", "fgsm_rs")


def _check_distill(cfg: Config) -> None:
    t, aug = cfg.train, cfg.aug
    if not t.distill.teachers:
        return
    if t.adv.mode not in DISTILL_MODES:
        raise ConfigError(
            f"config key 'train.distill.teachers': train.adv.mode={t.adv.mode} has an attack of its own; "
            f"distillation crafts RSLAD's (use one of {', '.join(DISTILL_MODES)})"
        )
    if aug.augmix.enabled and aug.augmix.jsd_weight > 0:
        raise ConfigError(
            "config key 'train.distill.teachers': not with AugMix's consistency loss (aug.augmix.jsd_weight=0)"
        )
    if aug.views != 1:
        raise ConfigError("config key 'train.distill.teachers': not with aug.views=2 (the two-view loss)")


def _check_select(t: TrainConfig) -> None:
    w = t.score.weights
    if len(w) != 3 or sum(w) <= 0:
        raise ConfigError(
            f"config key 'train.score.weights': {w} must be 3 shares (clean, corruption, attack) with a positive sum"
        )


def _check_adv(t: TrainConfig) -> None:
    a = t.adv
    if a.mode == "none":
        if t.select == "robust":
            raise ConfigError("config key 'train.select': robust needs adversarial training (train.adv.mode)")
        return
    if not 0 < a.eps <= 1:
        raise ConfigError(f"config key 'train.adv.eps': {a.eps} must be in (0, 1] (pixel units; 8/255 = 0.0314)")
    if a.step_size < 0 or a.warmup_epochs < 0 or a.beta < 0:
        raise ConfigError("config keys 'train.adv.step_size'/'warmup_epochs'/'beta' must be >= 0")
    if a.mode in ("pgd", "trades") and a.steps < 1:
        raise ConfigError(f"config key 'train.adv.steps' must be at least 1 with train.adv.mode={a.mode}")
    if not 0 <= a.weight <= 1:
        raise ConfigError(f"config key 'train.adv.weight': {a.weight} must be in [0, 1]")
    if a.val_images < 0 or a.val_steps < 1:
        raise ConfigError("config keys 'train.adv.val_images' (>= 0) / 'train.adv.val_steps' (>= 1) out of range")
    if a.mode != "fgsm_reg" and (t.mixup > 0 or t.cutmix > 0):
        # The attack would perturb blended images towards blended labels: not the threat the
        # evaluation measures, and the clean/adversarial pairing of TRADES breaks. (fgsm_reg,
        # a regularizer, keeps working with mixup as the 2nd-place recipe used it.)
        raise ConfigError(f"train.adv.mode={a.mode} does not combine with train.mixup/train.cutmix; turn one off")


def check_aug_section(cfg: Config) -> None:
    # Building the pipeline is the check: albumentations 2.x only warns about a 1.x-style
    # argument, and create_train_transform turns that (and every other problem) into a
    # UserError naming the entry, before any process starts.
    from core.transforms import create_train_transform

    create_train_transform(cfg.aug, cfg.data.image_size)


# Below this, numpy's Dirichlet/Beta draws behind timm's AugMix underflow to 0/0: NaN mixing weights,
# cast to black images (measured, 200000 draws of width 3: 98% at 1e-5, 12% at 1e-3, none at 0.01).
MIN_AUGMIX_ALPHA = 0.05


def _check_augmix(cfg: Config) -> None:
    """AugMix's values (for every stage: one that ignores ``aug`` still refuses a bad value) and the
    combinations of its consistency loss that make no sense (the op names are checked with the pipeline)."""
    a, t = cfg.aug.augmix, cfg.train
    if not 1 <= a.severity <= 10 or a.width < 1 or a.depth == 0 or a.depth < -1 or a.jsd_weight < 0:
        raise ConfigError(
            "config keys 'aug.augmix.severity' (1..10), 'width' (>= 1), 'depth' (-1 or >= 1), 'jsd_weight' (>= 0): "
            f"out of range in {a.severity}, {a.width}, {a.depth}, {a.jsd_weight}"
        )
    if a.alpha < MIN_AUGMIX_ALPHA:
        raise ConfigError(
            f"config key 'aug.augmix.alpha': {a.alpha} is below {MIN_AUGMIX_ALPHA} (smaller alphas make timm's "
            "Dirichlet mixing weights NaN, and the images black); the paper uses 1"
        )
    if a.device == "true" and not a.enabled:
        # asks for AugMix on the device, where nothing would run it: a silent no-op otherwise
        raise ConfigError("config key 'aug.augmix.device=true' needs aug.augmix.enabled=true")
    if a.jsd_weight <= 0:
        return
    if not a.enabled:
        raise ConfigError("config key 'aug.augmix.jsd_weight' needs aug.augmix.enabled=true")
    if t.mixup > 0 or t.cutmix > 0:
        # Mixing images across the batch breaks the clean/AugMix triplets the consistency compares.
        raise ConfigError("aug.augmix.jsd_weight > 0 does not combine with train.mixup/train.cutmix; turn one off")
    if t.adv.mode in ("fgsm_reg", "trades"):
        # Both already train on two views of each image with their own weighting; a third loss over
        # clean, adversarial and AugMix views has no reference recipe.
        raise ConfigError(
            f"aug.augmix.jsd_weight > 0 does not combine with train.adv.mode={t.adv.mode}; use pgd or fgsm_rs, "
            "or aug.augmix.jsd_weight=0"
        )


def _check_batch_augment(cfg: Config) -> None:
    """``aug.prime``, ``aug.fourier``, ``aug.views`` and ``train.adv.consistency``: values and combinations."""
    aug, adv, t = cfg.aug, cfg.train.adv, cfg.train
    _check_prime(aug.prime)
    _check_fourier(aug.fourier)
    on_device = aug.prime.enabled or aug.fourier.enabled
    if aug.views not in (1, 2):
        raise ConfigError(f"config key 'aug.views': {aug.views} must be 1 or 2")
    if adv.consistency < 0:
        raise ConfigError(f"config key 'train.adv.consistency' must be >= 0, got {adv.consistency}")
    if adv.consistency > 0 and aug.views != 2:
        raise ConfigError("config key 'train.adv.consistency' needs aug.views=2 (two views to compare)")
    if aug.views == 2 and not on_device:
        raise ConfigError(
            "config key 'aug.views=2' needs aug.prime.enabled or aug.fourier.enabled (else the second view "
            "repeats the first)"
        )
    if on_device and aug.augmix.enabled and aug.augmix.jsd_weight > 0:
        # The loader's three AugMix views already carry a consistency loss of their own.
        raise ConfigError(
            "aug.prime/aug.fourier do not combine with aug.augmix.jsd_weight > 0; use aug.augmix.jsd_weight=0, "
            "or aug.views=2 with train.adv.consistency"
        )
    if aug.views == 2 and (t.mixup > 0 or t.cutmix > 0):
        raise ConfigError("aug.views=2 does not combine with train.mixup/train.cutmix (the two views share one label)")
    if aug.views == 2 and adv.mode in ("fgsm_reg", "trades"):
        # Both already train on a clean and an adversarial view with their own weighting.
        raise ConfigError(
            f"aug.views=2 does not combine with train.adv.mode={adv.mode}; use pgd, fgsm_rs or none, or aug.views=1"
        )


def _check_prime(p: PrimeConfig) -> None:
    if not p.enabled:
        return
    if not p.primitives:  # the names themselves are checked as they are set (_CHOICES)
        raise ConfigError(f"config key 'aug.prime.primitives' needs at least one of {', '.join(PRIME_PRIMITIVES)}")
    if not 0 <= p.p <= 1 or p.width < 1 or p.depth == 0 or p.depth < -1:
        raise ConfigError(
            f"config keys 'aug.prime.p' (0..1), 'width' (>= 1), 'depth' (-1 or >= 1): out of range in {p.p}, "
            f"{p.width}, {p.depth}"
        )
    strengths = ("color_strength", "filter_strength", "deform_strength", "haze_strength")
    if any(getattr(p, k) < 0 for k in strengths):
        raise ConfigError(f"config keys 'aug.prime.{{{','.join(strengths)}}}' must be >= 0")
    if p.filter_size < 1 or p.filter_size % 2 == 0:
        raise ConfigError(f"config key 'aug.prime.filter_size': {p.filter_size} must be odd and >= 1")
    if p.color_modes < 1 or p.deform_modes < 2 or p.haze_modes < 1:
        raise ConfigError("config keys 'aug.prime.color_modes'/'haze_modes' (>= 1), 'deform_modes' (>= 2) out of range")
    if not 0 < p.haze_contrast <= 1:
        raise ConfigError(f"config key 'aug.prime.haze_contrast': {p.haze_contrast} must be in (0, 1]")


def _check_fourier(f: FourierConfig) -> None:
    if not f.enabled:
        return
    if not 0 <= f.p <= 1:
        raise ConfigError(f"config key 'aug.fourier.p': {f.p} must be in [0, 1]")
    if not 0 < f.max_freq <= 0.5:
        raise ConfigError(
            f"config key 'aug.fourier.max_freq': {f.max_freq} must be in (0, 0.5] cycles per pixel (higher ones alias)"
        )
    if f.strength_min < 0 or f.strength_mean < 0 or f.strength_min + f.strength_mean == 0:
        raise ConfigError("config keys 'aug.fourier.strength_min'/'strength_mean' must be >= 0, not both 0")


def _check_model(m: ModelConfig) -> None:
    if m.mean and len(m.mean) != 3 or m.std and len(m.std) != 3:
        raise ConfigError("config keys 'model.mean'/'model.std' need 3 values (or [] for the timm default)")


def _check_predict(cfg: Config) -> None:
    """The sections ``submit``, ``evaluate`` and ``export`` share: submit, tta, random_pad."""
    _at_least_one(cfg.submit, "submit", ("batch_size",))
    if min(cfg.submit.num_workers, cfg.submit.cpu_num_workers) < -1:
        raise ConfigError("config keys 'submit.num_workers'/'submit.cpu_num_workers' must be >= 0, or -1 for auto")
    if not cfg.tta.scales or any(s <= 0 for s in cfg.tta.scales):
        raise ConfigError("config key 'tta.scales' needs one or more positive factors")
    if cfg.submit.temperature <= 0:
        raise ConfigError(f"config key 'submit.temperature' must be positive, got {cfg.submit.temperature}")
    if not 0 <= cfg.submit.fallback_class < cfg.data.num_classes:
        raise ConfigError(
            f"config key 'submit.fallback_class': {cfg.submit.fallback_class} is not a class of "
            f"[0, {cfg.data.num_classes}) (data.num_classes)"
        )
    problem = submission_name_problem(cfg.submission_name)
    if problem:
        key = "submit.file_name" if cfg.submit.file_name else "name"
        raise ConfigError(f"config key '{key}': {echo(cfg.submission_name)} {problem}")
    if cfg.submit.weights and len(cfg.submit.weights) != max(1, len(cfg.submit.checkpoints)):
        raise ConfigError("config key 'submit.weights' needs one weight per entry of 'submit.checkpoints'")
    if cfg.submit.weights and (min(cfg.submit.weights) < 0 or sum(cfg.submit.weights) <= 0):
        raise ConfigError(
            f"config key 'submit.weights': {echo(cfg.submit.weights)} must be weights >= 0 with a positive sum"
        )
    if not 0 < cfg.random_pad.min_ratio <= cfg.random_pad.max_ratio <= 1:
        raise ConfigError("config keys 'random_pad.min_ratio'/'max_ratio' need 0 < min <= max <= 1")
    if not cfg.export.formats:
        raise ConfigError("config key 'export.formats' needs at least one of onnx, zip, pt2")


def _check_eval(e: EvalConfig) -> None:
    _at_least_one(e, "eval", ("batch_size", "steps", "cw_steps", "square_queries", "eot_samples", "draws", "restarts"))
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
    _at_least_one(e, "eval", ("aa_iters", "aa_target_classes", "aa_queries"))
    if e.aa_version == "custom" and not e.aa_attacks:
        raise ConfigError("config key 'eval.aa_attacks' needs at least one attack with eval.aa_version=custom")


# More attack draws than anyone runs (each is two whole attacks of the file); 10**9 ran without end.
MAX_PHASE2_DRAWS = 1000


def _check_attack_draws(a: AttackDrawConfig, prefix: str, image_size: int) -> None:
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


def _check_phase2(p: Phase2Config, image_size: int) -> None:
    if not 0 <= p.draws <= MAX_PHASE2_DRAWS:
        raise ConfigError(f"config key 'phase2.draws': {p.draws} must be in 0..{MAX_PHASE2_DRAWS} (0 turns it off)")
    _check_attack_draws(p.attack, "phase2.attack", image_size)


def _check_testset(t: TestsetConfig, image_size: int) -> None:
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
    _check_attack_draws(t.attack, "testset.attack", image_size)


def _check_ablation(a: AblationConfig) -> None:
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
