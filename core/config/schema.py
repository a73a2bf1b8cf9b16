"""The config's schema: each section a dataclass, each field with its default and, beside it, its
allowed values (:func:`one_of`, :func:`one_of_each`), its range (:func:`within`: every number has
one) or its list's item type (:func:`list_of`: every list has one). The defaults describe a real run
(ConvNeXt-tiny at 224 px); a YAML file lists only what differs (:mod:`core.config.load`), and
:mod:`core.config.checks` checks what one field cannot say.

Here: the root config and the sections every stage reads (data, aug, model, train, wandb). A stage
owns its other sections in its own ``config`` module and adds them with :func:`register_section`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from core.corruptions import ALL_CORRUPTIONS, HELD_OUT
from core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


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
    # aug.views=2: weight of the Jensen-Shannon divergence between the predictions on the two views,
    # on their adversarial examples under pgd / fgsm_rs (DAJAT, Addepalli et al. 2022); 0: cross-entropy only
    consistency: float = within("[0, 1000]", 0.0)


@dataclass
class DistillConfig:
    """Distillation of an ensemble into the configured model (``train.distill``): the teachers'
    averaged soft labels on clean and attacked inputs, RSLAD's loss (Zi et al. 2021; train/distill.py)."""

    teachers: list = list_of(str)  # exported models (runs/X/best), frozen; [] -> off
    weight: float = within("[0, 1]", 1.0)  # share of the distillation loss; the label loss gets the rest
    temperature: float = within("(0, 1e6]", 1.0)  # softens teachers and student alike (RSLAD: 1)


@dataclass
class SelectScoreConfig:
    """``train.select=score``: the Phase-II-like score on a fixed, seeded part of the validation split
    after every epoch (train/selection.py): clean, held-out corruptions and ``phase2.attack`` draws."""

    images: int = within("[1, 1e12]", 100)  # validation images (seeded choice, the same every epoch)
    corruptions: list = one_of_each(ALL_CORRUPTIONS, lambda: list(HELD_OUT))  # ImageNet-C's held-out four
    severities: list = within("[1, 5]", [3])
    draws: int = within("[0, 1000]", 2)  # white-box attacks drawn from phase2.attack at phase2.seed
    # the score's mix: shares of clean, corrupted and attacked accuracy (normalised to sum 1)
    weights: list = within("[0, 1e6]", [1.0, 1.0, 1.0], item=float)


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
    # which validation figure picks `best`: auto (robust under adversarial training, else clean) |
    # clean | robust | score (the Phase-II-like score of train.score)
    select: str = one_of(("auto", "clean", "robust", "score"), "auto")
    score: SelectScoreConfig = field(default_factory=SelectScoreConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
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
class Config:
    """The root config: what every stage reads. A stage adds the sections it owns
    (:func:`register_section`); :func:`new_config` gives the root with every stage's sections."""

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

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


class Section(NamedTuple):
    """A section a stage adds to the config: its dataclass and the check of what one field cannot say."""

    schema: type
    check: Callable[[Any], None] | None


_SECTIONS: dict[str, Section] = {}


def register_section(name: str, schema: type, check: Callable[[Any], None] | None = None) -> None:
    """Add section ``name`` (a dataclass of fields as above) to every config, and ``check(cfg)`` to
    every load (after the root's checks): how a stage owns its settings
    while one config file and one command line still serve every stage."""
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"config section {name!r} is the root config's own")
    _SECTIONS[name] = Section(schema, check)
    _composed.cache_clear()


def discover_sections() -> None:
    """Import each top-level package's ``config`` module (``<package>/config.py``): each registers the
    sections of its stage, so every config file and override loads the same in every stage."""
    for path in sorted(ROOT.glob("*/config.py")):
        importlib.import_module(f"{path.parent.name}.config")


def _ordered() -> list[tuple[str, Section]]:
    # by owning module, then as registered: the same order whichever stage imported its module first
    return sorted(_SECTIONS.items(), key=lambda item: item[1].schema.__module__)


def section_checks() -> list[Callable[[Any], None]]:
    """The registered sections' checks, in the order of :func:`new_config`'s fields."""
    return [s.check for _, s in _ordered() if s.check is not None]


@functools.cache
def _composed() -> type:
    fields = [(name, s.schema, field(default_factory=s.schema)) for name, s in _ordered()]
    composed = dataclasses.make_dataclass("Config", fields, bases=(Config,))
    composed.__module__ = __name__
    return composed


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
    """The dataclass defaults of the root and of every stage's sections."""
    discover_sections()
    return _composed()()
