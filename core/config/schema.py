"""The config's schema: each section a dataclass, each field with its default and, beside it, its
allowed values (:func:`one_of`, :func:`one_of_each`), its range (:func:`within`: every number has
one) or its list's item type (:func:`list_of`: every list has one). The defaults describe a real run
(ConvNeXt-tiny at 224 px); a YAML file lists only what differs (:mod:`core.config.load`), and
:mod:`core.config.checks` checks what one field cannot say.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from core.corruptions import ALL_CORRUPTIONS, COMMON
from core.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def one_of(choices: tuple, default: Any, switch: bool = False) -> Any:
    """A field whose value must be one of ``choices`` (checked as the config loads).

    ``switch``: a bool with a third value (``auto``); YAML's true/false (on/off, yes/no, 1/0)
    read as ``"true"``/``"false"``.
    """
    return field(default=default, metadata={"choices": tuple(choices), "switch": switch})


def one_of_each(choices: tuple, default_factory: Callable[[], list]) -> Any:
    """A list field whose every item must be one of ``choices``."""
    return field(default_factory=default_factory, metadata={"choices": tuple(choices), "item": str})


class Interval(NamedTuple):
    """The allowed values of a number: ``lo``..``hi``, each end open or closed (``text`` as written)."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    text: str

    def __contains__(self, value: object) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below


_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])")


def parse_interval(text: str) -> Interval:
    """``"[0, 1]"``, ``"(0, 10]"``, ``"[1, inf]"``: the interval as mathematics writes it."""
    match = _INTERVAL.fullmatch(text)
    if not match:
        raise ValueError(f"not an interval: {text!r}")
    return Interval(float(match[2]), float(match[3]), match[1] == "(", match[4] == ")", text)


def within(interval: str, default: Any, item: type | None = None) -> Any:
    """A number field whose value must lie in ``interval`` (``"[0, 1]"``, ``"(0, 10]"``), checked
    as the config loads; a list field of numbers (``item``: their type, else the default's first
    item's): each item must. Bounds are what a run can mean, not what is wise: a bad but possible
    value passes, one that cannot be meant (a probability of 5, a 100001-px filter) does not."""
    bounds = parse_interval(interval)
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata={"range": bounds, "item": item or type(items[0])})
    return field(default=default, metadata={"range": bounds})


def list_of(item: type, default_factory: Callable[[], list] = list) -> Any:
    """A list field whose items are of type ``item`` (``str``, ``dict``, ...), checked as the config loads."""
    return field(default_factory=default_factory, metadata={"item": item})


def choices_of(section: Any, name: str) -> tuple | None:
    """The allowed values of field ``name`` of a config section; None: any value of its type."""
    return next((f.metadata.get("choices") for f in dataclasses.fields(section) if f.name == name), None)


def range_of(section: Any, name: str) -> Interval | None:
    """The range of number field ``name`` of a config section (see :func:`within`)."""
    return next((f.metadata.get("range") for f in dataclasses.fields(section) if f.name == name), None)


def item_type_of(section: Any, name: str) -> type | None:
    """The item type of list field ``name`` of a config section (see :func:`list_of`)."""
    return next((f.metadata.get("item") for f in dataclasses.fields(section) if f.name == name), None)


