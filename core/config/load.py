"""Loading a config: the schema's defaults <- a YAML file <- ``key=value`` overrides. Every value is
cast to its default's type (YAML quirks such as ``1e20`` being a string cannot slip through) and
checked against its field's allowed values; an unknown key is an error naming the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from core.config.checks import validate_config
from core.config.schema import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    all_keys,
    choices_of,
    is_switch,
    item_type_of,
    new_config,
    sections,
)
from core.errors import echo
from core.io import atomic_write_text


def _unknown_key(key: str, cfg: Config) -> ConfigError:
    valid = all_keys(cfg) + sections(cfg)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def key_named(name: str, section: str = "") -> str | None:
    """The config key a command-line ``--name`` most likely meant (``epochs`` -> ``train.epochs``,
    ``train.lr`` -> ``train.lr``), matching the whole key or its last part, the shortest and then
    those of ``section`` first; None if none does."""
    name = name.replace("-", "_")
    keys = all_keys(new_config())
    if name in keys:
        return name
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == name]
    return min(matches, key=lambda k: (k.count("."), not k.startswith(f"{section}."), k)) if matches else None


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def cast_value(key: str, value: Any, default: Any, from_text: bool = False, item: type | None = None) -> Any:
    """Cast ``value`` to the type of ``default`` (a list's items to ``item``, else to its default's
    first item's type); raise ConfigError naming ``key`` (and the item) if it cannot."""
    expected = type(default)
    try:
        if expected is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if expected is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return _int_of_text(value.strip())
            raise ValueError
        if expected is float:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
            raise ValueError
        if expected is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
        if expected is list:
            if isinstance(value, str) and from_text:
                text = value.strip()
                if text.startswith("["):
                    value = load_yaml_text(text, f"config key '{key}'")
                else:
                    value = [v for v in text.split(",") if v.strip()] if text else []
            if value is None:
                return []
            if not isinstance(value, list):
                raise ValueError
            item = item or (type(default[0]) if default else None)
            if item is dict:
                _check_mappings(key, value)
            elif item is not None:
                return [cast_value(f"{key}[{i}]", v, item(), from_text) for i, v in enumerate(value)]
            return list(value)
    except (ValueError, TypeError, yaml.YAMLError, RecursionError):
        pass
    else:
        raise ConfigError(f"config key '{key}' has a type this loader does not handle")
    raise ConfigError(f"config key '{key}': expected {expected.__name__}, got {echo(value)}")


def _int_of_text(text: str) -> int:
    """``"12"``, and a whole number written as a float (``"1e9"``, ``"3.0"``: YAML reads ``1e9`` as text)."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


def _check_mappings(key: str, value: list) -> None:
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise ConfigError(f"config key '{key}[{i}]': expected a mapping (name: ..., arguments), got {echo(entry)}")


def _switch_value(value: str) -> str:
    text = value.strip().lower()
    return "true" if text in _TRUE else "false" if text in _FALSE else text


def _check_choice(key: str, value: Any, choices: tuple | None) -> None:
    for item in (value if isinstance(value, list) else [value]) if choices else []:
        if item not in choices:
            raise ConfigError(f"config key '{key}': {echo(item)} is not one of {', '.join(choices)}")


def _set(cfg: Config, key: str, value: Any, from_text: bool) -> None:
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise _unknown_key(key, cfg)
        if i == len(parts) - 1:
            current = getattr(node, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; give its keys, e.g. '{key}.…=…'")
                for sub, sub_value in value.items():
                    _set(cfg, f"{key}.{sub}", sub_value, from_text)
                return
            new = cast_value(key, value, current, from_text, item_type_of(node, part))
            if is_switch(node, part):
                new = _switch_value(new)
            _check_choice(key, new, choices_of(node, part))
            setattr(node, part, new)
        else:
            node = getattr(node, part)


# Values a config document may expand to, aliases counted at every use: a real config has a few
# hundred; an alias bomb (each anchor a list of aliases to the previous one) has billions.
MAX_YAML_VALUES = 20_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that counts what the aliases would expand to on the composed node graph
    (shared, so nothing is expanded yet) and refuses a document past ``MAX_YAML_VALUES``."""

    def construct_document(self, node):
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise ConfigError(
                f"YAML aliases expand to more than {MAX_YAML_VALUES} values (an alias bomb, or an alias "
                "inside its own anchor); write the values out"
            )
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is an error (PyYAML keeps the last: a second ``train:``
        block silently dropped the first's values). Keys a merge (``<<``) brings in may be overridden."""
        first: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{echo(key)[1:-1] if isinstance(key, str) else echo(key)}' (first on line "
                    f"{first[key]}): the second would silently replace the first's values; merge them",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _expanded_size(root: yaml.Node) -> float:
    """Values ``root`` stands for with every alias expanded; infinite for a recursive alias."""
    sizes: dict[int, float] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order walk: a deep document cannot exhaust the Python stack here
        node, children_done = stack.pop()
        key = id(node)
        children = (
            [item for pair in node.value for item in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        if children_done:
            sizes[key] = 1 + sum(sizes.get(id(c), math.inf) for c in children)
            if sizes[key] > MAX_YAML_VALUES:
                return sizes[key]
        elif key not in sizes:
            sizes[key] = math.inf  # in progress: meeting it again below means a cycle
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml_text(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` within ``MAX_YAML_VALUES``; errors are ConfigErrors naming ``where``."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping with ``safe_load``; errors name the file (and line when YAML knows it)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


# The key of a config file that names the config it extends (its path relative to the file).
BASE_KEY = "base"


def read_config_chain(path: Path) -> list[tuple[Path, dict]]:
    """``path``'s mapping and those of the configs it extends through ``base:``, the furthest base
    first (each is applied over the one before). A missing base or a cycle is one line naming the file."""
    chain: list[tuple[Path, dict]] = []
    seen: list[Path] = []
    while True:
        data = read_yaml(path)
        seen.append(path.resolve())
        base = data.pop(BASE_KEY, None)
        chain.append((path, data))
        if base is None:
            return chain[::-1]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: '{BASE_KEY}' must name a config file (a path relative to this one)")
        target = Path(os.path.normpath(path.parent / base))
        if target.resolve() in seen:
            cycle = " -> ".join(p.name for p in [*seen, target.resolve()])
            raise ConfigError(f"{path}: {BASE_KEY} {echo(base)} makes a cycle ({cycle})")
        if not target.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} {echo(base)}: config file not found: {target}")
        path = target


def apply_dict(cfg: Config, data: dict, source: str = "") -> Config:
    """Merge a nested mapping (as read from YAML) into ``cfg``."""
    for key, value in data.items():
        try:
            _set(cfg, str(key), value, from_text=False)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply dotted ``key=value`` overrides, each cast to the type of its default."""
    for i, item in enumerate(overrides):
        if "=" not in item:
            value = overrides[i + 1] if i + 1 < len(overrides) and "=" not in overrides[i + 1] else None
            hint = f"did you mean {item}={value}?" if value is not None else "e.g. train.epochs=2"
            raise ConfigError(f"override {echo(item)} is not of the form key=value ({hint})")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value, from_text=True)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- the YAML files ``path`` extends (``base:``) <- YAML file (``configs/default.yaml``
    when ``path`` is None) <- overrides, every value checked (:func:`validate_config`)."""
    cfg = new_config()
    for source, data in read_config_chain(Path(path) if path else DEFAULT_CONFIG):
        apply_dict(cfg, data, source=str(source))
    apply_overrides(cfg, overrides or [])
    expand_name(cfg)
    validate_config(cfg)
    return cfg


def expand_name(cfg: Config) -> None:
    """``name`` may name environment variables (``name=sweep-$WANDB_RUN_ID``: a W&B sweep agent
    starts each run with its own id there, and runs no shell that would expand it)."""
    if "$" in cfg.name:
        expanded = os.path.expandvars(cfg.name)
        if "$" in expanded:
            raise ConfigError(f"config key 'name': {echo(cfg.name)} uses an environment variable that is not set")
        cfg.name = expanded


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
