"""What ``evaluate`` measured, as dataclasses the verdict and the report read (and eval.json holds)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from robust.metrics import robust_metrics

ROW_KEYS = ("undefended", "defended", "adaptive")


@dataclass
class Score:
    """One attack (or corruption) on one model: accuracy before and after, and RobustART's AR.

    ``attack`` is an ``eval.attacks`` name, or a derived key such as ``transfer_surrogate``,
    ``corruption_fog_s3`` or ``worst_case``; ``steps`` counts iterations (queries for Square).
    """

    attack: str
    label: str
    norm: str
    eps: float | None
    steps: int
    clean_acc: float
    robust_acc: float
    ar: float

    @classmethod
    def measure(
        cls,
        attack: str,
        label: str,
        norm: str,
        eps: float | None,
        steps: int,
        clean: torch.Tensor,
        correct: torch.Tensor,
    ) -> "Score":
        """From per-image correctness before (``clean``) and after (``correct``) the attack."""
        return cls(attack, label, norm, eps, steps, **robust_metrics(clean, correct))


@dataclass
class Row:
    """A row of the main table: one model (undefended, defended, adaptive) under the paper's attacks."""

    label: str
    top1: float
    attacks: dict[str, Score] = field(default_factory=dict)
    worst_case: Score | None = None


@dataclass
class EvalResult:
    """Everything ``./run.sh evaluate`` reports; ``to_dict`` is eval.json."""

    n: int
    source: str
    defense: str
    adaptive_attack: str
    checkpoints: list[str]
    surrogate: str
    settings: dict
    randomized: bool
    rows: dict[str, Row]
    black_box: list[Score]
    eps_curve: dict[str, list[float]]  # "eps" and one accuracy list per row key
    # ImageNet-C (robust.evaluate.run_corruption_rows): {"models": {"defended"[, "baseline"]: summary},
    # "baseline": path, "training_counterparts": {corruption: [training augmentations]}}; {} when not run
    corruption: dict
    input_models: list[dict] = field(default_factory=list)  # each member's W&B artifact and sha256
    sanity: list[str] = field(default_factory=list)
    verdict: str = ""
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    out_dir: str = ""

    def robust_acc(self, row: str, attack: str) -> float | None:
        """Robust accuracy of ``attack`` in main-table row ``row``, ``None`` if it was not run."""
        score = self.rows[row].attacks.get(attack)
        return None if score is None else score.robust_acc

    @property
    def mean_corruption_acc(self) -> float | None:
        """The defended model's ImageNet-C accuracy: the mean over the common corruption cells run
        (RobustBench's figure when all 75 ran), ``None`` if none ran."""
        return self.corruption.get("models", {}).get("defended", {}).get("imagenet_c")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean_corruption_acc": self.mean_corruption_acc}
