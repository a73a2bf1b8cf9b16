"""Does an exported file reproduce the in-process model? The comparisons ``export`` and
``check-submission`` make, for every file format.

The in-process model is :class:`gcm.DefendedModel` as ``submit`` builds it; a file is compared
through a callable mapping RGB images to its probabilities. With the random resize-pad layer
the draws are compared one for one where the file draws from torch's global RNG in the order
``RandomResizePad.draw_box_tensors`` does (the ``.pt2`` program, the zip's ``model.py``), and
otherwise (onnxruntime, a converted ONNX graph) each output must equal the in-process output
under one of the boxes the layer can draw.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from gcm import DefendedModel
from gcm.random_pad import resize_pad

# Largest |probability difference| tolerated between a file and the in-process model. A file
# with a non-finite output scores NaN, which no ``<=`` comparison passes.
ROUND_TRIP_ATOL = 1e-5
CHECK_BATCH = 3


class FixedBox(nn.Module):
    """A resize-pad layer that always applies one given box (to replay a draw in-process)."""

    def __init__(self, box: Sequence[int]) -> None:
        super().__init__()
        self.box = tuple(int(v) for v in box)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_pad(x, *self.box)


@contextlib.contextmanager
def placed(device: torch.device | str, *modules: nn.Module) -> Iterator[None]:
    """The ``modules`` on ``device`` for the block, back where they were afterwards; on a GPU in
    exact float32 (no TF32: the parity tolerance is 1e-5, TF32 convolutions differ by ~1e-3)."""
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    device = torch.device(device)
    exact = device.type == "cuda"
    if exact:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for m in modules:
            m.to(device)
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)
        if exact:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


@contextlib.contextmanager
def fixed_draw(model: DefendedModel, box: Sequence[int]) -> Iterator[DefendedModel]:
    """Run ``model`` with its random resize-pad layer pinned to ``box`` (top, left, h, w)."""
    layer = model.random_pad
    model.random_pad = FixedBox(box)
    try:
        yield model
    finally:
        model.random_pad = layer


def check_images(image_size: int) -> torch.Tensor:
    """The random images every parity check feeds (the same on every call; the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        return torch.rand(CHECK_BATCH, 3, image_size, image_size)


class Replay:
    """A file's recorded outputs on :func:`check_images`, given back one per call in the order a
    parity check asks for them: the comparison of a file whose code runs in another process."""

    def __init__(self, x: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
        self.x, self.outputs = x, list(outputs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.equal(x.cpu(), self.x.cpu()) or not self.outputs:
            raise ValueError("a replayed file is asked for an output it did not record")
        return self.outputs.pop(0)


ROUND_TRIP_SEEDS = (0, 1)  # the global-RNG seeds a randomized file is compared under, draw for draw


def check_round_trip(
    loaded: nn.Module, model: DefendedModel, image_size: int, seeds: Sequence[int] = ROUND_TRIP_SEEDS
) -> float:
    """Largest |probability difference| between ``loaded`` and ``model`` on random images.

    Deterministic model: one comparison. With the random resize-pad layer, for each seed the
    loaded program draws from the global RNG seeded with it; the same seed replayed through
    ``RandomResizePad.draw_box_tensors`` gives the box, which the in-process model then uses,
    so the two are compared draw for draw. The caller's RNG state is restored afterwards.
    """
    pad = model.random_pad if model.randomized else None
    worst = 0.0
    x = check_images(image_size).to(_device_of(model))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for seed in seeds if pad is not None else (None,):
            if seed is None:
                got, expected = loaded(x), model(x).exp()
            else:
                torch.manual_seed(seed)
                got = loaded(x)
                torch.manual_seed(seed)
                box = [int(v) for v in pad.draw_box_tensors(image_size, image_size)]
                with fixed_draw(model, box):
                    expected = model(x).exp()
            if got.shape != expected.shape:
                return float("inf")
            if not torch.isfinite(got).all():
                return float("nan")  # max(worst, nan) would keep worst: an all-NaN file would pass
            worst = max(worst, (got.to(expected.device) - expected).abs().max().item())
    return worst


def box_outputs(model: DefendedModel, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check images and the in-process probabilities under every box the random pad can draw.

    Returns ``(x, outputs)`` with outputs of shape (boxes, N, classes): the reference for files
    whose draws cannot be replayed (onnxruntime, a converted graph).
    """
    pad = model.random_pad
    lo, hi = pad.side_range(image_size)
    boxes = [
        (t, left, h, h)
        for h in range(lo, hi + 1)
        for t in range(image_size - h + 1)
        for left in range(image_size - h + 1)
    ]
    x = check_images(image_size).to(_device_of(model))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        outputs = []
        for box in boxes:
            with fixed_draw(model, box):
                outputs.append(model(x).exp())
    return x, torch.stack(outputs)


def matches_some_box(
    output: Callable, reference: tuple[torch.Tensor, torch.Tensor], calls: int = 3
) -> tuple[float, int]:
    """Each of ``calls`` outputs of a randomized file against :func:`box_outputs`.

    Returns the worst distance of an output to its nearest in-process output and the number of
    different boxes the file drew.
    """
    x, outputs = reference
    worst, seen = 0.0, set()
    with torch.no_grad():
        for _ in range(calls):
            got = output(x)
            if got.shape != outputs.shape[1:]:
                return float("inf"), 0
            if not torch.isfinite(got).all():
                return float("nan"), 0
            got = got.to(outputs.device)
            dist = (outputs - got).abs().flatten(1).max(1).values
            worst = max(worst, float(dist.min()))
            seen.add(int(dist.argmin()))
    return worst, len(seen)


def file_parity(output: Callable, model: DefendedModel, image_size: int, reference=None) -> dict:
    """How closely a Phase II file reproduces the in-process model (probabilities).

    ``output`` maps RGB images to the file's probabilities. Deterministic, or randomized with
    draws replayed from the global RNG (no ``reference``): compared draw for draw. Otherwise
    each output must match one box the layer can draw (``reference`` from :func:`box_outputs`).
    """
    if reference is None:
        return {"max_abs_diff": check_round_trip(output, model, image_size), "compared": "draw for draw"}
    worst, boxes = matches_some_box(output, reference)
    return {"max_abs_diff": worst, "compared": "each output against every box", "boxes_drawn": boxes}


def as_rgb_probabilities(file_model: Callable, channel_order: str) -> Callable:
    """RGB images -> the file's probabilities, the file fed in its own channel order."""

    def output(x: torch.Tensor) -> torch.Tensor:
        return file_model(x.flip(1) if channel_order == "bgr" else x).exp()

    return output
