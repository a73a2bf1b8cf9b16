"""Augmentations made on the training device, a whole batch at a time: AugMix, PRIME and Fourier-basis noise.

The loader's augmentations (albumentations, and AugMix unless it runs here) run per image on the
CPU; these run as tensor ops on the batch, on the device the model trains on, between the loader and
the attack:

* ``aug.augmix`` with ``aug.augmix.device`` on (``auto``: with CUDA): timm's AugMix
  (``AugMixAugment``, the ops of ``timm.data.auto_augment``) per image, on the batch. Each image gets
  its own Dirichlet chain weights, Beta mix, chain depths, ops, magnitudes, signs and resampling,
  drawn as timm draws them (:func:`draw_augmix`, on the CPU from a generator seeded by (seed, epoch,
  batch, process)); the ops are PIL's, rewritten as tensor ops on 0..255 values rounded after each
  op. With the JSD loss the batch becomes N x 3 x C x H x W (clean, AugMix, AugMix), timm's
  ``AugMixDataset`` layout. The CPU path (``core/transforms.py``, ``AugMixViews``) stays for
  ``aug.augmix.device=false``; ``tests/test_batch_augment.py`` compares the two paths' draws.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.config import AugConfig, AugMixConfig, FourierConfig, PrimeConfig
from core.transforms import AUGMIX_MAX_DEPTH, augmix_hparams
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


# ---------------------------------------------------------------- AugMix on the device


@dataclass
class AugMixDraws:
    """Every random choice of AugMix for n images, drawn on the CPU (so the device never waits on a
    ``.any()`` or ``nonzero()``), as timm's ``AugMixAugment`` draws them per image:

    ``weights`` Dirichlet(alpha) over the ``width`` chains; ``mix`` Beta(alpha, alpha), the share of
    the mixture against the image; ``depth`` ops per chain (1..3 when ``aug.augmix.depth=-1``);
    ``ops`` each step's op (uniform over ``aug.augmix.ops``); ``level`` its magnitude, uniform in
    [0, severity] (timm's ``magnitude_std=inf``); ``sign`` the random negation of signed ops;
    ``bicubic`` the resampling of geometric ops (bilinear or bicubic, as timm's default);
    ``uniform`` the extra draw of ``GaussianBlurRand``. Shapes: n x width (x steps).
    """

    weights: torch.Tensor
    mix: torch.Tensor
    depth: torch.Tensor
    ops: torch.Tensor
    level: torch.Tensor
    sign: torch.Tensor
    bicubic: torch.Tensor
    uniform: torch.Tensor


def draw_augmix(n: int, cfg: AugMixConfig, generator: torch.Generator) -> AugMixDraws:
    """AugMix's draws for ``n`` images from a CPU ``generator`` (see :class:`AugMixDraws`)."""
    width, steps = cfg.width, max(cfg.depth, AUGMIX_MAX_DEPTH)
    gamma = torch._standard_gamma(torch.full((n, width + 2), float(cfg.alpha)), generator=generator).double()
    weights = (gamma[:, :width] / gamma[:, :width].sum(1, keepdim=True)).float()  # Dirichlet = normalised Gammas
    mix = (gamma[:, width] / (gamma[:, width] + gamma[:, width + 1])).float()  # Beta(a, a) from two Gammas
    if cfg.depth > 0:
        depth = torch.full((n, width), cfg.depth)
    else:
        depth = torch.randint(1, AUGMIX_MAX_DEPTH + 1, (n, width), generator=generator)
    shape = (n, width, steps)
    return AugMixDraws(
        weights=weights,
        mix=mix,
        depth=depth,
        ops=torch.randint(0, len(cfg.ops), shape, generator=generator),
        level=torch.rand(shape, generator=generator) * min(float(cfg.severity), 10.0),
        sign=torch.where(torch.rand(shape, generator=generator) > 0.5, -1.0, 1.0),
        bicubic=torch.rand(shape, generator=generator) < 0.5,
        uniform=torch.rand(shape, generator=generator),
    )


@torch.no_grad()
def augmix(x: torch.Tensor, draws: AugMixDraws, cfg: AugMixConfig, image_size: int) -> torch.Tensor:
    """AugMix of a float batch in [0, 1] (N x 3 x H x W), per image as timm's ``AugMixAugment``.

    Works on the 0..255 scale and rounds after every op, as timm's PIL ops work on uint8 images:
    each chain's ops in turn, the chains summed with their weights (clipped and truncated to uint8,
    as timm), then blended with the image by ``mix``.
    """
    img = (x.float() * 255).round_()
    hparams = augmix_hparams(image_size)
    mixed = torch.zeros_like(img)
    for chain in range(cfg.width):
        y = img.clone()
        for step in range(int(draws.depth[:, chain].max())):
            active = draws.depth[:, chain] > step
            for k, name in enumerate(cfg.ops):
                rows = torch.nonzero(active & (draws.ops[:, chain, step] == k)).flatten()  # on the CPU
                if len(rows):
                    params = OpParams(
                        draws.level[rows, chain, step],
                        draws.sign[rows, chain, step],
                        draws.bicubic[rows, chain, step],
                        draws.uniform[rows, chain, step],
                        hparams,
                    )
                    index = rows.to(x.device, non_blocking=True)
                    y[index] = DEVICE_AUGMIX_OPS[name](y[index], params).clamp_(0, 255).round_()
        mixed += _per_image(draws.weights[:, chain], y) * y
    mixed = mixed.clamp_(0, 255).floor_()
    m = _per_image(draws.mix, img)
    return ((img + m * (mixed - img)).floor_() / 255).to(x.dtype)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype, non_blocking=True).view(-1, 1, 1, 1)


@dataclass
class OpParams:
    """One op's draws for the images it applies to (CPU tensors), and timm's hparams."""

    level: torch.Tensor
    sign: torch.Tensor
    bicubic: torch.Tensor
    uniform: torch.Tensor
    hparams: dict

    def per_image(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_image(values, like)


# timm's level -> argument functions (timm/data/auto_augment.py, LEVEL_TO_ARG), on tensors of levels.


def _signed(p: OpParams, scale: float) -> torch.Tensor:
    return p.level / 10 * scale * p.sign


def _enhance_factor(p: OpParams, increasing: bool) -> torch.Tensor:
    if increasing:  # 1 -+ up to 0.9, at least 0.1
        return (1 + _signed(p, 0.9)).clamp(min=0.1)
    return p.level / 10 * 1.8 + 0.1


def _posterize_bits(p: OpParams, variant: str) -> torch.Tensor:
    bits = torch.floor(p.level / 10 * 4)
    return {"plain": bits, "increasing": 4 - bits, "original": bits + 4}[variant]


def _solarize_threshold(p: OpParams, increasing: bool) -> torch.Tensor:
    thresh = torch.floor(p.level / 10 * 256).clamp(max=256)
    return 256 - thresh if increasing else thresh


def _gray(img: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``: ITU-R 601-2 luma, rounded (n x 1 x H x W)."""
    r, g, b = img.unbind(1)
    return (r * 0.299 + g * 0.587 + b * 0.114).round().unsqueeze(1)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, img, factor)`` (ImageEnhance), truncated to integers."""
    f = _per_image(factor, img)
    return (degenerate + f * (img - degenerate)).clamp(0, 255).floor()


def _smooth(img: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (3 x 3, centre weight 5 of 13), the border pixels kept."""
    kernel = torch.ones(3, 3, device=img.device, dtype=img.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(img.shape[1], 1, 3, 3)
    out = img.clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(img, kernel, groups=img.shape[1]).round()
    return out


def _lut_per_channel(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Each image channel's 0..255 values through its table (n x c x 256)."""
    n, c, h, w = img.shape
    return lut.gather(2, img.reshape(n, c, h * w).long().clamp(0, 255)).reshape(n, c, h, w)


def _histograms(img: torch.Tensor) -> torch.Tensor:
    n, c, h, w = img.shape
    flat = img.reshape(n, c, h * w).long().clamp(0, 255)
    return torch.zeros(n, c, 256, device=img.device, dtype=img.dtype).scatter_add_(
        2, flat, torch.ones_like(img).reshape(n, c, -1)
    )


def auto_contrast(img: torch.Tensor, p: OpParams) -> torch.Tensor:
    """``ImageOps.autocontrast``: each channel's range stretched to 0..255 (a flat channel kept)."""
    n, c = img.shape[:2]
    lo = img.reshape(n, c, -1).amin(2).view(n, c, 1, 1)
    hi = img.reshape(n, c, -1).amax(2).view(n, c, 1, 1)
    stretched = ((img - lo) * (255 / (hi - lo).clamp(min=1))).floor()
    return torch.where(hi > lo, stretched, img)


def equalize(img: torch.Tensor, p: OpParams) -> torch.Tensor:
    """``ImageOps.equalize``: each channel's histogram equalised, PIL's table (step from all but the top value)."""
    hist = _histograms(img)
    levels = torch.arange(256, device=img.device, dtype=img.dtype)
    top = torch.where(hist > 0, levels, -1.0).amax(2, keepdim=True).long()
    step = torch.floor((hist.sum(2, keepdim=True) - hist.gather(2, top)) / 255)
    before = hist.cumsum(2) - hist
    lut = torch.floor((torch.floor(step / 2) + before) / step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, levels)
    return _lut_per_channel(img, lut)


def _affine(img: torch.Tensor, p: OpParams, matrix: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f))`` per image (n x 2 x 3, output pixel centres
    -> input), bilinear or bicubic as drawn, mid-grey fill outside the image."""
    n, _, h, w = img.shape
    fill = float(p.hparams["img_mean"][0])
    m = matrix.to(img.device, img.dtype, non_blocking=True)
    xs = torch.arange(w, device=img.device, dtype=img.dtype) + 0.5
    ys = torch.arange(h, device=img.device, dtype=img.dtype) + 0.5
    gx = m[:, 0, 0, None, None] * xs + m[:, 0, 1, None, None] * ys[:, None] + m[:, 0, 2, None, None]
    gy = m[:, 1, 0, None, None] * xs + m[:, 1, 1, None, None] * ys[:, None] + m[:, 1, 2, None, None]
    grid = torch.stack([gx * (2 / w) - 1, gy * (2 / h) - 1], dim=-1)
    out = torch.empty_like(img)
    for bicubic in (False, True):
        rows = torch.nonzero(p.bicubic == bicubic).flatten()
        if len(rows):
            index = rows.to(img.device, non_blocking=True)
            mode = "bicubic" if bicubic else "bilinear"
            # zero padding of (img - fill) is a fill-coloured border
            out[index] = F.grid_sample(img[index] - fill, grid[index], mode=mode, align_corners=False) + fill
    return out


def _matrix(a, b, c, d, e, f) -> torch.Tensor:
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], -2)


def rotate(img: torch.Tensor, p: OpParams) -> torch.Tensor:
    """``Image.rotate(degrees)`` about the centre, up to 30 degrees either way."""
    h, w = img.shape[2:]
    t = -torch.deg2rad(_signed(p, 30.0))
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2, h / 2
    return _affine(img, p, _matrix(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy))


def _shift_matrix(p: OpParams, shear_x=None, shear_y=None, dx=None, dy=None) -> torch.Tensor:
    one, zero = torch.ones_like(p.level), torch.zeros_like(p.level)
    pick = lambda v: zero if v is None else v  # noqa: E731
    return _matrix(one, pick(shear_x), pick(dx), pick(shear_y), one, pick(dy))


def _warp_op(kind: str):
    def op(img: torch.Tensor, p: OpParams) -> torch.Tensor:
        w, h = img.shape[3], img.shape[2]
        values = {
            "shear_x": lambda: {"shear_x": _signed(p, 0.3)},
            "shear_y": lambda: {"shear_y": _signed(p, 0.3)},
            "translate_x_rel": lambda: {"dx": _signed(p, p.hparams["translate_pct"]) * w},
            "translate_y_rel": lambda: {"dy": _signed(p, p.hparams["translate_pct"]) * h},
            "translate_x": lambda: {"dx": _signed(p, float(p.hparams["translate_const"]))},
            "translate_y": lambda: {"dy": _signed(p, float(p.hparams["translate_const"]))},
        }[kind]()
        return _affine(img, p, _shift_matrix(p, **values))

    op.__name__ = kind
    return op


def _posterize(variant: str):
    def op(img: torch.Tensor, p: OpParams) -> torch.Tensor:
        bits = p.per_image(_posterize_bits(p, variant), img)
        step = torch.pow(2.0, 8 - bits.clamp(max=8))
        return torch.where(bits >= 8, img, torch.floor(img / step) * step)

    return op


def _solarize(increasing: bool):
    def op(img: torch.Tensor, p: OpParams) -> torch.Tensor:
        thresh = p.per_image(_solarize_threshold(p, increasing), img)
        return torch.where(img < thresh, img, 255 - img)

    return op


def solarize_add(img: torch.Tensor, p: OpParams) -> torch.Tensor:
    add = p.per_image(torch.floor(p.level / 10 * 110).clamp(max=128), img)
    return torch.where(img < 128, (img + add).clamp(max=255), img)


def _enhance(kind: str, increasing: bool):
    def op(img: torch.Tensor, p: OpParams) -> torch.Tensor:
        return _blend(_degenerate(kind, img), img, _enhance_factor(p, increasing))

    return op


def _degenerate(kind: str, img: torch.Tensor) -> torch.Tensor:
    """What ImageEnhance blends away from: grey (Color), the mean grey (Contrast), black, the smoothed image."""
    if kind == "color":
        return _gray(img).expand_as(img)
    if kind == "contrast":
        return (_gray(img).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor().expand_as(img)
    if kind == "brightness":
        return torch.zeros_like(img)
    return _smooth(img)


def desaturate(img: torch.Tensor, p: OpParams) -> torch.Tensor:
    factor = (1 - (0.5 + 0.5 * p.level / 10).clamp(0.5, 1.0)).clamp(0, 1)
    return _blend(_gray(img).expand_as(img), img, factor)


def _gaussian_blur(random_radius: bool):
    def op(img: torch.Tensor, p: OpParams) -> torch.Tensor:
        if random_radius:  # random.uniform(0.1, 2 * factor)
            factor = (p.level / 10).clamp(0, 1)
            radius = 0.1 + p.uniform * (2 * factor - 0.1)
        else:
            radius = (0.1 + 1.9 * p.level / 10).clamp(0.1, 2.0)
        return blur(img, radius.abs().clamp(min=1e-3))

    return op


def blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur of standard deviation ``sigma`` (per image), edges replicated."""
    n, c, h, w = img.shape
    half = int(math.ceil(3 * float(sigma.max())))
    k = torch.arange(-half, half + 1, device=img.device, dtype=img.dtype)
    s = sigma.to(img.device, img.dtype, non_blocking=True).view(n, 1)
    kernel = torch.exp(-(k**2) / (2 * s**2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # n*c x taps
    flat = F.pad(img.reshape(1, n * c, h, w), (half, half, half, half), mode="replicate")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.reshape(n, c, h, w).round()


# timm's NAME_TO_OP, on device tensors (each op: n x 3 x H x W on 0..255 -> the same).
DEVICE_AUGMIX_OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": lambda img, p: 255 - img,
    "Rotate": rotate,
    "Posterize": _posterize("plain"),
    "PosterizeIncreasing": _posterize("increasing"),
    "PosterizeOriginal": _posterize("original"),
    "Solarize": _solarize(False),
    "SolarizeIncreasing": _solarize(True),
    "SolarizeAdd": solarize_add,
    "Color": _enhance("color", False),
    "ColorIncreasing": _enhance("color", True),
    "Contrast": _enhance("contrast", False),
    "ContrastIncreasing": _enhance("contrast", True),
    "Brightness": _enhance("brightness", False),
    "BrightnessIncreasing": _enhance("brightness", True),
    "Sharpness": _enhance("sharpness", False),
    "SharpnessIncreasing": _enhance("sharpness", True),
    "ShearX": _warp_op("shear_x"),
    "ShearY": _warp_op("shear_y"),
    "TranslateX": _warp_op("translate_x"),
    "TranslateY": _warp_op("translate_y"),
    "TranslateXRel": _warp_op("translate_x_rel"),
    "TranslateYRel": _warp_op("translate_y_rel"),
    "Desaturate": desaturate,
    "GaussianBlur": _gaussian_blur(False),
    "GaussianBlurRand": _gaussian_blur(True),
}
