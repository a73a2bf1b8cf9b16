"""Typed configuration shared by every stage.

The dataclass defaults describe a real run (ConvNeXt-tiny at 224 px); a YAML file lists only
what differs from them, and ``key=value`` overrides from the command line come last. Every
value is cast to the type of its default, so YAML quirks (``1e20`` is a string in YAML 1.1)
cannot slip through, and an unknown key is an error that names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.corruptions import ALL_CORRUPTIONS, COMMON
from core.errors import UserError, echo
from core.io import atomic_write_text, submission_name_problem

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


# What ``eval.attacks`` may name; ``robust.specs.SPECS`` says what each one runs.
EVAL_ATTACKS = ("fgsm", "pgd_l1", "pgd_l2", "pgd_linf", "cw_l2", "autoattack", "square", "transfer", "noise")
AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


def _corruption_family() -> list:
    # The corruption-style family the 2nd-place team trained with: noise, blur, JPEG,
    # weather and dropout. Each entry is an albumentations transform name plus its arguments.
    return [
        {"name": "GaussNoise", "std_range": [0.02, 0.1]},
        {"name": "ISONoise"},
        {"name": "GaussianBlur", "blur_limit": [3, 5]},
        {"name": "MotionBlur", "blur_limit": [3, 7]},
        {"name": "ImageCompression", "quality_range": [30, 90]},
        # Fog as ImageNet-C makes it: a plasma-fractal haze (brighter, less contrast). Not
        # A.RandomFog: in albumentations 2.0.8 it draws one cv2 call per fog particle, far
        # dearer than any other corruption, and alone kept the training loader from hiding
        # behind compute on CPU (its cost: BENCHMARKS.md, row "with A.RandomFog").
        {"name": "PlasmaBrightnessContrast", "brightness_range": [0.0, 0.3], "contrast_range": [-0.3, 0.0]},
        {"name": "RandomRain", "drop_length": 8, "blur_value": 3},
        {"name": "RandomSnow", "snow_point_range": [0.1, 0.3]},
        {
            "name": "CoarseDropout",
            "num_holes_range": [1, 4],
            "hole_height_range": [0.05, 0.15],
            "hole_width_range": [0.05, 0.15],
        },
    ]


@dataclass
class DataConfig:
    root: str = "data/cvpr22"
    demo: bool = False  # generate the offline demo data set under `root` when it is missing
    train_dir: str = "train_p2"
    train_labels: str = "label.txt"  # "" -> ImageFolder layout (one sub-folder per class)
    val_dir: str = ""  # "" -> images of the validation label file live in train_dir
    val_labels: str = ""  # a second label file; "" -> stratified split of the training set
    val_fraction: float = 0.05
    split_seed: int = 0
    test_dir: str = "test"
    test_labels: str = ""  # optional hidden labels (`N.png LABEL`) for a local score
    # the per-image manifest of a `make-testset` folder: submit breaks its score down by kind
    test_manifest: str = ""
    num_classes: int = 100
    image_size: int = 224
    # loader worker processes per process; -1 (auto): with CUDA the cores each GPU's process gets,
    # less one for the process itself; on the CPU 2 (core/devices.py: resolve_num_workers)
    num_workers: int = -1
    # every class of [0, num_classes) must have training images (false: a missing class stops the run)
    allow_missing_classes: bool = False
    bad_images: str = "error"  # error | skip (skipped files are reported, up to max_bad_images)
    max_bad_images: int = 100


# AugMix's operations as the paper chose them (Hendrycks et al. 2020): timm's list without its
# ColorIncreasing, ContrastIncreasing, BrightnessIncreasing and SharpnessIncreasing, left out of
# the paper because they overlap ImageNet-C's corruptions (the test would not be unseen).
AUGMIX_OPS = (
    "AutoContrast",
    "Equalize",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


@dataclass
class AugMixConfig:
    """AugMix (``aug.augmix``), timm's implementation, applied to the output of the albumentations pipeline."""

    enabled: bool = False
    severity: int = 3  # strength of every op, 1..10 (timm's magnitude, drawn uniformly up to it)
    width: int = 3  # augmentation chains mixed per image
    depth: int = -1  # ops per chain; -1: 1..3 at random
    alpha: float = 1.0  # Dirichlet weights of the chains and Beta weight of the mix with the original
    ops: list = field(default_factory=lambda: list(AUGMIX_OPS))  # timm op names (timm.data.auto_augment)
    # > 0: each image comes with two AugMix views and the loss adds this weight x their Jensen-Shannon
    # consistency with the clean view (timm's JsdCrossEntropy; the paper uses 12); 0: the AugMix image
    # replaces the clean one
    jsd_weight: float = 0.0


