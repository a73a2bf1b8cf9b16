"""ImageNet-C's common corruptions on one uint8 image, reproducible per image.

The implementation is the maintained fork of the ImageNet-C code, ``imagecorruptions-imaug``
1.1.5 (Apache-2.0, imported as ``imagecorruptions``): Hendrycks & Dietterich's 15 corruptions
in four groups plus the 4 they held out for validation, each at severities 1 to 5.

Seeding: the fork draws from NumPy's global generator (and from explicit ``seed`` arguments in
``glass_blur`` and ``impulse_noise`` only). :func:`corrupt` runs every call under one seed, given
by the caller, for all three sources, and puts NumPy's global state back afterwards. The seed
rule used by ``evaluate`` (and by anything that wants the same images) is
:func:`corruption_seed`: a hash of (image key, corruption, severity, base seed), so an image's
corrupted version does not depend on the batch it sits in, the order of the images or which
process computes it. The global state makes a call unsafe to run in two threads of one process
at once; use processes (DataLoader workers) to parallelise.
"""

from __future__ import annotations

import hashlib

import numpy as np

from core.corruptions import SEVERITIES, group_of

# The fork's functions that take their own seed argument instead of NumPy's global state.
_SEED_ARGUMENT = ("glass_blur", "impulse_noise")
MIN_SIZE = 32  # the fork refuses smaller images


def corruption_seed(key: str | int, name: str, severity: int, seed: int) -> int:
    """The seed of one image's corruption: a 32-bit hash of ``seed:name:severity:key``.

    Args:
        key: What identifies the image (a file name, a path relative to the data root, an id).
        name: The corruption.
        severity: 1 to 5.
        seed: A base seed (``eval.seed``): another value gives another draw of every image.
    """
    digest = hashlib.blake2b(f"{seed}:{name}:{severity}:{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (H x W x 3 uint8, H and W at least 32) through ImageNet-C's ``name`` at ``severity``.

    The same arguments give the same pixels in any process; NumPy's global random state is the
    same after the call as before it.

    Raises:
        ValueError: An unknown corruption, a severity outside 1..5, or an image that is not
            H x W x 3 uint8 of at least 32 x 32 pixels.
    """
    group_of(name)
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be 1..5, got {severity!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < MIN_SIZE:
        raise ValueError(
            f"corrupt needs an H x W x 3 uint8 image of at least {MIN_SIZE} px, got {image.dtype} {image.shape}"
        )
    from imagecorruptions import corrupt as imagenet_c  # numba and scikit-image: imported when first used

    seed = int(seed) % 2**32
    kwargs = {"seed": seed} if name in _SEED_ARGUMENT else {}
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = imagenet_c(image, severity=severity, corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)
    # writable: pixelate and jpeg_compression return a read-only view of a PIL image, which torch.from_numpy
    # warns about (once per loader worker)
    return np.require(out, dtype=np.uint8, requirements=["C", "W"])
