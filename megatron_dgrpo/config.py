"""Typed configuration: dataclasses built from YAML, with ``key=value`` overrides.

Every configurable part of the package is a plain ``@dataclass`` with defaults and type
hints, optionally with a ``validate()`` method that raises ``ValueError``. This module turns
nested dicts (from YAML) into those dataclasses, strictly:

* an unknown key is an error that names it, suggests the nearest known key (a misspelling)
  and lists the known ones; malformed YAML is an error naming the file, line and column;
* values are checked against the field's type (``int``, ``float``, ``bool``, ``str``,
  ``Optional[...]``, ``Literal[...]``, ``list[...]``, ``dict[str, ...]``, nested dataclasses);
* after building, ``validate()`` runs on every nested dataclass, inner ones first.

Overrides use dotted paths and YAML scalars, e.g. ``student.model.num_layers=4 loss.kl_coef=0.05
parallel.tensor_parallel=2 data.languages=[en,fr]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` (converting int->float only); return it."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # Optional[X]: X's own message names the offending key
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def require_choice(option: str, value: Any, choices: Iterable[Any]) -> None:
    """For ``validate()`` methods: ValueError naming ``option`` unless ``value`` is one of
    ``choices`` (dataclasses built in Python skip the loader's ``Literal`` check)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        hints = [f"{prefix}{k}: did you mean {prefix}{close[0]}?" for k in unknown
                 if (close := difflib.get_close_matches(str(k), list(fields), n=1))]
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)}"
            f"{' (' + '; '.join(hints) + ')' if hints else ''}; "
            f"known keys of {cls.__name__}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    built = cls(**kwargs)
    object.__setattr__(built, _PROVIDED, frozenset(data))  # not a field: asdict ignores it
    return built


_PROVIDED = "_provided_keys"


def provided_keys(config: Any) -> frozenset[str]:
    """The keys the YAML / overrides set explicitly on this (nested) config dataclass (empty
    for one built in code): what the user asked for, as opposed to defaults."""
    return getattr(config, _PROVIDED, frozenset())


def validate_tree(config: Any) -> None:
    """Run ``validate()`` on ``config`` and every nested dataclass, innermost first."""
    if not dataclasses.is_dataclass(config):
        return
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        children = value if isinstance(value, (list, tuple)) else [value]
        for child in children:
            validate_tree(child)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()


def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
    """Build and validate ``cls`` from a nested mapping (unknown keys are errors)."""
    config = _build(cls, data or {}, "")
    validate_tree(config)
    return config


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a": {"b": 1}, "c": ["x", "y"]}`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: "
                              f"{_yaml_problem(exc)}") from None
    return tree


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in (mappings recursively, the rest replaced)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong, and where (line and column, 1-based)."""
    mark = getattr(exc, "problem_mark", None)
    what = " ".join(str(part) for part in (getattr(exc, "context", None),
                                           getattr(exc, "problem", None)) if part)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what or exc}{where}".replace("\n", " ")


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file (optional) plus ``key=value`` overrides, then validate."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            try:
                loaded = yaml.safe_load(handle)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = dict(loaded or {})
    data = deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (what ``from_dict`` reads back)."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    """YAML text of a config dataclass, suitable for ``load_config``."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
