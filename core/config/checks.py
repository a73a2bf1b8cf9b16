"""The checks of a loaded config that one field's type cannot express (:func:`validate_config`):
ranges, finite numbers, seeds and names everywhere, and the combinations of the root's sections
that make no sense; a stage's sections come with their own checks (``register_section``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from core.config.schema import (
    PRIME_PRIMITIVES,
    Config,
    ConfigError,
    DataConfig,
    FourierConfig,
    ModelConfig,
    PrimeConfig,
    TrainConfig,
    range_of,
    section_checks,
)
from core.errors import echo


def validate_config(cfg: Config) -> None:
    """Every check a single key's type cannot express: the root's sections here, then each stage's
    (registered with its sections), then every number's range.

    ``load_config`` calls it, so a stage stops on a bad value with one line naming the key.
    """
    if not cfg.name or any(c in cfg.name for c in "/\\") or cfg.name in {".", ".."}:
        raise ConfigError(f"config key 'name': {echo(cfg.name)} must be a plain name (no path separators)")
    check_name_length("name", cfg.name)
    _check_finite(cfg)
    _check_seeds(cfg)
    _check_data(cfg.data)
    _check_train(cfg.train)
    _check_distill(cfg)
    _check_augmix(cfg)
    _check_batch_augment(cfg)
    _check_model(cfg.model)
    for check in section_checks():
        check(cfg)
    _check_ranges(cfg)


# Names (`name`, a stage's file names) become file and folder names with up to 24 more characters (temporary,
# backup and lock files) under the 255-byte limit of common file systems, and W&B artifact names
# (`submission-<name>`: at most 128 characters).
MAX_NAME_BYTES = 100


def check_name_length(key: str, value: str) -> None:
    """``value`` of config key ``key`` becomes file names: at most ``MAX_NAME_BYTES``."""
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise ConfigError(
            f"config key '{key}': {echo(value)} is {size} bytes long, more than {MAX_NAME_BYTES} (it becomes "
            "file names, and file systems allow 255 bytes once our suffixes are added)"
        )


def _check_finite(node: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
            continue
        for item in value if isinstance(value, list) else [value]:
            # infinity is a value only where the field's range holds it ("no limit": `within("[0, inf]")`)
            if isinstance(item, float) and (math.isnan(item) or math.isinf(item) and item not in _range(node, f.name)):
                raise ConfigError(f"config key '{key}': {echo(value)} is not a finite number")


def _range(node: Any, name: str) -> Any:
    return range_of(node, name) or ()


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


def at_least_one(section: Any, prefix: str, keys: tuple[str, ...]) -> None:
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
    at_least_one(t, "train", ("epochs", "batch_size", "grad_accum_steps", "keep_checkpoints"))
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
