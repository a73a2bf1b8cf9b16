"""Typed configuration, in three parts:

* :mod:`core.config.schema`: the root config and the sections every stage reads (data, aug, model,
  train, wandb) as dataclasses, each field's default and allowed values; a stage adds the sections
  it owns from its own ``config`` module (:func:`register_section`);
* :mod:`core.config.load`: defaults <- YAML files (``base:`` chains) <- ``key=value`` overrides,
  cast and checked per key;
* :mod:`core.config.checks`: what one field cannot say (ranges, combinations), run on every load.

A stage imports what it needs from here, and its own sections from its ``config`` module.
"""

from core.config.checks import (
    MAX_NAME_BYTES,
    MAX_SEED,
    MIN_AUGMIX_ALPHA,
    at_least_one,
    check_name_length,
    validate_config,
)
from core.config.load import (
    MAX_YAML_VALUES,
    apply_dict,
    apply_overrides,
    cast_value,
    config_to_dict,
    expand_name,
    key_named,
    load_config,
    load_yaml_text,
    read_config_chain,
    read_yaml,
    save_config,
)
from core.config.schema import (
    AUGMIX_OPS,
    DEFAULT_CONFIG,
    PRIME_PRIMITIVES,
    AdvConfig,
    AugConfig,
    AugMixConfig,
    Config,
    ConfigError,
    DataConfig,
    FourierConfig,
    ModelConfig,
    PrimeConfig,
    TrainConfig,
    WandbConfig,
    all_keys,
    list_of,
    new_config,
    one_of,
    one_of_each,
    register_section,
    sections,
    within,
)

__all__ = [
    "AUGMIX_OPS", "DEFAULT_CONFIG", "MAX_NAME_BYTES", "MAX_SEED", "MAX_YAML_VALUES", "MIN_AUGMIX_ALPHA",
    "PRIME_PRIMITIVES", "AdvConfig", "AugConfig", "AugMixConfig", "Config", "ConfigError", "DataConfig",
    "FourierConfig", "ModelConfig", "PrimeConfig", "TrainConfig", "WandbConfig", "all_keys", "apply_dict",
    "apply_overrides", "at_least_one", "cast_value", "check_name_length", "config_to_dict", "expand_name",
    "key_named", "list_of", "load_config", "load_yaml_text", "new_config", "one_of", "one_of_each",
    "read_config_chain", "read_yaml", "register_section", "save_config", "sections", "validate_config", "within",
]  # fmt: skip
