"""Augmentations made on the training device, a whole batch at a time: AugMix, PRIME and Fourier-basis noise.

The loader's augmentations (albumentations, and AugMix unless it runs here) run per image on the
CPU; these run as tensor ops on the batch, on the device the model trains on, between the loader and
the attack:

* ``aug.augmix`` with ``aug.augmix.device`` on (``auto``: with CUDA): timm's AugMix per image, on
  the batch (:mod:`train.device_augmix`).

* ``aug.prime`` (Modas et al. 2022, "PRIME: a few primitives can boost robustness to common
  corruptions"): chains of random *max-entropy* transforms mixed as AugMix mixes its chains
  (Dirichlet(1) weights over ``width`` chains of 1..3 primitives, then a uniform weight against the
  image). The primitives, each drawn per image:

  - ``color``: a random smooth tone curve per channel, ``v + sum_k c_k sin(pi k v)``, ``c_k ~
    N(0, T)`` for the first ``K`` frequencies (``K`` up to ``color_modes``, ``T`` up to
    ``color_strength``), evaluated on a 1024-level table;
  - ``filter``: a random convolution kernel ``delta + sigma * N(0, 1)`` per image (``sigma`` up to
    ``filter_strength``, ``filter_size`` square), with replicated borders;
  - ``deform``: a smooth random displacement field (Petrini et al. 2021, the paper's
    diffeomorphisms): sine modes ``sin(pi i x) sin(pi j y)`` up to a cut-off (2..``deform_modes``)
    with N(0, 1/(i^2 + j^2)) weights, at a temperature between half a pixel of typical
    displacement and ``deform_strength`` times the largest one without fold-overs;
  - ``haze`` (ours, for ImageNet-C's low-frequency cells): the image pulled towards its mean colour
    (contrast factor from ``haze_contrast`` to 1) plus a smooth grey field of cosine modes up to
    ``haze_modes`` and peak amplitude up to ``haze_strength``, as fog and contrast do.

* ``aug.fourier`` (AFA, Vaish et al. 2024, "Fourier-basis functions to bridge augmentation gap"):
  one planar wave ``a sin(2 pi f (x cos t + y sin t) + phase)`` per colour channel, frequency ``f``
  up to ``max_freq`` cycles per pixel, any direction and phase, peak amplitude ``a =
  strength_min + Exponential(strength_mean)``.

Every result is clamped to [0, 1]. Draws come from a generator seeded by (seed, epoch, batch,
process), not from torch's global one: a batch's augmentations do not depend on what ran before,
so a run resumed mid-epoch makes the same ones, and the attacks' random starts stay where they were.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.config import AugConfig, FourierConfig, PrimeConfig
from train.device_augmix import augmix, draw_augmix
from train.loaders import sample_seed

COLOR_LEVELS = 1024  # entries of the tone-curve table (20 per period of the highest default mode)
MAX_DEPTH = 3  # primitives per chain when aug.prime.depth = -1 (1..3, as AugMix and PRIME)


class BatchAugment:
    """The device augmentations of one run: ``views`` makes the images a batch trains on."""

    def __init__(
        self,
        aug: AugConfig,
        seed: int,
        rank: int = 0,
        world: int = 1,
        augmix_on_device: bool = False,
        image_size: int = 224,
    ) -> None:
        self.augmix = aug.augmix if aug.augmix.enabled and augmix_on_device else None
        self.jsd = self.augmix is not None and aug.augmix.jsd_weight > 0
        self.image_size = image_size
        self.prime = aug.prime if aug.prime.enabled else None
        self.fourier = aug.fourier if aug.fourier.enabled else None
        self.pair = aug.views == 2
        self.seed, self.rank, self.world = seed, rank, world

    def generator(self, device: torch.device, epoch: int, batch: int) -> torch.Generator:
        """The generator of batch ``batch`` of ``epoch`` on this process (the same after a resume)."""
        seed = sample_seed(self.seed, epoch, batch * self.world + self.rank)
        return torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """PRIME, then Fourier-basis noise (each on its ``p`` share of the images) of a float batch in [0, 1]."""
        out = x.float()
        if self.prime is not None:
            out = on_share(out, self.prime.p, generator, lambda v: prime_mix(v, generator, self.prime))
        if self.fourier is not None:
            out = on_share(out, self.fourier.p, generator, lambda v: fourier_noise(v, generator, self.fourier))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out.to(x.dtype)

    def augmix_generator(self, epoch: int, batch: int) -> torch.Generator:
        """The CPU generator of AugMix's draws for batch ``batch`` of ``epoch`` on this process."""
        seed = sample_seed(self.seed + 1, epoch, batch * self.world + self.rank)  # not PRIME's stream
        return torch.Generator().manual_seed(seed)

    def apply_augmix(self, x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """AugMix of a float batch: one view per image, or with the JSD loss N x 3 x C x H x W (clean, two views)."""
        assert self.augmix is not None
        views = 2 if self.jsd else 1
        generator = self.augmix_generator(epoch, batch)
        mixed = [
            keep_layout(augmix(x, draw_augmix(x.shape[0], self.augmix, generator), self.augmix, self.image_size), x)
        ]
        mixed += [
            keep_layout(augmix(x, draw_augmix(x.shape[0], self.augmix, generator), self.augmix, self.image_size), x)
            for _ in range(views - 1)
        ]
        return torch.stack([x, *mixed], 1) if self.jsd else mixed[0]

    def views(self, x: torch.Tensor, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(augmented, None)``, or with ``aug.views=2`` ``(x, augmented)``: what the step trains on.

        AugMix (when it runs here) comes first, as in the loader: ``x`` is then its AugMix image."""
        if self.augmix is not None:
            x = self.apply_augmix(x, epoch, batch)
        if self.prime is None and self.fourier is None:
            return x, None
        augmented = self.augment(x, self.generator(x.device, epoch, batch))
        return (x, augmented) if self.pair else (augmented, None)


def keep_layout(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` in ``like``'s memory format (a channels_last batch stays channels_last)."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def create_batch_augment(
    aug: AugConfig, seed: int, rank: int = 0, world: int = 1, augmix_on_device: bool = False, image_size: int = 224
) -> BatchAugment | None:
    """The run's device augmentations, or None when none runs here (``aug.prime``, ``aug.fourier`` off
    and AugMix off or in the loader)."""
    if not (aug.prime.enabled or aug.fourier.enabled or (aug.augmix.enabled and augmix_on_device)):
        return None
    return BatchAugment(aug, seed, rank, world, augmix_on_device, image_size)


def on_share(x: torch.Tensor, p: float, generator: torch.Generator, fn) -> torch.Tensor:
    """``fn`` applied to a random ``p`` share of the images (each drawn independently), the rest kept."""
    if p >= 1:
        return fn(x)
    chosen = _rand((x.shape[0],), generator, x) < p
    out = x.clone()
    if bool(chosen.any()):
        out[chosen] = fn(x[chosen])
    return out


def _rand(shape: tuple, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)


def _randn(shape: tuple, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32)


def _randint(low: int, high: int, shape: tuple, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Integers in [low, high] (both included)."""
    return torch.randint(low, high + 1, shape, generator=generator, device=like.device)


# ---------------------------------------------------------------- PRIME


def prime_mix(x: torch.Tensor, generator: torch.Generator, cfg: PrimeConfig) -> torch.Tensor:
    """``width`` chains of random primitives per image, mixed (Dirichlet(1)), then mixed with the image."""
    n = x.shape[0]
    ops = [PRIMITIVES[name] for name in cfg.primitives]
    # Dirichlet(1, ..., 1) = normalised Exponential(1) draws; Beta(1, 1) = uniform
    weights = -torch.log1p(-_rand((n, cfg.width), generator, x))
    weights = weights / weights.sum(1, keepdim=True)
    mixed = torch.zeros_like(x)
    for chain in range(cfg.width):
        depth = (
            _randint(1, MAX_DEPTH, (n,), generator, x)
            if cfg.depth < 0
            else torch.full((n,), cfg.depth, device=x.device)
        )
        y = x
        for step in range(int(depth.max())):
            pick = _randint(0, len(ops) - 1, (n,), generator, x)
            y = y.clone()
            for k, op in enumerate(ops):
                chosen = (pick == k) & (depth > step)
                if bool(chosen.any()):
                    y[chosen] = op(y[chosen], generator, cfg)
        mixed += weights[:, chain].view(n, 1, 1, 1) * y
    m = _rand((n, 1, 1, 1), generator, x)
    return (1 - m) * x + m * mixed


def random_tone_curves(x: torch.Tensor, generator: torch.Generator, cfg: PrimeConfig) -> torch.Tensor:
    """PRIME's colour primitive: ``v + sum_{k<=K} c_k sin(pi k v)`` per image and channel."""
    n, c = x.shape[:2]
    k = torch.arange(1, cfg.color_modes + 1, device=x.device, dtype=torch.float32)
    cut = _randint(1, cfg.color_modes, (n, 1, 1), generator, x)
    temperature = _rand((n, 1, 1), generator, x) * cfg.color_strength
    coeff = _randn((n, c, cfg.color_modes), generator, x) * temperature.sqrt() * (k <= cut)
    levels = torch.linspace(0, 1, COLOR_LEVELS, device=x.device)
    curves = (levels + coeff @ torch.sin(math.pi * k[:, None] * levels[None, :])).clamp(0, 1)  # n, c, levels
    return apply_curves(x, curves)


def apply_curves(x: torch.Tensor, curves: torch.Tensor) -> torch.Tensor:
    """Each channel's pixels through its curve (n x c x L table on [0, 1]), linearly interpolated."""
    n, c, h, w = x.shape
    levels = curves.shape[-1]
    pos = x.clamp(0, 1).reshape(n, c, h * w) * (levels - 1)
    low = pos.floor().clamp(max=levels - 2)
    frac = pos - low
    low = low.long()
    out = curves.gather(2, low) * (1 - frac) + curves.gather(2, low + 1) * frac
    return out.reshape(n, c, h, w)


def random_filters(x: torch.Tensor, generator: torch.Generator, cfg: PrimeConfig) -> torch.Tensor:
    """PRIME's spectral primitive: the image convolved with ``delta + sigma N(0, 1)``, one kernel per image."""
    n, c, h, w = x.shape
    size = cfg.filter_size
    sigma = _rand((n, 1, 1), generator, x) * cfg.filter_strength
    kernel = _randn((n, size, size), generator, x) * sigma
    kernel[:, size // 2, size // 2] += 1
    pad = size // 2
    flat = x.reshape(1, n * c, h, w)
    padded = F.pad(flat, (pad, pad, pad, pad), mode="replicate") if pad else flat
    out = F.conv2d(padded, kernel.repeat_interleave(c, 0).unsqueeze(1), groups=n * c)
    return out.reshape(n, c, h, w).clamp(0, 1)


def smooth_fields(
    n: int, modes: int, cut: torch.Tensor, h: int, w: int, generator: torch.Generator, like: torch.Tensor, cosine: bool
) -> torch.Tensor:
    """n random smooth fields (n x h x w): modes (i, j) up to radius ``cut`` (per field), N(0, 1/(i^2+j^2)) weights.

    Sine modes ``sin(pi i u) sin(pi j v)`` vanish at the border (a displacement that keeps it);
    cosine ones (``cosine``, from i, j = 0 but not both) do not (a haze).
    """
    first = 0 if cosine else 1
    k = torch.arange(first, modes + 1, device=like.device, dtype=torch.float32)
    radius = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    keep = (radius < cut.view(n, 1, 1) + 0.5) & (radius > 0)
    weights = _randn((n, len(k), len(k)), generator, like) * keep / radius.clamp(min=1)
    wave = torch.cos if cosine else torch.sin
    rows = wave(math.pi * torch.linspace(0, 1, h, device=like.device)[:, None] * k)  # h x modes
    cols = wave(math.pi * torch.linspace(0, 1, w, device=like.device)[:, None] * k)  # w x modes
    return rows @ weights @ cols.T  # n x h x w


def random_deformations(x: torch.Tensor, generator: torch.Generator, cfg: PrimeConfig) -> torch.Tensor:
    """PRIME's spatial primitive: a smooth random displacement field per image (bilinear, border kept).

    With cut-off ``c`` and side ``s`` the temperature is drawn in [T1, max(T1, strength * T2)],
    ``T1 = 1 / (pi s^2 log c)`` (typical displacement of half a pixel) and ``T2 = 4 / (pi^3 c^2 log c)``
    (the largest without fold-overs); displacements are ``sqrt(T) * field * s`` pixels.
    """
    n, _, h, w = x.shape
    side = max(h, w)
    cut = _randint(2, cfg.deform_modes, (n,), generator, x).float()
    log = torch.log(cut)
    t1 = 1 / (math.pi * side**2 * log)
    t2 = torch.maximum(t1, cfg.deform_strength * 4 / (math.pi**3 * cut**2 * log))
    temperature = t1 + _rand((n,), generator, x) * (t2 - t1)
    scale = (temperature.sqrt() * side).view(n, 1, 1)
    dx = smooth_fields(n, cfg.deform_modes, cut, h, w, generator, x, cosine=False) * scale
    dy = smooth_fields(n, cfg.deform_modes, cut, h, w, generator, x, cosine=False) * scale
    ys = torch.linspace(-1, 1, h, device=x.device).view(1, h, 1)
    xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, w)
    grid = torch.stack([xs - dx * 2 / max(w - 1, 1), ys - dy * 2 / max(h - 1, 1)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)


def random_haze(x: torch.Tensor, generator: torch.Generator, cfg: PrimeConfig) -> torch.Tensor:
    """Lower contrast towards the image's mean colour plus a smooth grey field: fog's and contrast's make-up."""
    n, _, h, w = x.shape
    cut = _randint(1, cfg.haze_modes, (n,), generator, x).float()
    field = smooth_fields(n, cfg.haze_modes, cut, h, w, generator, x, cosine=True)
    field = field / field.flatten(1).abs().amax(1).clamp(min=1e-6).view(n, 1, 1)
    amplitude = _rand((n, 1, 1, 1), generator, x) * cfg.haze_strength
    contrast = cfg.haze_contrast + _rand((n, 1, 1, 1), generator, x) * (1 - cfg.haze_contrast)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (mean + contrast * (x - mean) + amplitude * field.unsqueeze(1)).clamp(0, 1)


PRIMITIVES = {
    "color": random_tone_curves,
    "filter": random_filters,
    "deform": random_deformations,
    "haze": random_haze,
}


# ---------------------------------------------------------------- Fourier-basis noise


def fourier_noise(x: torch.Tensor, generator: torch.Generator, cfg: FourierConfig) -> torch.Tensor:
    """One random planar wave per image and channel added to it (AFA's Fourier-basis augmentation)."""
    n, c, h, w = x.shape
    freq = (1 - _rand((n, c, 1, 1), generator, x)) * cfg.max_freq  # (0, max_freq] cycles per pixel
    angle = _rand((n, c, 1, 1), generator, x) * math.pi  # with every phase: every direction
    phase = _rand((n, c, 1, 1), generator, x) * 2 * math.pi
    amplitude = cfg.strength_min - cfg.strength_mean * torch.log1p(-_rand((n, c, 1, 1), generator, x))
    ys = (torch.arange(h, device=x.device, dtype=torch.float32) - (h - 1) / 2).view(1, 1, h, 1)
    xs = (torch.arange(w, device=x.device, dtype=torch.float32) - (w - 1) / 2).view(1, 1, 1, w)
    wave = torch.sin(2 * math.pi * freq * (xs * torch.cos(angle) + ys * torch.sin(angle)) + phase)
    return (x + amplitude * wave).clamp(0, 1)
