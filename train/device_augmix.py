"""AugMix on the training device, a whole batch at a time (``aug.augmix.device``; :mod:`train.batch_augment` runs it).

With ``aug.augmix.device`` on (``auto``: with CUDA), timm's AugMix
(``AugMixAugment``, the ops of ``timm.data.auto_augment``) per image, on the batch. Each image gets
its own Dirichlet chain weights, Beta mix, chain depths, ops, magnitudes, signs and resampling,
drawn as timm draws them (:func:`draw_augmix`, on the CPU from a generator seeded by (seed, epoch,
batch, process)); the ops are PIL's, rewritten as tensor ops on 0..255 values rounded after each
op. With the JSD loss the batch becomes N x 3 x C x H x W (clean, AugMix, AugMix), timm's
``AugMixDataset`` layout. The CPU path (``core/transforms.py``, ``AugMixViews``) stays for
``aug.augmix.device=false``; ``tests/test_batch_augment.py`` compares the two paths' draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.config import AugMixConfig
from core.transforms import AUGMIX_MAX_DEPTH, augmix_hparams


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
