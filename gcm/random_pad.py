"""Random resize-and-pad input layer

The randomized input layer of the CVPR 2022 robust classification challenge's 2nd-place
model (after GCM): resize the batch to a random side l in [218, 223], then zero-pad it back to
224 x 224 at a random offset, with a new draw on every forward pass. It is a defense, not an
augmentation, so it stays on in eval mode; evaluate it with EOT and expected accuracy over
several draws.

Two implementations of the same resize+pad:

* `resize_pad`: `F.interpolate` to the drawn size, then `F.pad`. The eager forward uses it.
* `resize_pad_static`: the same bilinear sampling written as gathers on a fixed-size canvas,
  with size and offset given as 0-d tensors. Its shapes do not depend on the draw, so
  `torch.export` can capture it with the draws inside the graph (a new draw per call of the
  exported program). It matches `resize_pad` to a few float32 ulps (<= 2e-7 on [0, 1] images).
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .gcm import DefendedModel

__all__ = ["RandomResizePad", "apply_random_pad", "resize_pad", "resize_pad_static"]


IntOrTensor = Union[int, torch.Tensor]


def resize_pad(x: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """Bilinear resize (no antialiasing) of `x` to `h` x `w`, zero-padded back to its size at `(top, left)`."""
    height, width = x.shape[-2:]
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return F.pad(x, (left, width - w - left, top, height - h - top), value=0.0)


def _axis_sampling(
    size: int,
    new: torch.Tensor,
    offset: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices, weights and mask along one axis of `resize_pad_static`.

    Output position `i` shows position `i - offset` of the image resized from `size` to `new`,
    whose source coordinate is `size / new * (i - offset + 0.5) - 0.5` (half-pixel centres,
    clamped at 0), as in `F.interpolate(..., align_corners=False)`.
    """
    dst = torch.arange(size, device=device) - offset
    if dtype == torch.float64:
        scale = torch.full((), float(size), dtype=torch.float64, device=device) / new.to(torch.float64)
        src = scale * (dst.to(torch.float64) + 0.5) - 0.5
    else:
        # PyTorch's CPU kernel computes the scale in float32 and the source coordinate as one
        # fused multiply-add (on this x86 build); evaluating that in float64 and rounding once
        # reproduces it bit for bit. Two float32 roundings were off by one ulp of the
        # coordinate (up to ~1e-5 on the output); a kernel without FMA would differ as much.
        scale = torch.full((), float(size), dtype=torch.float32, device=device) / new.to(torch.float32)
        src = (scale.to(torch.float64) * (dst.to(torch.float64) + 0.5) - 0.5).to(torch.float32)
    src = src.clamp_min(0)
    floor = src.floor()
    i0 = floor.long().clamp(0, size - 1)
    i1 = (i0 + 1).clamp_max(size - 1)
    lam = (src - floor).clamp(0, 1)
    inside = (dst >= 0) & (dst < new)
    return i0, i1, (1 - lam).to(dtype), lam.to(dtype), inside


def resize_pad_static(
    x: torch.Tensor,
    top: IntOrTensor,
    left: IntOrTensor,
    h: IntOrTensor,
    w: IntOrTensor,
) -> torch.Tensor:
    """`resize_pad` with static shapes: the box may be 0-d integer tensors (e.g. random draws).

    Each output pixel inside the box is a bilinear blend of its four source pixels (gathered
    with `index_select`, so the op is differentiable w.r.t. `x`), everything outside is 0.
    Only for downscaling boxes (`h <= height`, `w <= width`), which is all this layer draws.
    """
    height, width = x.shape[-2:]
    top, left, h, w = (torch.as_tensor(v, device=x.device) for v in (top, left, h, w))
    c0, c1, cw0, cw1, cols = _axis_sampling(width, w, left, x.dtype, x.device)
    r0, r1, rw0, rw1, rows = _axis_sampling(height, h, top, x.dtype, x.device)
    # Along the width first, then the height: the order of F.interpolate's CPU kernel. Axes
    # counted from the front: onnx2pytorch 0.6.0 reads a negative Gather axis as axis 0.
    col, row = x.dim() - 1, x.dim() - 2
    y = x.index_select(col, c0) * cw0 + x.index_select(col, c1) * cw1
    y = y.index_select(row, r0) * rw0[:, None] + y.index_select(row, r1) * rw1[:, None]
    return torch.where(rows[:, None] & cols[None, :], y, torch.zeros((), dtype=y.dtype, device=y.device))


