"""ImageNet-C's corruption names, as every stage names them: Hendrycks & Dietterich's 15 common
corruptions in four groups plus the 4 they held out for validation, each at severities 1 to 5.
The corruptions themselves (one image, reproducible per image) are ``core/imagenet_c.py``.
"""

from __future__ import annotations

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
BLUR = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
WEATHER = ("snow", "frost", "fog", "brightness")
DIGITAL = ("contrast", "elastic_transform", "pixelate", "jpeg_compression")
HELD_OUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # ImageNet-C's validation corruptions

# The four groups of the 15 common corruptions (ImageNet-C's table order), then the held-out four.
GROUPS = {"noise": NOISE, "blur": BLUR, "weather": WEATHER, "digital": DIGITAL, "held_out": HELD_OUT}
COMMON = NOISE + BLUR + WEATHER + DIGITAL
ALL_CORRUPTIONS = COMMON + HELD_OUT
SEVERITIES = (1, 2, 3, 4, 5)


def group_of(name: str) -> str:
    """The group (``noise``, ``blur``, ``weather``, ``digital`` or ``held_out``) of a corruption."""
    for group, names in GROUPS.items():
        if name in names:
            return group
    raise ValueError(f"unknown corruption {name!r} (one of {', '.join(ALL_CORRUPTIONS)})")
