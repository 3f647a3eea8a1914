"""The config tree's generic machinery: YAML mappings, dotted overrides, and typed
sections built from plain dicts with errors that name the dotted key.

Used by the freetf config (:mod:`freetf.config.schema`) and by the sweep spec
(:mod:`freetf.sweeps.spec`); it knows nothing of either's sections.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and the value."""


def read_yaml_mapping(path: str | Path, what: str = "config",
                      error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: ``{}``); ``error`` names the problem."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path} is not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise error(f"{path} must hold a mapping at top level, got {type(loaded).__name__}")
    return loaded or {}


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any],
                    schema: type | None = None, path: str = "") -> dict:
    """Apply ``["a.b=1", ...]`` or ``{"a.b": 1}`` to a nested dict (values parsed as YAML).

    With ``schema`` (the dataclass ``data`` describes, at dotted ``path``), a key under an
    old name (a section's ``RENAMED``) sets the new one and replaces the value under
    either name."""
    data = _deep_copy(data)
    items = overrides.items() if isinstance(overrides, dict) else (
        split_override(o) for o in overrides)
    for key, value in items:
        parts, section = key.split("."), None
        if schema is not None:
            parts, section = _current_names(schema, parts, path)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        for name, current in getattr(section, "RENAMED", {}).items():
            if current == parts[-1]:
                node.pop(name, None)
        node[parts[-1]] = value
    return data


def _current_names(schema: type, parts: list[str],
                   path: str = "") -> tuple[list[str], type | None]:
    """``parts`` of a dotted key with renamed ones under their new names (said once, the
    key named from ``path``), and the section that holds the last one (None past the
    schema's sections)."""
    section: type | None = schema
    names: list[str] = []
    prefix = [path] if path else []
    for i, part in enumerate(parts):
        if section is None or not dataclasses.is_dataclass(section):
            names.append(part)
            section = None
            continue
        current = getattr(section, "RENAMED", {}).get(part)
        if current is not None:
            _say(".".join([*prefix, *names, part]), ".".join([*prefix, *names, current]))
            part = current
        names.append(part)
        if i < len(parts) - 1:
            section = _section_type(typing.get_type_hints(section).get(part))
    return names, section


def _section_type(hint: Any) -> type | None:
    """The dataclass of a field's type hint (``X | None`` too), else None."""
    if hint is not None and dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def split_override(text: str) -> tuple[str, Any]:
    """``"a.b=1"`` -> ``("a.b", 1)``: the value parsed as YAML (kept as text if it is not)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def build_section(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, with errors naming ``path`` keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = _renamed(cls, data, path)
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown config key {where} (value {data[unknown[0]]!r}); "
                          f"known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _renamed(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    """``data`` with the keys a section renamed (its ``RENAMED``: old name -> new name)
    under their new names, saying so once per key; both names at once is an error."""
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    if not renamed or not set(data) & set(renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        where_old, where_new = (f"{path}.{old}", f"{path}.{new}") if path else (old, new)
        if new in data:
            raise ConfigError(f"{where_old} and {where_new} are the same setting (the "
                              f"first is its old name): give only {where_new}")
        data[new] = data.pop(old)
        _say(where_old, where_new)
    return data


_SAID: set[str] = set()  # old names already warned about in this process


def _say(old: str, new: str) -> None:
    if old not in _SAID:
        _SAID.add(old)
        log.warning("%s is now called %s (the old name still works)", old, new)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, path)
    if origin is Literal:
        if isinstance(value, bool) and ("off" if not value else "on") in args:
            value = "off" if not value else "on"  # YAML 1.1 reads off/on as booleans
        if value not in args:
            _fail(path, value, f"must be one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            _fail(path, value, "must be a list")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(path, value, f"must be a list of {len(args)} values")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in pairs)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                _fail(path, value, "must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "must be a number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            _fail(path, value, "is too large for a float")
        if not math.isfinite(number):
            _fail(path, value, "must be finite")
        return number
    if tp is str:
        if not isinstance(value, str):
            _fail(path, value, "must be a string")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _fail(path: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{path}={value!r} {why}")