# PRIME's three primitives (Modas et al. 2022) and a smooth haze-and-contrast field aimed at ImageNet-C's
# low-frequency cells (fog, contrast); train/batch_augment.py makes them.
PRIME_PRIMITIVES = ("color", "filter", "deform", "haze")


@dataclass
class PrimeConfig:
    """PRIME (``aug.prime``): random max-entropy transforms mixed as AugMix mixes its chains, made on
    the training device a whole batch at a time (train/batch_augment.py). Strengths as the authors'
    CIFAR config (the closest to 64 px), each drawn per image up to its value."""

    enabled: bool = False
    p: float = 1.0  # probability that an image is augmented
    width: int = 3  # chains per image, mixed with Dirichlet(1) weights, then with the image by a uniform weight
    depth: int = -1  # primitives per chain; -1: 1..3 at random
    primitives: list = field(default_factory=lambda: list(PRIME_PRIMITIVES))
    color_strength: float = 0.01  # variance of the tone curve's sine coefficients (PRIME's T = 0.01)
    color_modes: int = 100  # its highest sine frequency (PRIME's cut = 100)
    filter_strength: float = 4.0  # sigma of the random kernel delta + sigma * N(0, 1) (PRIME's 4)
    filter_size: int = 3  # odd
    deform_strength: float = 1.0  # share of the largest temperature without fold-overs (PRIME's alpha = 1)
    deform_modes: int = 100  # highest mode of the displacement field (PRIME's cutmax = 100)
    haze_strength: float = 0.5  # largest amplitude of the smooth grey field added (pixel units)
    haze_contrast: float = 0.2  # lowest contrast factor (each image pulled towards its mean colour)
    haze_modes: int = 8  # highest mode of the grey field (low frequencies only, as fog)


@dataclass
class FourierConfig:
    """Fourier-basis noise (``aug.fourier``; AFA, Vaish et al. 2024): one planar wave per colour
    channel, of random frequency, direction and phase, added to the image on the training device."""

    enabled: bool = False
    p: float = 1.0  # probability that an image is augmented
    max_freq: float = 0.5  # cycles per pixel, drawn uniformly in (0, max_freq] (0.5: the Nyquist frequency)
    # peak amplitude (pixel units) = strength_min + Exponential(strength_mean); AFA's CIFAR values
    # (mean strength 5 of a unit-L2 wave scaled by size / 32) give a mean peak of about 0.2
    strength_min: float = 0.0
    strength_mean: float = 0.2


@dataclass
class AugConfig:
    scale: list = field(default_factory=lambda: [0.25, 1.0])  # RandomResizedCrop area range
    ratio: list = field(default_factory=lambda: [0.75, 1.3333])
    hflip: float = 0.5
    color_jitter: float = 0.0  # strength; 0 turns it off
    corruption_p: float = 0.3  # probability that one transform of `corruptions` is applied
    corruptions: list = field(default_factory=_corruption_family)
    extra: list = field(default_factory=list)  # more albumentations transforms, same form
    augmix: AugMixConfig = field(default_factory=AugMixConfig)
    prime: PrimeConfig = field(default_factory=PrimeConfig)
    fourier: FourierConfig = field(default_factory=FourierConfig)
    # 1: the device augmentations (prime, fourier) replace the loader's image; 2: every image trains
    # twice, as the loader made it and as its device-augmented copy (each attacked under train.adv;
    # train.adv.consistency ties their predictions): AFA's auxiliary view, DAJAT's two views
    views: int = 1