def is_switch(section: Any, name: str) -> bool:
    """Whether field ``name`` of a config section is an on/off/auto switch (see :func:`one_of`)."""
    return any(f.name == name and f.metadata.get("switch") for f in dataclasses.fields(section))


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
    val_fraction: float = within("[0, 1)", 0.05)
    split_seed: int = within("[0, 4294967295]", 0)
    test_dir: str = "test"
    test_labels: str = ""  # optional hidden labels (`N.png LABEL`) for a local score
    # the per-image manifest of a `make-testset` folder: submit breaks its score down by kind
    test_manifest: str = ""
    num_classes: int = within("[2, 100000]", 100)
    image_size: int = within("[16, 4096]", 224)
    # loader worker processes per process; -1 (auto): with CUDA the cores each GPU's process gets,
    # less one for the process itself; on the CPU 2 (core/devices.py: resolve_num_workers)
    num_workers: int = within("[-1, 1024]", -1)
    # every class of [0, num_classes) must have training images (false: a missing class stops the run)
    allow_missing_classes: bool = False
    bad_images: str = one_of(
        ("error", "skip"), "error"
    )  # error | skip (skipped files are reported, up to max_bad_images)
    max_bad_images: int = within("[0, 1e12]", 100)


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
    severity: int = within("[1, 10]", 3)  # strength of every op, 1..10 (timm's magnitude, drawn uniformly up to it)
    width: int = within("[1, 16]", 3)  # augmentation chains mixed per image
    depth: int = within("[-1, 16]", -1)  # ops per chain; -1: 1..3 at random
    # Dirichlet weights of the chains and Beta weight of the mix with the original
    alpha: float = within("[0.05, 1000]", 1.0)
    ops: list = list_of(str, lambda: list(AUGMIX_OPS))  # timm op names (timm.data.auto_augment)
    # > 0: each image comes with two AugMix views and the loss adds this weight x their Jensen-Shannon
    # consistency with the clean view (timm's JsdCrossEntropy; the paper uses 12); 0: the AugMix image
    # replaces the clean one
    jsd_weight: float = within("[0, 1000]", 0.0)
    # where AugMix runs: auto (on the training device with CUDA, in the CPU loader otherwise) | true (on
    # the training device, a batch at a time: train/batch_augment.py) | false (in the loader, timm's PIL ops)
    device: str = one_of(("auto", "true", "false"), "auto", switch=True)


# PRIME's three primitives (Modas et al. 2022) and a smooth haze-and-contrast field aimed at ImageNet-C's
# low-frequency cells (fog, contrast); train/batch_augment.py makes them.
PRIME_PRIMITIVES = ("color", "filter", "deform", "haze")


@dataclass
class PrimeConfig:
    """PRIME (``aug.prime``): random max-entropy transforms mixed as AugMix mixes its chains, made on
    the training device a whole batch at a time (train/batch_augment.py). Strengths as the authors'
    CIFAR config (the closest to 64 px), each drawn per image up to its value."""

    enabled: bool = False
    p: float = within("[0, 1]", 1.0)  # probability that an image is augmented
    # chains per image, mixed with Dirichlet(1) weights, then with the image by a uniform weight
    width: int = within("[1, 16]", 3)
    depth: int = within("[-1, 16]", -1)  # primitives per chain; -1: 1..3 at random
    primitives: list = one_of_each(PRIME_PRIMITIVES, lambda: list(PRIME_PRIMITIVES))
    color_strength: float = within("[0, 1]", 0.01)  # variance of the tone curve's sine coefficients (PRIME's T = 0.01)
    color_modes: int = within("[1, 1000]", 100)  # its highest sine frequency (PRIME's cut = 100)
    filter_strength: float = within("[0, 100]", 4.0)  # sigma of the random kernel delta + sigma * N(0, 1) (PRIME's 4)
    filter_size: int = within("[1, 31]", 3)  # odd
    # share of the largest temperature without fold-overs (PRIME's alpha = 1)
    deform_strength: float = within("[0, 10]", 1.0)
    deform_modes: int = within("[2, 500]", 100)  # highest mode of the displacement field (PRIME's cutmax = 100)
    haze_strength: float = within("[0, 1]", 0.5)  # largest amplitude of the smooth grey field added (pixel units)
    haze_contrast: float = within("(0, 1]", 0.2)  # lowest contrast factor (each image pulled towards its mean colour)
    haze_modes: int = within("[1, 500]", 8)  # highest mode of the grey field (low frequencies only, as fog)


