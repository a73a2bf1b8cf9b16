"""Typed configuration shared by every stage, in three parts:

* :mod:`core.config.schema`: the sections as dataclasses, each field's default and allowed values;
* :mod:`core.config.load`: defaults <- YAML file <- ``key=value`` overrides, cast and checked per key;
* :mod:`core.config.checks`: what one field cannot say (ranges, combinations), run on every load.

A stage imports what it needs from here.
"""

from core.config.checks import MAX_NAME_BYTES, MAX_SEED, MIN_AUGMIX_ALPHA, check_aug_section, validate_config
from core.config.load import (
    MAX_YAML_VALUES,
    apply_dict,
    apply_overrides,
    cast_value,
    config_from_dict,
    config_to_dict,
    expand_name,
    key_named,
    load_config,
    load_yaml_text,
    read_yaml,
    save_config,
)
from core.config.schema import (
    AA_ATTACKS,
    ABLATION_PARTS,
    ATTACK_DRAW_KINDS,
    AUGMIX_OPS,
    DEFAULT_CONFIG,
    EVAL_ATTACKS,
    PRIME_PRIMITIVES,
    AblationConfig,
    AdvConfig,
    AttackDrawConfig,
    AugConfig,
    AugMixConfig,
    BudgetConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExportConfig,
    FourierConfig,
    GCMConfig,
    ModelConfig,
    Phase2Config,
    PrimeConfig,
    RandomPadConfig,
    SubmitConfig,
    TestsetConfig,
    TrainConfig,
    TTAConfig,
    WandbConfig,
    all_keys,
    new_config,
    sections,
)

__all__ = [
    "AA_ATTACKS", "ABLATION_PARTS", "ATTACK_DRAW_KINDS", "AUGMIX_OPS", "DEFAULT_CONFIG", "EVAL_ATTACKS",
    "MAX_NAME_BYTES", "MAX_SEED", "MAX_YAML_VALUES", "MIN_AUGMIX_ALPHA", "PRIME_PRIMITIVES",
    "AblationConfig", "AdvConfig", "AttackDrawConfig", "AugConfig", "AugMixConfig", "BudgetConfig", "Config",
    "ConfigError", "DataConfig", "EvalConfig", "ExportConfig", "FourierConfig", "GCMConfig", "ModelConfig",
    "Phase2Config", "PrimeConfig", "RandomPadConfig", "SubmitConfig", "TestsetConfig", "TrainConfig", "TTAConfig",
    "WandbConfig", "all_keys", "apply_dict", "apply_overrides", "cast_value", "check_aug_section",
    "config_from_dict", "config_to_dict", "expand_name", "key_named", "load_config", "load_yaml_text", "new_config",
    "read_yaml", "save_config", "sections", "validate_config",
]  # fmt: skip
