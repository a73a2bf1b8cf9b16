"""Input-layer defenses: the Gradient Concealment Module and the random resize-pad layer."""

from .gcm import DefendedModel, GradientConcealment, apply_gcm, bpda, set_bpda
from .random_pad import RandomResizePad, apply_random_pad

__all__ = [
    "DefendedModel",
    "GradientConcealment",
    "apply_gcm",
    "bpda",
    "set_bpda",
    "RandomResizePad",
    "apply_random_pad",
]
