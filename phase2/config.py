"""The settings of Phase II, and their checks: ``export`` (the model files), ``budget`` (the
organizers' limits, ``export`` and ``check-submission``) and ``phase2`` (the Phase-II-like score of
``evaluate eval.file=FILE``). Registered with the config (:func:`core.config.register_section`), so
every stage's config file and command line take them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import Config, ConfigError, one_of, one_of_each, register_section, within
from robust.config import AttackDrawConfig, check_attack_draws


@dataclass
class BudgetConfig:
    # The Phase II rules as the organizers' check asserts them (params < 30M, ptflops MACs < 5G
    # at 3 x 224 x 224; their README's "120Mb" is the same 30M float32 parameters)
    max_params: float = within("[0, inf]", 30e6)
    max_gmacs: float = within("[0, inf]", 5.0)
    enforce: bool = False


@dataclass
class ExportConfig:
    path: str = ""  # "" -> runs/<name>/<name>.pt2; the other formats take its stem
    # onnx and zip: the Phase II files (one model, no TTA); pt2: the whole in-process model (torch.export)
    formats: list = one_of_each(("onnx", "zip", "pt2"), lambda: ["onnx", "zip", "pt2"])
    channel_order: str = one_of(
        ("rgb", "bgr"), "rgb"
    )  # of the images the Phase II files are fed (the organizers feed bgr)


@dataclass
class Phase2Config:
    """The Phase-II-like score of ``evaluate eval.file=FILE``: ``draws`` white-box attacks on the file."""

    draws: int = within("[0, 1000]", 0)  # k attacks, each with settings drawn from `attack`; 0 -> off
    seed: int = within("[0, 4294967295]", 0)
    attack: AttackDrawConfig = field(default_factory=AttackDrawConfig)


# More attack draws than anyone runs (each is two whole attacks of the file); 10**9 ran without end.
MAX_PHASE2_DRAWS = 1000


def check_phase2(cfg: Config) -> None:
    """``export`` and ``phase2``."""
    if not cfg.export.formats:
        raise ConfigError("config key 'export.formats' needs at least one of onnx, zip, pt2")
    p, image_size = cfg.phase2, cfg.data.image_size
    if not 0 <= p.draws <= MAX_PHASE2_DRAWS:
        raise ConfigError(f"config key 'phase2.draws': {p.draws} must be in 0..{MAX_PHASE2_DRAWS} (0 turns it off)")
    check_attack_draws(p.attack, "phase2.attack", image_size)


register_section("budget", BudgetConfig)
register_section("export", ExportConfig)
register_section("phase2", Phase2Config, check_phase2)