@dataclass
class FourierConfig:
    """Fourier-basis noise (``aug.fourier``; AFA, Vaish et al. 2024): one planar wave per colour
    channel, of random frequency, direction and phase, added to the image on the training device."""

    enabled: bool = False
    p: float = within("[0, 1]", 1.0)  # probability that an image is augmented
    # cycles per pixel, drawn uniformly in (0, max_freq] (0.5: the Nyquist frequency)
    max_freq: float = within("(0, 0.5]", 0.5)
    # peak amplitude (pixel units) = strength_min + Exponential(strength_mean); AFA's CIFAR values
    # (mean strength 5 of a unit-L2 wave scaled by size / 32) give a mean peak of about 0.2
    strength_min: float = within("[0, 1]", 0.0)
    strength_mean: float = within("[0, 1]", 0.2)


@dataclass
class AugConfig:
    scale: list = within("(0, 1]", [0.25, 1.0])  # RandomResizedCrop area range
    ratio: list = within("(0, 100]", [0.75, 1.3333])
    hflip: float = within("[0, 1]", 0.5)
    color_jitter: float = within("[0, 1]", 0.0)  # strength; 0 turns it off
    corruption_p: float = within("[0, 1]", 0.3)  # probability that one transform of `corruptions` is applied
    corruptions: list = list_of(dict, _corruption_family)
    extra: list = list_of(dict)  # more albumentations transforms, same form
    augmix: AugMixConfig = field(default_factory=AugMixConfig)
    prime: PrimeConfig = field(default_factory=PrimeConfig)
    fourier: FourierConfig = field(default_factory=FourierConfig)
    # 1: the device augmentations (prime, fourier) replace the loader's image; 2: every image trains
    # twice, as the loader made it and as its device-augmented copy (each attacked under train.adv;
    # train.adv.consistency ties their predictions): AFA's auxiliary view, DAJAT's two views
    views: int = within("[1, 2]", 1)


@dataclass
class ModelConfig:
    name: str = "convnext_tiny"
    pretrained: bool = False  # from the HF hub (needs network)
    pretrained_file: str = ""  # local weights file; the head is re-initialised for num_classes
    drop_path_rate: float = within("[0, 1)", 0.1)
    normalize: bool = True  # False: the model sees raw [0,1] pixels (2nd-place style)
    mean: list = within("[0, 1]", [], item=float)  # [] -> from the timm pretrained config
    std: list = within("(0, 1]", [], item=float)
    channels_last: str = one_of(
        ("auto", "true", "false"), "auto", switch=True
    )  # auto (on with CUDA, off on the CPU) | true | false
    compile: bool = False
    # ConvNeXt stem: patch (4x4 patchify) | overlap | overlap_tiered (convolutional stems, more robust
    # per FLOP under adversarial training: Singh, Croce & Hein 2023); recorded in the checkpoint
    stem: str = one_of(("patch", "overlap", "overlap_tiered"), "patch")


@dataclass
class AdvConfig:
    """Adversarial training (``train.adv``): what each optimizer step trains on.

    Attacks are crafted in [0, 1] pixel space through the model's normalization, with the model
    in eval mode (no drop-path) and never through GCM; eps and step size are Linf, in pixel units.
    """

    mode: str = one_of(("none", "fgsm_reg", "fgsm_rs", "pgd", "trades"), "none")
    eps: float = within("[0, 1]", 8 / 255)
    steps: int = within("[0, 100000]", 3)  # pgd / trades iterations
    step_size: float = within("[0, 1]", 0.0)  # 0 -> 1.25 eps (fgsm_rs), 2.5 eps / steps (pgd, trades); eps for fgsm_reg
    warmup_epochs: float = within("[0, 1e6]", 0.0)  # eps (and step size) ramp linearly from 0 over these epochs
    weight: float = within("[0, 1]", 0.5)  # fgsm_reg: weight of the adversarial loss, the clean loss gets the rest
    beta: float = within("[0, 1000]", 6.0)  # trades: weight of the KL term (smaller: more clean accuracy)
    # robust validation: PGD-Linf on a fixed, seeded part of the validation set after every epoch
    val_images: int = within("[0, 1e12]", 200)  # 0 -> the whole validation set
    val_steps: int = within("[1, 100000]", 10)
    select: str = one_of(
        ("auto", "clean", "robust"), "auto"
    )  # which accuracy picks `best`: auto (robust when mode != none) | clean | robust
    # aug.views=2: weight of the Jensen-Shannon divergence between the predictions on the two views,
    # on their adversarial examples under pgd / fgsm_rs (DAJAT, Addepalli et al. 2022); 0: cross-entropy only
    consistency: float = within("[0, 1000]", 0.0)