@dataclass
class ModelConfig:
    name: str = "convnext_tiny"
    pretrained: bool = False  # from the HF hub (needs network)
    pretrained_file: str = ""  # local weights file; the head is re-initialised for num_classes
    drop_path_rate: float = 0.1
    normalize: bool = True  # False: the model sees raw [0,1] pixels (2nd-place style)
    mean: list = field(default_factory=list)  # [] -> from the timm pretrained config
    std: list = field(default_factory=list)
    channels_last: str = "auto"  # auto (on with CUDA, off on the CPU) | true | false
    compile: bool = False
    # ConvNeXt stem: patch (4x4 patchify) | overlap | overlap_tiered (convolutional stems, more robust
    # per FLOP under adversarial training: Singh, Croce & Hein 2023); recorded in the checkpoint
    stem: str = "patch"


@dataclass
class AdvConfig:
    """Adversarial training (``train.adv``): what each optimizer step trains on.

    Attacks are crafted in [0, 1] pixel space through the model's normalization, with the model
    in eval mode (no drop-path) and never through GCM; eps and step size are Linf, in pixel units.
    """

    mode: str = "none"  # none | fgsm_reg | fgsm_rs | pgd | trades
    eps: float = 8 / 255
    steps: int = 3  # pgd / trades iterations
    step_size: float = 0.0  # 0 -> 1.25 eps (fgsm_rs), 2.5 eps / steps (pgd, trades); eps for fgsm_reg
    warmup_epochs: float = 0.0  # eps (and step size) ramp linearly from 0 over these epochs
    weight: float = 0.5  # fgsm_reg: weight of the adversarial loss, the clean loss gets the rest
    beta: float = 6.0  # trades: weight of the KL term (smaller: more clean accuracy)
    # robust validation: PGD-Linf on a fixed, seeded part of the validation set after every epoch
    val_images: int = 200  # 0 -> the whole validation set
    val_steps: int = 10
    select: str = "auto"  # which accuracy picks `best`: auto (robust when mode != none) | clean | robust
    # aug.views=2: weight of the Jensen-Shannon divergence between the predictions on the two views,
    # on their adversarial examples under pgd / fgsm_rs (DAJAT, Addepalli et al. 2022); 0: cross-entropy only
    consistency: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64  # per process
    grad_accum_steps: int = 1
    opt: str = "adamw"
    # train.lr and train.ema_decay are stated for a global batch (batch_size x processes x
    # grad_accum_steps) of base_batch_size images, and scaled to the run's global batch B:
    # lr x (B / base_batch_size) ** p with timm's rule for p (lr_scale=auto: 0.5 for adaptive
    # optimizers, adam*/lamb/ada*, else 1), and ema_decay ** (B / base_batch_size), so the EMA
    # averages over the same number of images; base_batch_size=0 takes both as given.
    lr: float = 1e-3
    base_batch_size: int = 64
    lr_scale: str = "auto"  # auto | linear | sqrt
    weight_decay: float = 0.05
    layer_decay: float = 0.0  # 0 -> off; e.g. 0.8 for fine-tuning pretrained weights
    sched: str = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.0  # alpha; 0 -> off
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    ema: bool = True
    ema_decay: float = 0.999
    clip_grad: float = 0.0
    # auto: bf16 on a GPU that computes it natively, float32 ("no") elsewhere; submit predicts with
    # it too. GCM computes in float32 whatever this says.
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    adv: AdvConfig = field(default_factory=AdvConfig)
    max_steps: int = 0  # stop after this many optimizer steps (0 -> all epochs)
    checkpoint_every: int = 0  # optimizer steps between full-state checkpoints (0 -> per epoch)
    keep_checkpoints: int = 2
    log_every: int = 10


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "robust-convnext"
    entity: str = ""
    log_images: bool = True
    timeout: float = 10.0  # seconds to wait for the server before falling back to offline
    # the model artifact holds the weights themselves (else a checksummed file:// reference to them)
    upload_weights: bool = False


@dataclass
class TTAConfig:
    hflip: bool = False
    scales: list = field(default_factory=lambda: [1.0])  # resize factors, center-cropped/padded back


@dataclass
class GCMConfig:
    enabled: bool = True
    w: float = 1e20
    eps: float = 1e-8


