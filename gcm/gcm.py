"""Gradient Concealment Module (GCM)

The first layer of the defended model in "Gradient Concealment: Free Lunch for Defending
Adversarial Attacks" (arXiv 2205.10617): `y = x + eps * sin(w * x)` with w=1e20, eps=1e-8.
The `cos` form, `y = x + eps * cos(w * x)`, conceals the gradient the same way (its gradient is
`1 - eps * w * sin(w * x)`) and is what an ONNX file holds: the organizers' ONNX -> torch
converter (the onnx-pytorch code generator) has a `Cos` generator and no `Sin` one.

In float32 the forward pass changes nothing measurable (|y - x| <= 1.5e-8, and x is returned
unchanged for |x| >= 0.25) but the input gradient becomes `1 + eps * w * cos(w * x)`, i.e.
about +-1e12 with a pseudo-random sign per pixel. Gradient-based attacks therefore follow noise.
This is gradient masking, not robustness: the straight-through estimator (BPDA, see `bpda`)
recovers the gradient of the undefended model exactly.
"""

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["GradientConcealment", "DefendedModel", "apply_gcm", "set_bpda", "bpda", "gcm_modules"]


FORMS = ("sin", "cos")


class GradientConcealment(nn.Module):
    """`y = x + eps * sin(w * x)` (or `cos`), always computed and returned in float32.

    Why float32 always: in float16 `w * x` overflows to inf for any non-zero pixel and
    `sin(inf)` is NaN, so every output pixel is NaN; bfloat16 keeps the range but loses the
    precision the module relies on. Autocast is therefore disabled locally and the input cast
    to float32. The output stays float32 (not cast back to the input dtype) because the
    backward pass multiplies the gradient by ~1e12, which would overflow a float16 gradient;
    under autocast the next layer casts it down as usual (a model converted with `.half()`
    without autocast must be fed through an explicit cast).

    Args:
        w: Frequency of the sine (1e20 in the paper).
        eps: Amplitude of the sine (1e-8 in the paper); eps=0 gives the identity.
        bpda: Use the straight-through estimator: same forward value, identity backward.
            This is what an honest adaptive attack does; flip it at run time with
            `set_bpda` / `bpda`.
        form: "sin" (the paper's) or "cos" (the same concealment in an op the organizers'
            ONNX converter has; forward moves a pixel by at most eps as well).
    """

    # What `set_bpda` / `bpda` look for: a module whose class says it is a GCM and has a `bpda`
    # switch. The GCM of an exported Phase II file (its model.py, or the sine of an ONNX file
    # converted back to torch) is not this class but carries the same marker.
    is_gcm = True

    def __init__(self, w: float = 1e20, eps: float = 1e-8, bpda: bool = False, form: str = "sin"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"GCM form {form!r}: expected one of {FORMS}")
        self.form = form
        self.w = float(w)
        self.eps = float(eps)
        self.bpda = bool(bpda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.bpda:
                # Straight-through, same as the textbook `x + (gcm(x) - x).detach()`, written
                # so the forward value is exactly gcm(x) (adding x - x = 0 is exact).
                return self._conceal(x).detach() + (x - x.detach())
            return self._conceal(x)

    def _conceal(self, x: torch.Tensor) -> torch.Tensor:
        wave = torch.cos if self.form == "cos" else torch.sin
        return x + self.eps * wave(self.w * x)

    def extra_repr(self) -> str:
        return f"w={self.w:g}, eps={self.eps:g}, form={self.form}, bpda={self.bpda}"


class DefendedModel(nn.Module):
    """Input defenses in front of a model: `model(random_pad(gcm(x)))`.

    The one wrapper of this project: `submit`, `evaluate` and `export` all predict with it
    (around an ensemble), and `apply_gcm` / `apply_random_pad` build it around any model. A
    missing defense slot is `None`. Named children rather than an `nn.Sequential` so the
    wrapped model's state dict keys are simply prefixed with `model.`; the defense layers hold
    no state. Methods of the base model (`forward_features`, ...) are not forwarded on purpose:
    calling them would silently skip the defense. Use `.model` to reach the undefended model.

    The random layer's draws belong to this wrapper: `randomized` says whether there are any,
    and `reseed` restarts them, so every caller reproduces a run the same way.

    Args:
        model: Any module taking an image batch (inputs in [0, 1] in the paper).
        gcm: A GradientConcealment layer, or None.
        random_pad: A RandomResizePad layer (or any random input layer with a `generator`), or None.
    """

    def __init__(self, model: nn.Module, gcm: Optional[nn.Module] = None, random_pad: Optional[nn.Module] = None):
        super().__init__()
        self.gcm = gcm
        self.random_pad = random_pad
        self.model = model

    @property
    def randomized(self) -> bool:
        """True when a random input layer draws anew on every forward pass."""
        return self.random_pad is not None and getattr(self.random_pad, "enabled", True)

    def reseed(self, seed: int) -> None:
        """Restart the random layer's draws from `seed` (its configured seed is kept); no-op when not randomized."""
        if self.random_pad is not None:
            self.random_pad.generator.manual_seed(int(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gcm is not None:
            x = self.gcm(x)
        if self.random_pad is not None:
            x = self.random_pad(x)
        return self.model(x)


def apply_gcm(model: nn.Module, w: float = 1e20, eps: float = 1e-8, form: str = "sin") -> DefendedModel:
    """Put a GradientConcealment layer in front of `model`.

    Args:
        model: Any module taking an image batch (inputs in [0, 1] in the paper).
        w: GCM frequency.
        eps: GCM amplitude.
        form: "sin" (the paper's) or "cos".

    Returns:
        `DefendedModel(model, gcm=GradientConcealment(w, eps, form=form))`.
    """
    return DefendedModel(model, gcm=GradientConcealment(w=w, eps=eps, form=form))


def set_bpda(model: nn.Module, enabled: bool) -> int:
    """Switch the straight-through (BPDA) backward on or off for every GCM in `model` (and every
    other layer with a BPDA stand-in, `bpda_modules`).

    Args:
        model: Module tree to search (the GCM itself also counts).
        enabled: New value of `bpda`.

    Returns:
        Number of GradientConcealment modules found.
    """
    for m in bpda_modules(model):
        m.bpda = bool(enabled)
    return len(gcm_modules(model))


def gcm_modules(model: nn.Module) -> list:
    """The GCM layers in `model` with a BPDA switch: `GradientConcealment` or any class marked `is_gcm`."""
    return [m for m in model.modules() if getattr(type(m), "is_gcm", False) is True]


def bpda_modules(model: nn.Module) -> list:
    """Every module with a BPDA switch: the GCM layers, and any other layer that masks gradients
    and has a differentiable stand-in for the attacker (a class marked `has_bpda`, e.g. an output
    temperature below 1, which saturates the softmax; `infer.defended.EnsembleTTA`)."""
    marked = ("is_gcm", "has_bpda")
    return [m for m in model.modules() if any(getattr(type(m), name, False) is True for name in marked)]


@contextmanager
def bpda(model: nn.Module) -> Iterator[int]:
    """Enable BPDA on every GCM in `model` (and every layer of `bpda_modules`) for a `with` block.

    Each module's previous setting is restored on exit, also on error.

    Yields:
        Number of GradientConcealment modules found (0 means there was nothing to bypass).
    """
    modules = bpda_modules(model)
    previous = [m.bpda for m in modules]
    try:
        for m in modules:
            m.bpda = True
        yield len(gcm_modules(model))
    finally:
        for m, state in zip(modules, previous):
            m.bpda = state