@dataclass
class AverageConfig:
    """``./run.sh average`` (train/average.py): one exported model from the weights of several."""

    # last: the last `last` full-state checkpoints of one run (SWA-style); uniform / greedy: the `best`
    # of several runs from a shared start (model soups; greedy adds a run only if the soup's
    # validation score improves)
    mode: str = one_of(("last", "uniform", "greedy"), "greedy")
    runs: list = list_of(str)  # run folders or checkpoint stems (runs/X/best); mode=last: one run folder
    last: int = within("[2, 10000]", 2)  # checkpoints averaged by mode=last (train.keep_checkpoints must keep them)
    weights: str = one_of(("model", "ema"), "model")  # mode=last: the raw weights or their EMA


@dataclass
class TrainConfig:
    epochs: int = within("[1, 1e6]", 30)
    batch_size: int = within("[1, 1048576]", 64)  # per process
    grad_accum_steps: int = within("[1, 1048576]", 1)
    opt: str = "adamw"
    # train.lr and train.ema_decay are stated for a global batch (batch_size x processes x
    # grad_accum_steps) of base_batch_size images, and scaled to the run's global batch B:
    # lr x (B / base_batch_size) ** p with timm's rule for p (lr_scale=auto: 0.5 for adaptive
    # optimizers, adam*/lamb/ada*, else 1), warmup_epochs by the same factor (at most epochs / 2),
    # and ema_decay ** (B / base_batch_size), so the EMA averages over the same number of images;
    # base_batch_size=0 takes them as given (train/setup.py: scale_for_batch).
    lr: float = within("(0, 10]", 1e-3)
    base_batch_size: int = within("[0, 1e9]", 64)
    lr_scale: str = one_of(("auto", "linear", "sqrt"), "auto")
    weight_decay: float = within("[0, 10]", 0.05)
    layer_decay: float = within("[0, 1]", 0.0)  # 0 -> off; e.g. 0.8 for fine-tuning pretrained weights
    sched: str = "cosine"
    warmup_epochs: int = within("[0, 1e6]", 1)
    warmup_lr: float = within("[0, 10]", 1e-6)
    min_lr: float = within("[0, 10]", 1e-6)
    label_smoothing: float = within("[0, 1)", 0.1)
    mixup: float = within("[0, 1000]", 0.0)  # alpha; 0 -> off
    cutmix: float = within("[0, 1000]", 0.0)
    mixup_prob: float = within("[0, 1]", 1.0)
    ema: bool = True
    ema_decay: float = within("(0, 1)", 0.999)
    clip_grad: float = within("[0, 1e12]", 0.0)
    # auto: bf16 on a GPU that computes it natively, float32 ("no") elsewhere; submit predicts with
    # it too. GCM computes in float32 whatever this says.
    mixed_precision: str = one_of(("auto", "no", "bf16", "fp16"), "auto")
    adv: AdvConfig = field(default_factory=AdvConfig)
    max_steps: int = within("[0, 1e15]", 0)  # stop after this many optimizer steps (0 -> all epochs)
    checkpoint_every: int = within("[0, 1e15]", 0)  # optimizer steps between full-state checkpoints (0 -> per epoch)
    keep_checkpoints: int = within("[1, 10000]", 2)
    log_every: int = within("[1, 1e15]", 10)
    # issue 38, two stages and weight averaging (train/init_from.py, train/average.py):
    # an exported model (runs/X/best) whose weights a fresh run starts from; "" -> timm's initialisation
    init_from: str = ""
    average: AverageConfig = field(default_factory=AverageConfig)


@dataclass
class WandbConfig:
    mode: str = one_of(("auto", "online", "offline", "disabled"), "auto")
    project: str = "robust-convnext"
    entity: str = ""
    log_images: bool = True
    timeout: float = within("(0, 86400]", 10.0)  # seconds to wait for the server before falling back to offline
    # the model artifact holds the weights themselves (else a checksummed file:// reference to them)
    upload_weights: bool = False


