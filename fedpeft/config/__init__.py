"""The run's configuration: frozen, typed dataclasses and the one place that validates them.

A run config reaches fedpeft in two shapes that map onto each other:
- a TOML file with one table per section (``[model]``, ``[peft]``, ``[train]``, ``[federation]``, ``[data]``,
  ``[run]``), used by ``fedpeft simulate --config FILE``;
- Flower's flat run config (``model.name = "minilm"``), as ``flwr run`` builds it from ``[tool.flwr.app.config]`` and
  ``--run-config`` overrides.  ``num-server-rounds`` is accepted as Flower's customary alias of ``federation.rounds``.
"""

from __future__ import annotations

import tomllib
import typing
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from fedpeft.config.checks import check_values
from fedpeft.config.types import (
    CLASSIFIERS,
    CLIENT_DP_MODES,
    COMPUTE_DTYPES,
    DP_MODES,
    GRAD_SAMPLE_MODES,
    HEAD_MODES,
    QUANTIZATIONS,
    TASKS,
    WEIGHTINGS,
    DataConfig,
    FederationConfig,
    ModelConfig,
    PeftConfig,
    PrivacyConfig,
    RunConfig,
    RunSection,
    SecAggConfig,
    StrategyConfig,
    TrainConfig,
    resolve_quantization,
)
from fedpeft.errors import ConfigError

FLOWER_ROUNDS_ALIAS = "num-server-rounds"
SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in fields(RunConfig)}


def parse_toml(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a TOML run config; ``overrides`` are flat ``section.key`` values applied on top (types and value rules
    only: ``fedpeft.composition.load_toml`` is the full check a run starts from)."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file '{path}' {problem}; pass an existing TOML file to --config")
    try:
        nested = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file '{path}' is not valid TOML: {err}") from err
    merged = _merge(_sources_beside(nested, path.parent), unflatten(overrides or {}))
    return parse_mapping(merged, origin=str(path))


def _sources_beside(nested: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A relative ``data.source`` written in a config file names a file next to that config, wherever the command
    runs; one that exists only under the working directory (older configs) is left as it is. A ``--set`` override
    is the shell's, so it stays relative to the working directory."""
    data = nested.get("data")
    if not isinstance(data, Mapping):
        return nested
    source = data.get("source")
    if not isinstance(source, str) or not source or Path(source).expanduser().is_absolute():
        return nested
    beside = folder / source
    if not beside.exists() or folder.resolve() == Path.cwd().resolve():
        return nested
    return {**nested, "data": {**data, "source": str(beside)}}


def parse_flat(flat: Mapping[str, Any], origin: str = "run config") -> RunConfig:
    """Build from Flower's flat run config (``context.run_config``); types and value rules only."""
    return parse_mapping(unflatten(flat), origin=origin)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if key == FLOWER_ROUNDS_ALIAS:
            key = "federation.rounds"
        section, dot, item = key.partition(".")
        if not dot:
            raise ConfigError(f"config key '{key}' has no section; write it as 'section.key' "
                              f"with section one of {sorted(SECTIONS)} (e.g. 'federation.rounds')")
        nested.setdefault(section, {})[item.replace("-", "_")] = value
    return nested


def parse_mapping(nested: Mapping[str, Any], origin: str = "config") -> RunConfig:
    """A nested mapping as a RunConfig, its types and value rules checked (``fedpeft.composition.from_mapping``
    adds the checks that need the registries of methods, rules, accountants and partitioners)."""
    sections: dict[str, Any] = {}
    for name, table in nested.items():
        if name not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section [{name}]; known sections are {sorted(SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{origin}: [{name}] must be a table of keys, got {table!r}")
        sections[name] = _build_section(name, SECTIONS[name], table, origin)
    config = _with_label_words(RunConfig(**sections))
    check_values(config, origin)
    return config


def _with_label_words(config: RunConfig) -> RunConfig:
    """Label words default to the class names of ``data.label_names``; filled in here because the loader builds
    the classifier from ``[model]`` alone."""
    model = config.model
    if model.classifier != "label-words" or model.label_words or not config.data.label_names:
        return config
    return replace(config, model=replace(model, label_words=config.data.label_names))


def _build_section(name: str, cls: type, table: Mapping[str, Any], origin: str) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        key = key.replace("-", "_")
        if key not in hints:
            raise ConfigError(f"{origin}: unknown key '{name}.{key}'; known keys of [{name}] are "
                              f"{sorted(hints)}")
        values[key] = _coerce(f"{name}.{key}", raw, hints[key], origin)
    return cls(**values)


def _coerce(key: str, raw: Any, expected: Any, origin: str) -> Any:
    if expected is bool:
        if isinstance(raw, bool):
            return raw
    elif expected is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif expected is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
    elif expected is str:
        if isinstance(raw, str):
            return raw
    elif typing.get_origin(expected) is tuple:
        if isinstance(raw, str):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
            return tuple(raw)
    type_name = ("list of strings (or a comma-separated string)" if typing.get_origin(expected) is tuple
                 else expected.__name__)
    raise ConfigError(f"{origin}: '{key}' = {raw!r} has type {type(raw).__name__}; expected {type_name}")


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, table in extra.items():
        merged.setdefault(section, {}).update(table)
    return merged


__all__ = ["CLASSIFIERS", "CLIENT_DP_MODES", "COMPUTE_DTYPES", "DP_MODES", "FLOWER_ROUNDS_ALIAS", "GRAD_SAMPLE_MODES",
           "HEAD_MODES", "QUANTIZATIONS", "SECTIONS", "TASKS", "WEIGHTINGS", "DataConfig", "FederationConfig",
           "ModelConfig", "PeftConfig", "PrivacyConfig", "RunConfig", "RunSection", "SecAggConfig", "StrategyConfig",
           "TrainConfig", "parse_flat", "parse_mapping", "parse_toml", "resolve_quantization", "unflatten"]
