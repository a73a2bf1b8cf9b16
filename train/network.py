"""The network as training needs it: checked against the input size, its conv kernels laid out
the way their gradients come back (what DDP compares)."""

from __future__ import annotations

import torch
from torch import nn

from core.errors import UserError


def align_kernel_strides(model: nn.Module) -> int:
    """Lay conv kernels out the way their gradients come back; returns how many changed.

    timm's ConvNeXt blocks (and its LayerNorm2d) end with an NHWC -> NCHW permute, so its convs
    run on channels_last activations and PyTorch returns their kernels' gradients in channels_last
    strides. Where a kernel has size-1 dimensions (depthwise ``(C, 1, 7, 7)``, 1x1 ``(O, I, 1, 1)``
    in ``conv_mlp`` models) both layouts are the same bytes in the same order, only the strides of
    those dimensions differ (``(49, 1, 7, 1)`` against ``(49, 49, 7, 1)``): autograd accepts the
    gradient as it is, but DDP compares strides literally and warned "Grad strides do not match
    bucket view strides" on every multi-process run. Such kernels get the channels_last strides
    from the start, so gradients match them (and DDP's bucket views, which copy the parameter's
    strides). Values and memory order are unchanged; other kernels are left as they are (autograd
    makes their gradients follow their layout).
    """
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Conv2d) or weight is None or weight.dim() != 4:
            continue
        same_bytes = weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
        out_channels, in_channels, height, width = weight.shape
        strides = (height * width * in_channels, 1, width * in_channels, in_channels)  # channels_last
        if same_bytes and weight.stride() != strides:
            laid_out = torch.empty_strided(weight.shape, strides, dtype=weight.dtype, device=weight.device)
            weight.data = laid_out.copy_(weight.detach())
            changed += 1
    return changed


def check_input_size(model: nn.Module, image_size: int, arch: str) -> None:
    """One forward of a blank image: a size the network cannot take (too small for its
    downsampling) becomes one line naming ``data.image_size`` instead of a kernel error later."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"data.image_size={image_size} is too small for {arch} ({first}); use a larger size "
            "(a ConvNeXt downsamples 32x: at least 32)"
        ) from None
    finally:
        model.train(was_training)