@dataclass
class TTAConfig:
    hflip: bool = False
    scales: list = within("(0, 8]", [1.0])  # resize factors, center-cropped/padded back


@dataclass
class GCMConfig:
    enabled: bool = True
    w: float = within("[0, 1e300]", 1e20)
    eps: float = within("[0, 1]", 1e-8)
    # sin: the paper's x + eps*sin(w*x); cos: x + eps*cos(w*x), the same concealment in an op the
    # organizers' ONNX converter has (an exported .onnx always holds the cos form)
    form: str = one_of(("sin", "cos"), "sin")


@dataclass
class RandomPadConfig:
    enabled: bool = False
    min_ratio: float = within("(0, 1]", 218 / 224)  # resize to l in [min, max] * size, zero-pad back to size
    max_ratio: float = within("(0, 1]", 223 / 224)
    seed: int = within("[0, 4294967295]", 0)


@dataclass
class SubmitConfig:
    checkpoints: list = list_of(str)  # exported models; [] -> runs/<name>/best
    weights: list = within("[0, 1e12]", [], item=float)  # one per member; [] -> equal
    aggregate: str = one_of(("prob", "logit"), "prob")
    temperature: float = within("(0, 1e6]", 1.0)
    batch_size: int = within("[1, 1048576]", 64)
    # loader worker processes when a GPU runs the model; -1: as data.num_workers
    num_workers: int = within("[-1, 1024]", -1)
    # ... when the CPU does; -1: the cores the model's threads leave free
    cpu_num_workers: int = within("[-1, 1024]", -1)
    out_dir: str = "submissions"
    file_name: str = ""  # "" -> <name>
    on_bad_image: str = one_of(("error", "fallback"), "error")
    fallback_class: int = within("[0, 100000]", 0)


@dataclass
class BudgetConfig:
    # The Phase II rules as the organizers' check asserts them (params < 30M, ptflops MACs < 5G
    # at 3 x 224 x 224; their README's "120Mb" is the same 30M float32 parameters)
    max_params: float = within("[0, inf]", 30e6)
    max_gmacs: float = within("[0, inf]", 5.0)
    enforce: bool = False


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


@dataclass
class ExportConfig:
    path: str = ""  # "" -> runs/<name>/<name>.pt2; the other formats take its stem
    # onnx and zip: the Phase II files (one model, no TTA); pt2: the whole in-process model (torch.export)
    formats: list = one_of_each(("onnx", "zip", "pt2"), lambda: ["onnx", "zip", "pt2"])
    channel_order: str = one_of(
        ("rgb", "bgr"), "rgb"
    )  # of the images the Phase II files are fed (the organizers feed bgr)


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


@dataclass
class Phase2Config:
    """The Phase-II-like score of ``evaluate eval.file=FILE``: ``draws`` white-box attacks on the file."""

    draws: int = within("[0, 1000]", 0)  # k attacks, each with settings drawn from `attack`; 0 -> off
    seed: int = within("[0, 4294967295]", 0)
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


@dataclass
class RulesConfig:
    # The CVPR 2022 challenge's rules a phase config turns on (README, "The challenge's rules"
    # cites each source); strict=false lets a team override them after checking the current rules.
    strict: bool = True
    one_model: bool = False  # no model fusion: submit.checkpoints lists at most one model
    no_pretrained: bool = False  # no pretrained weights: model.pretrained and model.pretrained_file refused


@dataclass
class Config:
    name: str = "cvpr22"
    out_dir: str = "runs"
    seed: int = within("[0, 4294967295]", 42)
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
    rules: RulesConfig = field(default_factory=RulesConfig)

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


def all_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (or one of its sections), in field order."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def sections(cfg: Config) -> list[str]:
    """The names of the config's sections (``data``, ``train``, ...)."""
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def new_config() -> Config:
    """The dataclass defaults."""
    return Config()