class RandomResizePad(nn.Module):
    """Resize a batch to a random smaller size, then zero-pad it back at a random offset.

    For an input of height H the new height is drawn uniformly from
    [round(min_ratio * H), round(max_ratio * H)] (218..223 at H=224 with the defaults). The
    width follows the height's scale so the aspect ratio is kept (same side for square
    inputs). One draw covers the whole batch, as in the original model. Resizing is bilinear
    without antialiasing, so the layer is differentiable w.r.t. its input and EOT attacks can
    go through it.

    Draws come from the module's own `torch.Generator`, so runs are reproducible and do not
    disturb the global RNG. `eval()` does not switch it off; `enabled=False` does.

    Under `torch.export` the layer traces `draw_box_tensors` + `resize_pad_static` instead:
    the draws become random ops of the graph, drawn from torch's global RNG on every call of
    the exported program (a Generator object cannot live in an exported file), so the file
    stays randomized rather than freezing the draw seen while tracing. Same distribution of
    boxes; seed the exported program with `torch.manual_seed`. The ONNX exporter takes the
    same path (its random ops draw anew on every run of the file).

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
            raise ValueError(
                f"RandomResizePad needs 0 < min_ratio <= max_ratio <= 1, "
                f"got min_ratio={min_ratio}, max_ratio={max_ratio}"
            )
        self.min_ratio = float(min_ratio)
        self.max_ratio = float(max_ratio)
        self.seed = int(seed)
        self.enabled = bool(enabled)
        self.generator = torch.Generator()
        self.reset()

    def reset(self, seed: Optional[int] = None) -> None:
        """Reseed the generator (with `seed`, which becomes the module's seed, or the current one)."""
        if seed is not None:
            self.seed = int(seed)
        self.generator.manual_seed(self.seed)

    def side_range(self, size: int) -> Tuple[int, int]:
        """Inclusive range of the resized side for an input side `size`."""
        lo = max(1, round(self.min_ratio * size))
        hi = max(lo, min(size, round(self.max_ratio * size)))
        return lo, hi

    def _randint(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator).item())

    def draw_box(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """Next `(top, left, h, w)` from the module's generator (three draws: side, top, left)."""
        h = self._randint(*self.side_range(height))
        lo_w, hi_w = self.side_range(width)
        w = min(max(round(h * width / height), lo_w), hi_w)
        top = self._randint(0, height - h)
        left = self._randint(0, width - w)
        return top, left, h, w

    def draw_box_tensors(
        self,
        height: int,
        width: int,
        device: Optional[torch.device] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A `(top, left, h, w)` box as 0-d int64 tensors from the global RNG, without a host sync.

        The distribution of `draw_box` (side uniform in `side_range`, offsets uniform), made of
        tensor ops only so a traced graph keeps drawing: `randint` for the side, then one
        `rand` each for the top and left offset.
        """
        lo, hi = self.side_range(height)
        lo_w, hi_w = self.side_range(width)
        h = torch.randint(lo, hi + 1, (), device=device)
        # Python's round() and torch.round both round half to even; h * width is exact in float64.
        w = (h.to(torch.float64) * width / height).round().long().clamp(lo_w, hi_w)
        top = (torch.rand((), device=device) * (height - h + 1)).floor().long().clamp(min=0).minimum(height - h)
        left = (torch.rand((), device=device) * (width - w + 1)).floor().long().clamp(min=0).minimum(width - w)
        return top, left, h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        height, width = x.shape[-2:]
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            # The ONNX tracer hands shapes over as tensors: the box arithmetic needs ints.
            height, width = int(height), int(width)
            return resize_pad_static(x, *self.draw_box_tensors(height, width, x.device))
        return resize_pad(x, *self.draw_box(height, width))

    def extra_repr(self) -> str:
        return (
            f"min_ratio={self.min_ratio:.4f}, max_ratio={self.max_ratio:.4f}, seed={self.seed}, enabled={self.enabled}"
        )


def apply_random_pad(
    model: nn.Module,
    min_ratio: float = 218 / 224,
    max_ratio: float = 223 / 224,
    seed: int = 0,
) -> DefendedModel:
    """Put a RandomResizePad layer in front of `model`.

    For the 2nd-place order (GCM, then resize-pad, then the network) use
    `apply_gcm(apply_random_pad(model))`.

    Returns:
        `DefendedModel(model, random_pad=RandomResizePad(min_ratio, max_ratio, seed))`.
    """
    return DefendedModel(model, random_pad=RandomResizePad(min_ratio=min_ratio, max_ratio=max_ratio, seed=seed))