@dataclass
class RandomPadConfig:
    enabled: bool = False
    min_ratio: float = 218 / 224  # resize to l in [min, max] * size, zero-pad back to size
    max_ratio: float = 223 / 224
    seed: int = 0


@dataclass
class SubmitConfig:
    checkpoints: list = field(default_factory=list)  # exported models; [] -> runs/<name>/best
    weights: list = field(default_factory=list)  # one per member; [] -> equal
    aggregate: str = "prob"  # prob | logit
    temperature: float = 1.0
    batch_size: int = 64
    num_workers: int = -1  # loader worker processes when a GPU runs the model; -1: as data.num_workers
    cpu_num_workers: int = -1  # ... when the CPU does; -1: the cores the model's threads leave free
    out_dir: str = "submissions"
    file_name: str = ""  # "" -> <name>
    on_bad_image: str = "error"  # error | fallback
    fallback_class: int = 0


@dataclass
class BudgetConfig:
    # The Phase II rules as the organizers' check asserts them (params < 30M, ptflops MACs < 5G
    # at 3 x 224 x 224; their README's "120Mb" is the same 30M float32 parameters)
    max_params: float = 30e6
    max_gmacs: float = 5.0
    enforce: bool = False


@dataclass
class EvalConfig:
    subset: int = 500  # labelled images evaluated (seeded choice); 0 -> all
    batch_size: int = 50
    seed: int = 0
    # the paper's white-box columns and AutoAttack, then Square (score-based), transfer and the noise baseline
    attacks: list = field(default_factory=lambda: list(EVAL_ATTACKS))
    # eps in [0,1] pixel units; the paper's values at 224 px (small images: see configs/default.yaml)
    eps_linf: float = 8 / 255
    eps_l2: float = 8.0
    eps_l1: float = 1600.0
    steps: int = 20
    step_ratio: float = 0.075  # step = 3/40 * eps, as in the paper
    restarts: int = 1
    cw_steps: int = 100
    cw_max_norm: float = 0.0  # C&W result projected onto this L2 ball; 0 -> eps_l2
    square_queries: int = 1000
    # AutoAttack (Croce & Hein 2020, its authors' pyautoattack): "standard" is their exact setting
    # (APGD-CE, APGD-T, FAB-T, Square 5000 queries); "custom" runs aa_attacks with the budgets below,
    # a cheaper subset for CPU runs. Against a randomized model the "rand" version (APGD with EOT) runs.
    aa_version: str = "standard"
    aa_attacks: list = field(default_factory=lambda: ["apgd-ce", "apgd-t"])
    aa_iters: int = 100
    aa_target_classes: int = 9
    aa_queries: int = 5000
    eps_curve: list = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255])
    eot_samples: int = 10  # gradient samples per step against the random resize-pad layer
    draws: int = 10  # forward draws for expected accuracy of a randomized model
    surrogate: str = ""  # an independently trained checkpoint for transfer attacks
    file: str = ""  # an exported Phase II file (.onnx or .zip) to attack instead of the checkpoints
    # ImageNet-C (core/corruptions.py): the 15 common corruptions and the 4 held-out ones, severities 1..5
    corruptions: list = field(default_factory=lambda: list(ALL_CORRUPTIONS))
    corruption_severities: list = field(default_factory=lambda: [1, 2, 3, 4, 5])
    corruption_baseline: str = ""  # a checkpoint whose errors on the same images give mCE and relative mCE
    out_dir: str = ""  # "" -> runs/<name>/eval


@dataclass
class ExportConfig:
    path: str = ""  # "" -> runs/<name>/<name>.pt2; the other formats take its stem
    # onnx and zip: the Phase II files (one model, no TTA); pt2: the whole in-process model (torch.export)
    formats: list = field(default_factory=lambda: ["onnx", "zip", "pt2"])
    channel_order: str = "rgb"  # of the images the Phase II files are fed (the organizers feed bgr)


# What `make-testset` and the Phase-II-like score may draw (attacks/transfer.py: ATTACK_KINDS).
ATTACK_DRAW_KINDS = ("fgsm", "pgd", "mifgsm", "difgsm")


