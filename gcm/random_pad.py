""" Random resize-and-pad input layer

The randomized input layer of the CVPR 2022 robust classification challenge's 2nd-place
model (after GCM): resize the batch to a random side l in [218, 223], then zero-pad it back to
224 x 224 at a random offset, with a new draw on every forward pass. It is a defense, not an
augmentation, so it stays on in eval mode; evaluate it with EOT and expected accuracy over
several draws.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .gcm import DefendedModel

__all__ = ['RandomResizePad', 'apply_random_pad']


class RandomResizePad(nn.Module):
    """ Resize a batch to a random smaller size, then zero-pad it back at a random offset.

    For an input of height H the new height is drawn uniformly from
    [round(min_ratio * H), round(max_ratio * H)] (218..223 at H=224 with the defaults). The
    width follows the height's scale so the aspect ratio is kept (same side for square
    inputs). One draw covers the whole batch, as in the original model. Resizing is bilinear
    without antialiasing, so the layer is differentiable w.r.t. its input and EOT attacks can
    go through it.

    Draws come from the module's own `torch.Generator`, so runs are reproducible and do not
    disturb the global RNG. `eval()` does not switch it off; `enabled=False` does.

    Args:
        min_ratio: Smallest resized side as a fraction of the input side.
        max_ratio: Largest resized side as a fraction of the input side (<= 1).
        seed: Seed of the module's generator.
        enabled: When False the layer is the identity.
    """

    def __init__(
            self,
            min_ratio: float = 218 / 224,
            max_ratio: float = 223 / 224,
            seed: int = 0,
            enabled: bool = True,
    ):
        super().__init__()
        if not 0 < min_ratio <= max_ratio <= 1:
            raise ValueError(f'RandomResizePad needs 0 < min_ratio <= max_ratio <= 1, '
                             f'got min_ratio={min_ratio}, max_ratio={max_ratio}')
        self.min_ratio = float(min_ratio)
        self.max_ratio = float(max_ratio)
        self.seed = int(seed)
        self.enabled = bool(enabled)
        self.generator = torch.Generator()
        self.reset()

    def reset(self, seed: Optional[int] = None) -> None:
        """ Reseed the generator (with `seed`, which becomes the module's seed, or the current one). """
        if seed is not None:
            self.seed = int(seed)
        self.generator.manual_seed(self.seed)

    def side_range(self, size: int) -> Tuple[int, int]:
        """ Inclusive range of the resized side for an input side `size`. """
        lo = max(1, round(self.min_ratio * size))
        hi = max(lo, min(size, round(self.max_ratio * size)))
        return lo, hi

    def _randint(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator).item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        height, width = x.shape[-2:]
        h = self._randint(*self.side_range(height))
        lo_w, hi_w = self.side_range(width)
        w = min(max(round(h * width / height), lo_w), hi_w)
        top = self._randint(0, height - h)
        left = self._randint(0, width - w)
        x = F.interpolate(x, size=(h, w), mode='bilinear', align_corners=False, antialias=False)
        return F.pad(x, (left, width - w - left, top, height - h - top), value=0.)

    def extra_repr(self) -> str:
        return (f'min_ratio={self.min_ratio:.4f}, max_ratio={self.max_ratio:.4f}, '
                f'seed={self.seed}, enabled={self.enabled}')


def apply_random_pad(
        model: nn.Module,
        min_ratio: float = 218 / 224,
        max_ratio: float = 223 / 224,
        seed: int = 0,
) -> DefendedModel:
    """ Put a RandomResizePad layer in front of `model`.

    For the 2nd-place order (GCM, then resize-pad, then the network) use
    `apply_gcm(apply_random_pad(model))`.

    Returns:
        `DefendedModel(RandomResizePad(min_ratio, max_ratio, seed), model)`.
    """
    return DefendedModel(RandomResizePad(min_ratio=min_ratio, max_ratio=max_ratio, seed=seed), model)
