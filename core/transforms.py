"""Albumentations pipelines for training and the evaluation resize.

Both pipelines take and return HxWx3 uint8 images: no normalization here, the model
normalizes (see ``core/model.py``), so defenses and attacks see raw pixels.

albumentations 2.x only *warns* about unknown or renamed (1.x-style) arguments and then
silently ignores them, so a config written for 1.x would quietly train without the intended
augmentation. :func:`create_transform` therefore turns any warning raised while building a
transform into a UserError naming the config entry and the transform.

Seeding: ``A.Compose.set_random_seed(seed)`` gives every child transform its *own* generator
seeded with the *same* seed, so their draws coincide (with hflip p=0.5 and a corruption
OneOf at p=0.3, a corruption would only ever be applied to flipped images). The pipelines
here use :class:`SeededCompose`, whose children share one generator seeded once, so the
draws are independent and still reproducible for a given seed.
"""

from __future__ import annotations

import functools
import random
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

from core.config import AugConfig, AugMixConfig
from core.errors import UserError

if TYPE_CHECKING:
    import albumentations as A
    from timm.data.auto_augment import AugMixAugment

# albumentations and timm are imported on first use, not with this module: they import torch
# (seconds), and every stage imports this module for the eval resize, which needs neither.


@functools.cache
def _seeded_compose_class() -> type:
    import albumentations as A

    class SeededCompose(A.Compose):
        """``A.Compose`` whose children draw from one shared generator (see module docstring)."""

        def set_random_seed(self, seed: int | None) -> None:
            self.seed = seed
            self.set_random_state(np.random.default_rng(seed), random.Random(seed))

    SeededCompose.__qualname__ = "SeededCompose"  # pickle finds it as core.transforms.SeededCompose
    return SeededCompose


@functools.cache
def _resized_crop_class() -> type:
    import albumentations as A
    import torch
    import torch.nn.functional as F
    from albumentations.augmentations.crops import functional as fcrops

    class AntialiasedResizedCrop(A.RandomResizedCrop):
        """``A.RandomResizedCrop`` (its draws) whose shrinking resize is torch's antialiased bilinear.

        albumentations shrinks with OpenCV's INTER_AREA (``area_for_downscale="image"``), whose
        non-integer path cost a 224-px training image about 0.7 ms of a loader worker's CPU, a third
        of the phase recipe's loader time once AugMix left it; torch's uint8 antialiased bilinear
        (the filter timm's PIL resize uses) makes nearly the same pixels (a quarter of a grey level
        apart on average, ``tests/test_transforms.py``) in about a third of the time. Enlarging
        crops keep albumentations' bilinear resize.
        """

        def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
            crop = fcrops.crop(img, *crop_coords)
            height, width = self.size
            shrinks = crop.shape[0] > height or crop.shape[1] > width
            if not (shrinks and crop.dtype == np.uint8 and crop.ndim == 3):
                return super().apply(img, crop_coords, **params)
            chw = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
            out = F.interpolate(chw, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
            return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())

    AntialiasedResizedCrop.__qualname__ = "AntialiasedResizedCrop"  # pickle finds it in core.transforms
    return AntialiasedResizedCrop


def __getattr__(name: str) -> Any:
    if name == "SeededCompose":  # made on first use (see above)
        return _seeded_compose_class()
    if name == "AntialiasedResizedCrop":
        return _resized_crop_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _one_line(exc: BaseException) -> str:
    # pydantic validation errors span several lines plus a documentation link.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
    return "; ".join(lines) or type(exc).__name__


def create_transform(
    spec: Mapping[str, Any], where: str, defaults: Mapping[str, Any] | None = None
) -> A.BasicTransform:
    """Build one albumentations transform from ``{"name": ..., **kwargs}``.

    Args:
        spec: transform name (an ``albumentations`` class) and its keyword arguments.
        where: config location for messages, e.g. ``aug.corruptions[2]``.
        defaults: keyword arguments used unless ``spec`` gives them (e.g. ``p``).

    Raises:
        UserError: unknown name, bad or unknown (1.x-style) arguments, naming ``where``.
    """
    import albumentations as A

    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise UserError(f"config key '{where}': expected a mapping with a 'name' key, got {spec!r}")
    name = spec["name"]
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise UserError(f"config key '{where}': unknown albumentations transform '{name}'")
    kwargs = {**(defaults or {}), **{k: v for k, v in spec.items() if k != "name"}}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"config key '{where}': bad arguments for {name}: {_one_line(exc)}") from None
    if caught:
        raise UserError(
            f"config key '{where}': {name}: {_one_line(caught[0].message)} "
            "(albumentations 2.x argument names are required)"
        )
    return transform