@dataclass
class AttackDrawConfig:
    """A distribution over attack settings: each draw picks every item uniformly from its list."""

    kinds: list = field(default_factory=lambda: list(ATTACK_DRAW_KINDS))
    norms: list = field(default_factory=lambda: ["linf", "l2"])
    # eps in [0, 1] pixel units; L2 values are for 224 px (scale them by side / 224 for small images)
    eps_linf: list = field(default_factory=lambda: [2 / 255, 4 / 255, 8 / 255, 16 / 255])
    eps_l2: list = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    steps: list = field(default_factory=lambda: [5, 10, 20])


@dataclass
class TestsetConfig:
    """``./run.sh make-testset``: a Phase-I-like test set from held-out labelled images."""

    out_dir: str = "data/testset"  # written whole (temp folder + rename): test/N.png, test_labels.txt, manifest.json
    overwrite: bool = False  # replace an existing make-testset folder
    subset: int = 0  # source images (seeded choice); 0 -> all labelled ones
    seed: int = 0
    # the mix: fraction of each kind (they must sum to 1); stacked = attack and corruption, in either order
    clean: float = 0.25
    corruption: float = 0.25
    transfer: float = 0.25
    stacked: float = 0.25
    surrogates: list = field(default_factory=list)  # checkpoints the transfer attacks are crafted on
    corruptions: list = field(default_factory=lambda: list(COMMON))
    severities: list = field(default_factory=lambda: [1, 2, 3, 4, 5])
    attack: AttackDrawConfig = field(default_factory=AttackDrawConfig)


@dataclass
class Phase2Config:
    """The Phase-II-like score of ``evaluate eval.file=FILE``: ``draws`` white-box attacks on the file."""

    draws: int = 0  # k attacks, each with settings drawn from `attack`; 0 -> off
    seed: int = 0
    attack: AttackDrawConfig = field(default_factory=AttackDrawConfig)


# The stack parts `ablate` can combine ("+"-joined in ablation.variants; robust/ablation.py).
ABLATION_PARTS = (
    "single", "hflip", "multiscale", "ensemble", "gcm", "random_pad", "temperature",
    "adversarial", "corruption", "mixed",
)  # fmt: skip


@dataclass
class AblationConfig:
    """``./run.sh ablate``: what each part of the submission stack buys, variant by variant."""

    testset: str = "data/testset"  # a make-testset folder: the Phase-I-like score
    # checkpoints per recipe (2-3 each): standard, adversarially trained, corruption-trained
    standard: list = field(default_factory=list)
    adversarial: list = field(default_factory=list)
    corruption: list = field(default_factory=list)
    # "+"-joined parts of ABLATION_PARTS on top of one standard checkpoint without GCM, TTA or pad
    variants: list = field(
        default_factory=lambda: [
            "single", "hflip", "multiscale", "ensemble", "gcm", "random_pad", "temperature", "adversarial",
            "corruption", "ensemble+hflip+multiscale", "mixed+hflip+multiscale",
        ]
    )  # fmt: skip
    scales: list = field(default_factory=lambda: [0.9, 1.0, 1.1])  # the multiscale part's TTA scales
    temperature: float = 2.0  # the temperature part (on a single model it changes no prediction)
    attack_subset: int = 100  # clean images attacked per variant (AutoAttack + BPDA/EOT); 0 -> all
    bootstrap: int = 2000  # resamples over images of each difference's 95% interval
    out_dir: str = ""  # "" -> runs/<name>/ablation


