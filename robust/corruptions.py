"""Common corruptions at ImageNet-C's five severities, for the corruption rows of ``evaluate``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import albumentations as A
import numpy as np
import torch

from core.images import to_float_images


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
    Corruption(
        "gaussian_noise",
        "std (pixels in [0, 1])",
        (0.08, 0.12, 0.18, 0.26, 0.38),
        lambda v, size: A.GaussNoise(std_range=(v, v), p=1.0),
    ),
    Corruption(
        "gaussian_blur",
        "sigma at 224 px",
        (1.0, 2.0, 3.0, 4.0, 6.0),
        lambda v, size: A.GaussianBlur(sigma_limit=(v * size / 224,) * 2, blur_limit=0, p=1.0),
    ),
    Corruption(
        "jpeg",
        "quality",
        (25, 18, 15, 10, 7),
        lambda v, size: A.ImageCompression(quality_range=(int(v), int(v)), p=1.0),
    ),
    Corruption(
        "brightness",
        "+ level x 255",
        (0.1, 0.2, 0.3, 0.4, 0.5),
        lambda v, size: A.RandomBrightnessContrast(brightness_limit=(v, v), contrast_limit=(0.0, 0.0), p=1.0),
    ),
)


def corrupt(x: torch.Tensor, corruption: Corruption, severity: int, seed: int) -> torch.Tensor:
    """``x`` (float in [0, 1], exactly k/255 values) through one corruption at ``severity``."""
    transform = corruption.make(corruption.levels[severity - 1], x.shape[-1])
    transform.set_random_seed(seed)
    raw = x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.stack([transform(image=img)["image"] for img in raw])
    return to_float_images(torch.from_numpy(out).permute(0, 3, 1, 2))