def _check_keeps_image(transform: A.BasicTransform, where: str, name: str, image_size: int) -> None:
    """Apply ``transform`` once to a dummy image: it must keep an (s, s, 3) uint8 image.

    Catches transforms that fail at run time on our images, change the size (the batch would
    not collate) or the dtype (the model expects uint8 to arrive from the loader).
    """
    dummy = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = transform(image=dummy, force_apply=True)["image"]
    except Exception as exc:  # noqa: BLE001 - any failure here is a config problem
        raise UserError(
            f"config key '{where}': {name} fails on a {image_size}x{image_size} RGB image: {_one_line(exc)}"
        ) from None
    if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == dummy.shape):
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
        raise UserError(f"config key '{where}': {name} must keep a {image_size}x{image_size}x3 uint8 image, got {got}")


def _create_list(
    specs: Sequence[Any], key: str, image_size: int, defaults: Mapping[str, Any] | None = None
) -> list[A.BasicTransform]:
    if not isinstance(specs, (list, tuple)):
        raise UserError(f"config key '{key}': expected a list of transforms, got {specs!r}")
    transforms = []
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        transform = create_transform(spec, where, defaults)
        _check_keeps_image(transform, where, spec["name"], image_size)
        transforms.append(transform)
    return transforms


def _pair(values: Sequence[float], key: str) -> tuple[float, float]:
    if len(values) != 2:
        raise UserError(f"config key '{key}': expected [min, max], got {list(values)}")
    low, high = float(values[0]), float(values[1])
    if not 0 < low <= high:
        raise UserError(f"config key '{key}': expected 0 < min <= max, got {list(values)}")
    return low, high


def create_train_transform(cfg: AugConfig, image_size: int, augmix_on_device: bool = False) -> A.Compose | AugMixViews:
    """RandomResizedCrop -> HorizontalFlip -> ColorJitter (optional) -> one corruption -> extras -> AugMix.

    * The crop: :class:`AntialiasedResizedCrop` (albumentations' draws, a cheaper shrinking resize).

    * ``color_jitter`` s > 0: brightness, contrast and saturation by factors in [1-s, 1+s]
      (no hue shift, as timm), applied with probability 0.8.
    * ``corruptions``: with probability ``corruption_p`` one of them is applied, chosen with
      weights given by each entry's ``p`` (default 1, i.e. uniformly).
    * ``extra``: applied in order, each with its own ``p`` (the transform's default if unset).
    * ``augmix`` (when enabled): :class:`AugMixViews` on the pipeline's output, unless
      ``augmix_on_device`` (:func:`resolve_augmix_device`): the training step makes it then
      (``train/device_augmix.py``), and the loader ships the pipeline's output.
    """
    import albumentations as A

    scale = _pair(cfg.scale, "aug.scale")
    if scale[1] > 1:
        raise UserError(f"config key 'aug.scale': the crop area fraction cannot exceed 1, got {list(cfg.scale)}")
    ratio = _pair(cfg.ratio, "aug.ratio")
    if not 0 <= cfg.hflip <= 1 or not 0 <= cfg.corruption_p <= 1:
        raise UserError("config keys 'aug.hflip'/'aug.corruption_p' are probabilities in [0, 1]")
    if cfg.color_jitter < 0:
        raise UserError(f"config key 'aug.color_jitter' must be >= 0, got {cfg.color_jitter}")
    transforms: list[A.BasicTransform | A.BaseCompose] = [
        _resized_crop_class()(size=(image_size, image_size), scale=scale, ratio=ratio, area_for_downscale="image"),
        A.HorizontalFlip(p=cfg.hflip),
    ]
    if cfg.color_jitter > 0:
        s = float(cfg.color_jitter)
        transforms.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=0.0, p=0.8))
    corruptions = _create_list(cfg.corruptions, "aug.corruptions", image_size, defaults={"p": 1.0})
    if corruptions and cfg.corruption_p > 0:
        transforms.append(A.OneOf(corruptions, p=cfg.corruption_p))
    transforms += _create_list(cfg.extra, "aug.extra", image_size)
    pipeline = _seeded_compose_class()(transforms)
    if cfg.augmix.enabled:
        mix = create_augmix(cfg.augmix, image_size)  # its values are checked wherever AugMix runs
        if not augmix_on_device:
            return AugMixViews(pipeline, mix, clean=cfg.augmix.jsd_weight > 0)
    return pipeline