@dataclass
class Config:
    name: str = "cvpr22"
    out_dir: str = "runs"
    seed: int = 42
    resume: str = ""  # "" | auto | path of a checkpoint folder
    # train: replace the run already under this name (else training refuses); submit: replace a
    # submission of another model or test folder under this name (a rerun of the same replaces it)
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    gcm: GCMConfig = field(default_factory=GCMConfig)
    random_pad: RandomPadConfig = field(default_factory=RandomPadConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    testset: TestsetConfig = field(default_factory=TestsetConfig)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    ablation: AblationConfig = field(default_factory=AblationConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def submission_name(self) -> str:
        """The file name (no extension) ``submit`` writes: ``submit.file_name``, else ``name``."""
        return self.submit.file_name or self.name

    @property
    def submission_stem(self) -> Path:
        """``submit.out_dir / submission_name``: the stem of the three files ``submit`` writes."""
        return Path(self.submit.out_dir) / self.submission_name


# Keys whose value (or, for a list, each item) must be one of these.
_CHOICES = {
    "data.bad_images": ("error", "skip"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.lr_scale": ("auto", "linear", "sqrt"),
    "model.channels_last": ("auto", "true", "false"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
    "submit.aggregate": ("prob", "logit"),
    "submit.on_bad_image": ("error", "fallback"),
    "eval.attacks": EVAL_ATTACKS,
    "eval.aa_version": ("standard", "custom"),
    "eval.aa_attacks": AA_ATTACKS,
    "eval.corruptions": ALL_CORRUPTIONS,
    "model.stem": ("patch", "overlap", "overlap_tiered"),
    "train.adv.mode": ("none", "fgsm_reg", "fgsm_rs", "pgd", "trades"),
    "train.adv.select": ("auto", "clean", "robust"),
    "aug.prime.primitives": PRIME_PRIMITIVES,
    "export.formats": ("onnx", "zip", "pt2"),
    "export.channel_order": ("rgb", "bgr"),
    "testset.corruptions": ALL_CORRUPTIONS,
    "testset.attack.kinds": ATTACK_DRAW_KINDS,
    "testset.attack.norms": ("linf", "l2"),
    "phase2.attack.kinds": ATTACK_DRAW_KINDS,
    "phase2.attack.norms": ("linf", "l2"),
}


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str, cfg: Config) -> ConfigError:
    valid = _all_keys(cfg) + _sections(cfg)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def key_named(name: str, section: str = "") -> str | None:
    """The config key a command-line ``--name`` most likely meant (``epochs`` -> ``train.epochs``,
    ``train.lr`` -> ``train.lr``), matching the whole key or its last part, the shortest and then
    those of ``section`` first; None if none does."""
    name = name.replace("-", "_")
    keys = _all_keys(new_config())
    if name in keys:
        return name
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == name]
    return min(matches, key=lambda k: (k.count("."), not k.startswith(f"{section}."), k)) if matches else None


def _sections(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def cast_value(key: str, value: Any, default: Any, from_text: bool = False) -> Any:
    """Cast ``value`` to the type of ``default``; raise ConfigError naming ``key`` if it cannot."""
    expected = type(default)
    try:
        if expected is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if expected is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
            raise ValueError
        if expected is float:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
            raise ValueError
        if expected is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
        if expected is list:
            if isinstance(value, str) and from_text:
                text = value.strip()
                if text.startswith("["):
                    value = load_yaml_text(text, f"config key '{key}'")
                else:
                    value = [v for v in text.split(",") if v.strip()] if text else []
            if value is None:
                return []
            if not isinstance(value, list):
                raise ValueError
            if default and not isinstance(default[0], dict):
                return [cast_value(f"{key}[{i}]", v, default[0], from_text) for i, v in enumerate(value)]
            return list(value)
    except (ValueError, TypeError, yaml.YAMLError, RecursionError):
        pass
    else:
        raise ConfigError(f"config key '{key}' has a type this loader does not handle")
    raise ConfigError(f"config key '{key}': expected {expected.__name__}, got {echo(value)}")


# Keys that are a bool with an "auto" third value: YAML's true/false (and on/off, yes/no, 1/0) read as
# "true"/"false".
_SWITCHES = {"model.channels_last"}


def _switch_value(value: str) -> str:
    text = value.strip().lower()
    return "true" if text in _TRUE else "false" if text in _FALSE else text


def _check_choice(key: str, value: Any) -> None:
    choices = _CHOICES.get(key)
    for item in (value if isinstance(value, list) else [value]) if choices else []:
        if item not in choices:
            raise ConfigError(f"config key '{key}': {echo(item)} is not one of {', '.join(choices)}")


def _set(cfg: Config, key: str, value: Any, from_text: bool) -> None:
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise _unknown_key(key, cfg)
        if i == len(parts) - 1:
            current = getattr(node, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; give its keys, e.g. '{key}.…=…'")
                for sub, sub_value in value.items():
                    _set(cfg, f"{key}.{sub}", sub_value, from_text)
                return
            new = cast_value(key, value, current, from_text)
            if key in _SWITCHES:
                new = _switch_value(new)
            _check_choice(key, new)
            setattr(node, part, new)
        else:
            node = getattr(node, part)


def new_config() -> Config:
    """The dataclass defaults."""
    return Config()


# Values a config document may expand to, aliases counted at every use: a real config has a few
# hundred; an alias bomb (each anchor a list of aliases to the previous one) has billions.
MAX_YAML_VALUES = 20_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that counts what the aliases would expand to on the composed node graph
    (shared, so nothing is expanded yet) and refuses a document past ``MAX_YAML_VALUES``."""

    def construct_document(self, node):
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise ConfigError(
                f"YAML aliases expand to more than {MAX_YAML_VALUES} values (an alias bomb, or an alias "
                "inside its own anchor); write the values out"
            )
        return super().construct_document(node)


def _expanded_size(root: yaml.Node) -> float:
    """Values ``root`` stands for with every alias expanded; infinite for a recursive alias."""
    sizes: dict[int, float] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order walk: a deep document cannot exhaust the Python stack here
        node, children_done = stack.pop()
        key = id(node)
        children = (
            [item for pair in node.value for item in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        if children_done:
            sizes[key] = 1 + sum(sizes.get(id(c), math.inf) for c in children)
            if sizes[key] > MAX_YAML_VALUES:
                return sizes[key]
        elif key not in sizes:
            sizes[key] = math.inf  # in progress: meeting it again below means a cycle
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml_text(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` within ``MAX_YAML_VALUES``; errors are ConfigErrors naming ``where``."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping with ``safe_load``; errors name the file (and line when YAML knows it)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def apply_dict(cfg: Config, data: dict, source: str = "") -> Config:
    """Merge a nested mapping (as read from YAML) into ``cfg``."""
    for key, value in data.items():
        try:
            _set(cfg, str(key), value, from_text=False)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply dotted ``key=value`` overrides, each cast to the type of its default."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {echo(item)} is not of the form key=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value, from_text=True)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, check_aug: bool = True) -> Config:
    """Defaults <- YAML file (``configs/default.yaml`` when ``path`` is None) <- overrides.

    ``check_aug=False`` leaves out the check of the ``aug`` section (building its pipeline imports
    albumentations, and with it torch): for the stages and tools that never augment an image. An
    ``aug.*`` override is checked anyway (given explicitly, a bad value must not pass silently), and
    AugMix's numbers always are (they need no import).
    """
    cfg = new_config()
    path = Path(path) if path else DEFAULT_CONFIG
    apply_dict(cfg, read_yaml(path), source=str(path))
    apply_overrides(cfg, overrides or [])
    expand_name(cfg)
    # An `aug.*` value typed on the command line of a stage that never augments is still checked whole.
    explicit_aug = any(item.split("=", 1)[0].strip().startswith("aug.") for item in overrides or [])
    validate_config(cfg, check_aug or explicit_aug)
    return cfg


def expand_name(cfg: Config) -> None:
    """``name`` may name environment variables (``name=sweep-$WANDB_RUN_ID``: a W&B sweep agent
    starts each run with its own id there, and runs no shell that would expand it)."""
    if "$" in cfg.name:
        expanded = os.path.expandvars(cfg.name)
        if "$" in expanded:
            raise ConfigError(f"config key 'name': {echo(cfg.name)} uses an environment variable that is not set")
        cfg.name = expanded


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


def _check_adv(t: TrainConfig) -> None:
    a = t.adv
    if a.mode == "none":
        if a.select == "robust":
            raise ConfigError("config key 'train.adv.select': robust needs adversarial training (train.adv.mode)")
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


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a config saved by :func:`config_to_dict` (unknown keys are still errors)."""
    return apply_dict(new_config(), data, source="saved config")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def resolve_path(root: str, path: str) -> Path:
    """``path`` relative to ``root`` unless absolute; '' stays ''."""
    if not path:
        return Path("")
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(root) / p
