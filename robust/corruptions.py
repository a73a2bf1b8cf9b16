"""ImageNet-C on the evaluated images: every (corruption, severity) cell corrupted once, scored by every model.

The images of one cell are made by :func:`core.imagenet_c.corrupt` at the model's input size
from the uint8 test images, each under its own seed (:func:`core.imagenet_c.corruption_seed`
of the image's key, the corruption, the severity and ``eval.seed``), in DataLoader workers
(``data.num_workers``; the cells spread over the processes of a multi-process launch): the
pixels do not depend on the batch size, the order or the number of processes. One cell's
images are scored by each model of the report (the defended model and, with
``eval.corruption_baseline``, the baseline for mCE) and then dropped, so memory holds one cell
at a time.

Summary figures follow the field: RobustBench's ImageNet-C accuracy is the plain mean over the
75 common cells; mCE (Hendrycks & Dietterich 2019) divides each corruption's summed error over
the severities by the baseline's and averages over the corruptions; relative mCE does the same
with the errors minus each model's clean error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from core.config import Config
from core.corruptions import COMMON, GROUPS
from core.devices import cuda_available, local_processes, resolve_num_workers
from core.imagenet_c import corrupt, corruption_seed
from gcm import DefendedModel
from robust.runner import score

Cell = tuple[str, int]  # (corruption, severity)


def corruption_cells(names: Sequence[str], severities: Sequence[int]) -> list[Cell]:
    """The cells to run, in ImageNet-C's table order (``eval.corruptions`` x ``eval.corruption_severities``)."""
    order = {name: i for i, name in enumerate(n for g in GROUPS.values() for n in g)}
    return [(n, int(s)) for n in sorted(set(names), key=order.__getitem__) for s in sorted(set(severities))]


class CorruptedImages(Dataset):
    """Item ``c * n + i``: image ``i`` through cell ``c``, as a uint8 CHW tensor.

    Args:
        images: The uint8 images (N x 3 x H x W) at the model's input size.
        keys: One key per image (what identifies it: its seed does not depend on its position).
        cells: The (corruption, severity) cells.
        seed: ``eval.seed``.
    """

    def __init__(self, images: torch.Tensor, keys: Sequence[str], cells: Sequence[Cell], seed: int) -> None:
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys for {len(images)} images")
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.keys = list(keys)
        self.cells = list(cells)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.cells) * len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        (name, severity), i = self.cells[index // len(self.keys)], index % len(self.keys)
        out = corrupt(self.images[i], name, severity, corruption_seed(self.keys[i], name, severity, self.seed))
        return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def iterate_cells(images: torch.Tensor, keys: Sequence[str], cells: Sequence[Cell], seed: int, workers: int):
    """Yield ``(cell, corrupted uint8 images)`` for each cell, computed by ``workers`` loader processes."""
    n = len(keys)
    if n == 0:
        return
    loader = DataLoader(
        CorruptedImages(images, keys, cells, seed), batch_size=n, shuffle=False, num_workers=workers
    )  # one batch = one cell; in order whatever the workers
    for cell, batch in zip(cells, loader):
        yield cell, batch


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] holding k/255 values (as evaluate loads them) back to exact uint8."""
    return x.mul(255).round().clamp(0, 255).to(torch.uint8)


def run_corruptions(
    models: Mapping[str, DefendedModel],
    x: torch.Tensor,
    y: torch.Tensor,
    keys: Sequence[str],
    cfg: Config,
    progress: bool = False,
) -> dict[str, dict[Cell, torch.Tensor]]:
    """Per-image correctness of every model on every cell: ``{model key: {cell: correctness}}``."""
    e = cfg.eval
    cells = corruption_cells(e.corruptions, e.corruption_severities)
    workers = resolve_num_workers(cfg.data.num_workers, cuda_available(), local_processes())

    def measure(mine: Sequence[Cell]) -> dict[str, dict[Cell, torch.Tensor]]:
        out: dict[str, dict[Cell, torch.Tensor]] = {k: {} for k in models}
        stream = iterate_cells(_to_uint8(x), keys, mine, e.seed, workers)
        for cell, images in tqdm(stream, total=len(mine), desc="corruptions", disable=not progress, leave=False):
            floats = images.float().div_(255.0)
            for key, model in models.items():
                out[key][cell] = score(model, floats, y, cfg, spread=False)
        return out

    return spread_cells(measure, cells)


def spread_cells(measure, cells: Sequence[Cell]) -> dict[str, dict[Cell, torch.Tensor]]:
    """``measure(cells)`` with the cells spread over the processes of a multi-process launch (each
    corrupts and scores its share; every process receives every result)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return measure(cells)
    merged: dict[str, dict[Cell, torch.Tensor]] = {}
    for part in gather_object([measure(cells[state.process_index :: state.num_processes])]):
        for key, by_cell in part.items():
            merged.setdefault(key, {}).update(by_cell)
    return {key: {cell: by_cell[cell] for cell in cells} for key, by_cell in merged.items()}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class CorruptionSummary:
    """One model's corruption figures (accuracy in %); ``None`` where no cell of it was run."""

    cells: dict[str, dict[int, float]]  # corruption -> severity -> accuracy
    clean: float
    imagenet_c: float | None  # mean over the common cells run (RobustBench's figure when all 75 ran)
    complete: bool  # all 75 common cells ran
    groups: dict[str, float | None] = field(default_factory=dict)  # noise, blur, weather, digital, held_out
    worst: tuple[str, float] | None = None  # the common corruption with the lowest mean over its severities
    worst_group: tuple[str, float] | None = None  # of the four common groups
    mce: float | None = None  # vs eval.corruption_baseline, in % (100 = as the baseline)
    relative_mce: float | None = None