def create_augmix(cfg: AugMixConfig, image_size: int) -> AugMixAugment:
    """timm's AugMix over ``cfg.ops``, with the op parameters timm's own training uses for AugMix.

    Raises:
        UserError: a value out of range or an op timm does not know, naming the key.
    """
    from timm.data.auto_augment import NAME_TO_OP, AugMixAugment, augmix_ops

    unknown = [op for op in cfg.ops if op not in NAME_TO_OP]
    if unknown or not cfg.ops:
        what = f"{unknown[0]!r} is not a timm AugMix op" if unknown else "needs at least one timm AugMix op"
        raise UserError(f"config key 'aug.augmix.ops': {what} (ops: {', '.join(NAME_TO_OP)})")
    if not 1 <= cfg.severity <= 10 or cfg.width < 1 or cfg.depth == 0 or cfg.depth < -1 or cfg.alpha <= 0:
        raise UserError(
            "config keys 'aug.augmix.severity' (1..10), 'width' (>= 1), 'depth' (-1 or >= 1), 'alpha' (> 0): "
            f"out of range in {cfg.severity}, {cfg.width}, {cfg.depth}, {cfg.alpha}"
        )
    if cfg.jsd_weight < 0:
        raise UserError(f"config key 'aug.augmix.jsd_weight' must be >= 0, got {cfg.jsd_weight}")
    ops = augmix_ops(magnitude=cfg.severity, hparams=augmix_hparams(image_size), transforms=list(cfg.ops))
    return AugMixAugment(ops, alpha=cfg.alpha, width=cfg.width, depth=cfg.depth)


AUGMIX_MAX_DEPTH = 3  # ops per chain when aug.augmix.depth=-1: 1..3 (timm's np.random.randint(1, 4))


def augmix_hparams(image_size: int) -> dict:
    """timm's AugMix op parameters as its create_transform sets them for 'augmix-...': translations
    up to 45% (absolute) / 30% (relative) of the image, magnitudes drawn uniformly up to the
    severity, mid-grey fill. Both AugMix paths (here and ``train/device_augmix.py``) use them."""
    return {
        "translate_const": int(image_size * 0.45),
        "translate_pct": 0.3,
        "img_mean": (128, 128, 128),
        "magnitude_std": float("inf"),
    }


def resolve_augmix_device(cfg: AugConfig, on_gpu: bool) -> bool:
    """Whether AugMix runs on the training device (``aug.augmix.device``; ``auto``: with CUDA)."""
    if not cfg.augmix.enabled:
        return False
    if cfg.augmix.device == "auto":
        return on_gpu
    return cfg.augmix.device == "true"


class AugMixViews:
    """The albumentations pipeline, then AugMix: one AugMix image, or (``clean``) the image and two AugMix views.

    With ``clean`` the result is a 3 x H x W x 3 stack (clean, AugMix, AugMix), the layout of
    timm's ``AugMixDataset`` with ``num_splits=3`` for its ``JsdCrossEntropy``; both views start
    from the same pipeline output. timm's AugMix draws from Python's and NumPy's global generators:
    every call runs them under the sample's seed (:meth:`set_random_seed`, called per sample by the
    training loader) and puts their state back, so a sample's views depend on (seed, epoch, index)
    only, whatever process makes them, as the albumentations draws do.
    """

    def __init__(self, pipeline: A.Compose, augmix: AugMixAugment, clean: bool) -> None:
        self.pipeline = pipeline
        self.augmix = augmix
        self.clean = clean
        self.seed: int | None = None

    @property
    def transforms(self) -> list:
        """The albumentations pipeline's transforms (AugMix comes after them)."""
        return self.pipeline.transforms

    def set_random_seed(self, seed: int | None) -> None:
        self.pipeline.set_random_seed(seed)
        self.seed = seed

    def __call__(self, *, image: np.ndarray, **kwargs: Any) -> dict[str, np.ndarray]:
        base = self.pipeline(image=image, **kwargs)["image"]
        views = 2 if self.clean else 1
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            if self.seed is not None:
                np.random.seed(self.seed % 2**32)
                random.seed(self.seed)
            mixed = [np.asarray(self.augmix(Image.fromarray(base)), dtype=np.uint8) for _ in range(views)]
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {"image": np.stack([base, *mixed]) if self.clean else mixed[0]}

    def __repr__(self) -> str:
        return f"AugMixViews({self.pipeline!r}, {self.augmix!r}, clean={self.clean})"


class EvalResize:
    """The evaluation transform: a square resize, called like an albumentations pipeline.

    Computes what ``A.Resize(size, size, interpolation=cv2.INTER_LINEAR,
    area_for_downscale="image")`` computes (area interpolation when either side shrinks, the
    image itself when it already has the size) with one ``cv2.resize`` call: wrapped in
    ``A.Compose`` the same resize costs more bookkeeping per image than decoding a 64 px PNG,
    on the path every ``submit`` and validation image takes.
    ``tests/test_transforms.py`` compares the pixels with albumentations'.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        height, width = image.shape[:2]
        if (height, width) == (self.size, self.size):
            return {"image": image}
        shrink = self.size < height or self.size < width
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        return {"image": cv2.resize(image, (self.size, self.size), interpolation=interpolation)}

    def set_random_seed(self, seed: int | None) -> None:
        """Nothing to seed (deterministic); kept so loaders can treat every pipeline alike."""

    def __repr__(self) -> str:
        return f"EvalResize({self.size})"


def create_eval_transform(image_size: int) -> EvalResize:
    """Resize to ``image_size`` x ``image_size`` (area interpolation when shrinking)."""
    return EvalResize(image_size)
