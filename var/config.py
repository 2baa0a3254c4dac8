"""YAML configs backed by dataclasses: typed, validated, overridable from the command line.

``load_config(SomeConfig, "configs/digits.yaml", ["train.lr=1e-3", "model.depth=4"])`` reads the YAML file,
applies ``key=value`` overrides (dotted keys reach nested dataclasses; values are parsed as YAML), and builds
the dataclass.  Unknown keys are rejected with the closest valid key suggested, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the schema."""


def _suggest(key: str, valid: Sequence[str], prefix: str = "") -> str:
    """Closest valid key (compared without the dotted ``prefix``, shown with it)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + k for k in sorted(valid))}"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_dataclass(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _coerce_number(value: Any, annotation: Any, key: str) -> Any:
    """Make numeric fields numeric: YAML reads ``1e-4`` (no dot) as a string and ``3`` as an int."""
    allowed = set(typing.get_args(annotation)) if typing.get_args(annotation) else {annotation}
    if value is None or isinstance(value, bool) or not allowed & {int, float}:
        return value
    if float in allowed and isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if int in allowed and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys with a suggestion."""
    data = dict(data or {})
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_by_name:
            raise ConfigError(f"unknown config key '{where}{key}'{_suggest(key, list(types_by_name), where)}")
        nested = _nested_dataclass(types_by_name[key])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, where=f"{where}{key}.")
        elif isinstance(value, list):
            value = tuple(value) if "tuple" in str(types_by_name[key]) else value
        else:
            value = _coerce_number(value, types_by_name[key], f"{where}{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"invalid config for {where or cls.__name__}: {error}") from None


def to_dict(config: Any) -> dict:
    """A dataclass config as plain (YAML/JSON-serialisable) data."""
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def apply_overrides(data: dict, overrides: Sequence[str], cls: type | None = None) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.split(".")
        node, node_cls = data, cls
        for depth, part in enumerate(parts):
            if node_cls is not None:
                valid = _field_types(node_cls)
                if part not in valid:
                    prefix = "".join(f"{p}." for p in parts[:depth])
                    raise ConfigError(f"unknown config key '{key}'{_suggest(part, list(valid), prefix)}")
                next_cls = _nested_dataclass(valid[part])
            else:
                next_cls = None
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                node_cls = next_cls
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML config (or start from defaults), apply overrides, and build ``cls``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level of a config must be a mapping")
    apply_overrides(data, overrides, cls)
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