def summarize(correct: Mapping[Cell, torch.Tensor], clean: torch.Tensor) -> CorruptionSummary:
    """Per-cell accuracies, the ImageNet-C mean, group means, the held-out mean and the worst corruption."""
    cells: dict[str, dict[int, float]] = {}
    for (name, severity), c in correct.items():
        cells.setdefault(name, {})[severity] = 100.0 * float(c.double().mean())
    common = [acc for name in COMMON for acc in cells.get(name, {}).values()]
    groups = {g: _mean([acc for name in names for acc in cells.get(name, {}).values()]) for g, names in GROUPS.items()}
    means = {name: sum(v.values()) / len(v) for name, v in cells.items()}
    # the worst of the common corruptions (the held-out four have their own mean), of any when none ran
    ranked = {k: v for k, v in means.items() if k in COMMON} or means
    worst = min(ranked.items(), key=lambda kv: kv[1]) if ranked else None
    four = {g: v for g, v in groups.items() if g != "held_out" and v is not None}
    return CorruptionSummary(
        cells=cells,
        clean=100.0 * float(clean.double().mean()),
        imagenet_c=_mean(common),
        complete=len(common) == len(COMMON) * 5,
        groups=groups,
        worst=worst,
        worst_group=min(four.items(), key=lambda kv: kv[1]) if four else None,
    )


def add_mce(model: CorruptionSummary, baseline: CorruptionSummary) -> None:
    """mCE and relative mCE of ``model`` against ``baseline`` (same images), over the common corruptions.

    A corruption on which the baseline makes no error (or, for relative mCE, degrades by
    nothing) cannot be normalised: it is left out, and the figure is ``None`` if none is left.
    """
    ce, rel = [], []
    for name in COMMON:
        if name not in model.cells or name not in baseline.cells:
            continue
        severities = model.cells[name].keys() & baseline.cells[name].keys()
        err = sum(100.0 - model.cells[name][s] for s in severities)
        base = sum(100.0 - baseline.cells[name][s] for s in severities)
        if base > 0:
            ce.append(100.0 * err / base)
        err_rel = err - len(severities) * (100.0 - model.clean)
        base_rel = base - len(severities) * (100.0 - baseline.clean)
        if base_rel > 0:
            rel.append(100.0 * err_rel / base_rel)
    model.mce, model.relative_mce = _mean(ce), _mean(rel)


# Which albumentations transforms (``aug.corruptions`` / ``aug.extra`` names, ColorJitter for
# ``aug.color_jitter``) imitate which ImageNet-C corruption: a figure measured on these cells is
# partly inside the model's training distribution.
TRAINING_COUNTERPARTS = {
    "gaussian_noise": ("GaussNoise", "ISONoise"),
    "shot_noise": ("ISONoise", "ShotNoise"),
    "impulse_noise": ("SaltAndPepper",),
    "defocus_blur": ("Defocus", "GaussianBlur"),
    "glass_blur": ("GlassBlur",),
    "motion_blur": ("MotionBlur",),
    "zoom_blur": ("ZoomBlur",),
    "snow": ("RandomSnow",),
    "frost": (),
    "fog": ("PlasmaBrightnessContrast", "RandomFog"),
    "brightness": ("RandomBrightnessContrast", "ColorJitter", "PlasmaBrightnessContrast"),
    "contrast": ("RandomBrightnessContrast", "ColorJitter", "PlasmaBrightnessContrast"),
    "elastic_transform": ("ElasticTransform",),
    "pixelate": ("Downscale", "Pixelization"),
    "jpeg_compression": ("ImageCompression",),
    "speckle_noise": ("GaussNoise", "MultiplicativeNoise"),
    "gaussian_blur": ("GaussianBlur", "Blur"),
    "spatter": ("RandomRain", "Spatter"),
    "saturate": ("ColorJitter", "HueSaturationValue"),
}


def training_counterparts(train_cfg: Mapping) -> dict[str, list[str]]:
    """ImageNet-C corruption -> the training augmentations of a saved config that imitate it.

    ``train_cfg`` is a checkpoint's saved config (``best.json``'s ``config``).
    """
    aug = train_cfg.get("aug", {})
    used = [s.get("name") for s in [*aug.get("corruptions", []), *aug.get("extra", [])] if isinstance(s, Mapping)]
    if aug.get("corruption_p", 1.0) <= 0:
        used = [s.get("name") for s in aug.get("extra", []) if isinstance(s, Mapping)]
    if aug.get("color_jitter", 0.0) > 0:
        used.append("ColorJitter")
    found = {c: [n for n in names if n in used] for c, names in TRAINING_COUNTERPARTS.items()}
    return {c: names for c, names in found.items() if names}
