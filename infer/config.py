"""The settings of prediction, and their checks: ``submit`` (members, ensembling, the submission's
files), ``tta``, ``gcm`` and ``random_pad`` (what evaluate and export predict with too), and the
challenge's ``rules``. Registered with the config (:func:`core.config.register_section`), so every
stage's config file and command line take them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import (
    Config,
    ConfigError,
    at_least_one,
    check_name_length,
    list_of,
    one_of,
    register_section,
    within,
)
from core.errors import echo


@dataclass
class TTAConfig:
    hflip: bool = False
    scales: list = within("(0, 8]", [1.0])  # resize factors, center-cropped/padded back


@dataclass
class GCMConfig:
    enabled: bool = True
    w: float = within("[0, 1e300]", 1e20)
    eps: float = within("[0, 1]", 1e-8)
    # sin: the paper's x + eps*sin(w*x); cos: x + eps*cos(w*x), the same concealment in an op the
    # organizers' ONNX converter has (an exported .onnx always holds the cos form)
    form: str = one_of(("sin", "cos"), "sin")


@dataclass
class RandomPadConfig:
    enabled: bool = False
    min_ratio: float = within("(0, 1]", 218 / 224)  # resize to l in [min, max] * size, zero-pad back to size
    max_ratio: float = within("(0, 1]", 223 / 224)
    seed: int = within("[0, 4294967295]", 0)


@dataclass
class SubmitConfig:
    checkpoints: list = list_of(str)  # exported models; [] -> runs/<name>/best
    weights: list = within("[0, 1e12]", [], item=float)  # one per member; [] -> equal
    aggregate: str = one_of(("prob", "logit"), "prob")
    temperature: float = within("(0, 1e6]", 1.0)
    batch_size: int = within("[1, 1048576]", 64)
    # loader worker processes when a GPU runs the model; -1: as data.num_workers
    num_workers: int = within("[-1, 1024]", -1)
    # ... when the CPU does; -1: the cores the model's threads leave free
    cpu_num_workers: int = within("[-1, 1024]", -1)
    out_dir: str = "submissions"
    file_name: str = ""  # "" -> <name>
    on_bad_image: str = one_of(("error", "fallback"), "error")
    fallback_class: int = within("[0, 100000]", 0)

    def name_of(self, run: str) -> str:
        """The submission's name (its files' stem, no extension): ``file_name``, else the run's ``name``."""
        return self.file_name or run

    def stem(self, run: str) -> Path:
        """``out_dir / name_of(run)``: the stem of the three files submit writes."""
        return Path(self.out_dir) / self.name_of(run)


@dataclass
class RulesConfig:
    # The CVPR 2022 challenge's rules a phase config turns on (README, "The challenge's rules"
    # cites each source); strict=false lets a team override them after checking the current rules.
    strict: bool = True
    one_model: bool = False  # no model fusion: submit.checkpoints lists at most one model
    no_pretrained: bool = False  # no pretrained weights: model.pretrained and model.pretrained_file refused


def check_predict(cfg: Config) -> None:
    """``submit``, ``tta`` and ``random_pad``: what submit, evaluate and export predict with."""
    check_name_length("submit.file_name", cfg.submit.file_name)
    at_least_one(cfg.submit, "submit", ("batch_size",))
    if min(cfg.submit.num_workers, cfg.submit.cpu_num_workers) < -1:
        raise ConfigError("config keys 'submit.num_workers'/'submit.cpu_num_workers' must be >= 0, or -1 for auto")
    if not cfg.tta.scales or any(s <= 0 for s in cfg.tta.scales):
        raise ConfigError("config key 'tta.scales' needs one or more positive factors")
    if cfg.submit.temperature <= 0:
        raise ConfigError(f"config key 'submit.temperature' must be positive, got {cfg.submit.temperature}")
    if not 0 <= cfg.submit.fallback_class < cfg.data.num_classes:
        raise ConfigError(
            f"config key 'submit.fallback_class': {cfg.submit.fallback_class} is not a class of "
            f"[0, {cfg.data.num_classes}) (data.num_classes)"
        )
    name = cfg.submit.name_of(cfg.name)
    problem = submission_name_problem(name)
    if problem:
        key = "submit.file_name" if cfg.submit.file_name else "name"
        raise ConfigError(f"config key '{key}': {echo(name)} {problem}")
    if cfg.submit.weights and len(cfg.submit.weights) != max(1, len(cfg.submit.checkpoints)):
        raise ConfigError("config key 'submit.weights' needs one weight per entry of 'submit.checkpoints'")
    if cfg.submit.weights and (min(cfg.submit.weights) < 0 or sum(cfg.submit.weights) <= 0):
        raise ConfigError(
            f"config key 'submit.weights': {echo(cfg.submit.weights)} must be weights >= 0 with a positive sum"
        )
    if not 0 < cfg.random_pad.min_ratio <= cfg.random_pad.max_ratio <= 1:
        raise ConfigError("config keys 'random_pad.min_ratio'/'max_ratio' need 0 < min <= max <= 1")


def submission_name_problem(name: object) -> str | None:
    """What makes ``name`` unusable as the stem of the submission files, or ``None``.

    The files are ``<name>.csv``, ``<name>.json`` and ``<name>.meta.json`` in one folder, so
    the name must be a plain, visible file name without those extensions.
    """
    if (
        not isinstance(name, str)
        or not name
        or name in {".", ".."}
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or name.strip() != name
    ):
        return "must be a plain file name (no path separators, not hidden, no surrounding spaces)"
    if name.lower().endswith((".csv", ".json")):
        return f"must not carry an extension (the files are {name}.csv/.json; use {Path(name).stem!r})"
    return None


# Where each rule of the CVPR 2022 challenge is written (README, "The challenge's rules").
ONE_MODEL_SOURCE = "the Track I 1st-place team's write-up: no model fusion"
NO_PRETRAINED_SOURCE = (
    "the 2nd- and 5th-place teams' READMEs: github.com/ForeverPs/Robust-Classification, "
    "github.com/WindVChen/Solution-For-AISafety-CVPR2022"
)


def check_rules(cfg: Config) -> None:
    """The challenge's rules a phase config turns on (``rules.*``), unless ``rules.strict=false``."""
    r = cfg.rules
    if not r.strict:
        return
    override = "rules.strict=false overrides it after checking the current rules"
    if r.one_model and len(cfg.submit.checkpoints) > 1:
        raise ConfigError(
            f"rules.one_model: submit.checkpoints lists {len(cfg.submit.checkpoints)} models; the CVPR 2022 "
            f"challenge allowed one ({ONE_MODEL_SOURCE}); {override}"
        )
    if r.no_pretrained and (cfg.model.pretrained or cfg.model.pretrained_file):
        key = "model.pretrained=true" if cfg.model.pretrained else "model.pretrained_file"
        raise ConfigError(
            f"rules.no_pretrained: {key} loads pretrained weights; the CVPR 2022 challenge forbade them "
            f"({NO_PRETRAINED_SOURCE}); {override}"
        )


register_section("tta", TTAConfig)
register_section("gcm", GCMConfig)
register_section("random_pad", RandomPadConfig)
register_section("submit", SubmitConfig, check_predict)
register_section("rules", RulesConfig, check_rules)
