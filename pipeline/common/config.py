"""Typed per-stage configuration: dataclasses, TOML recipes, ``key=value`` overrides, resolved-config files.

Each stage defines one ``@dataclass`` whose fields have primitive types (``int``, ``float``, ``str``, ``bool``,
``X | None``, ``Literal[...]``, ``tuple[...]``/``list[...]`` of primitives). :func:`load_config` builds it from a
TOML recipe section plus command-line overrides and rejects unknown keys, wrong types and values outside a
``Literal`` with a :class:`ConfigError` that names the key and what is allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from pipeline.common.errors import UserError

__all__ = [
    "ConfigError",
    "load_config",
    "from_dict",
    "apply_overrides",
    "to_dict",
    "save_resolved",
    "read_recipe",
    "config_from_cli",
]

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration key is unknown, of the wrong type or out of range."""


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {path}: file not found")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path}: not valid TOML: {e}") from e


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, from_string: bool) -> Any:
    """Check (and, for strings from the command line, convert) ``value`` against the annotation ``tp``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None or (from_string and isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        for opt in (o for o in options if o is not type(None)):
            with contextlib.suppress(ConfigError):
                return _coerce(key, value, opt, from_string)
        allowed = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"config key {key!r}: {value!r} is not {allowed}")
    if origin is Literal:
        allowed = get_args(tp)
        cand = value
        if from_string and isinstance(value, str):
            cand = next((a for a in allowed if str(a) == value), value)
        if cand not in allowed or type(cand) is not type(next(a for a in allowed if a == cand)):
            raise ConfigError(
                f"config key {key!r}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}"
            )
        return cand
    if origin in (tuple, list):
        if from_string and isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = get_args(tp)
        item = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", v, item, from_string) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if (
            from_string
            and isinstance(value, str)
            and value.lower() in ("true", "false", "1", "0", "yes", "no")
        ):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int or tp is float:  # an int is a valid float, never the other way round; a bool is neither
        if isinstance(value, (int, tp)) and not isinstance(value, bool):
            return tp(value)
        if from_string and isinstance(value, str):
            with contextlib.suppress(ValueError):
                return tp(value)
        raise ConfigError(
            f"config key {key!r}: expected {'an integer' if tp is int else 'a number'}, got {value!r}"
        )
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "", from_string: bool = False) -> T:
    """Build dataclass ``cls`` from a mapping, validating every key and value."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    prefix = f"{where}: " if where else ""
    if unknown:
        raise ConfigError(
            f"{prefix}unknown config key(s) {unknown}; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(k, v, hints[k], from_string) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{prefix}{e}") from e


def parse_override(item: str) -> tuple[str, str]:
    """``"key=value"`` -> (key, value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    k, v = item.split("=", 1)
    k = k.strip()
    if not k:
        raise ConfigError(f"override {item!r} has an empty key")
    return k, v.strip()


def apply_overrides(cfg: T, overrides: Sequence[str] | Mapping[str, Any], section: str | None = None) -> T:
    """Return a copy of ``cfg`` with overrides applied (strings from ``--set k=v`` or typed values).

    With ``section`` set, keys of the form ``section.key`` are accepted and keys for other sections are ignored.
    """
    if isinstance(overrides, Mapping):
        items, from_string = dict(overrides), False
    else:
        items, from_string = dict(parse_override(o) for o in overrides), True
    if section:
        scoped = {}
        for k, v in items.items():
            sec, dot, key = k.partition(".")
            if not dot:
                scoped[k] = v
            elif sec == section:
                scoped[key] = v
        items = scoped
    hints = get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg) if f.init}
    unknown = sorted(set(items) - fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; allowed keys: {', '.join(sorted(fields))}")
    merged = {k: v for k, v in to_dict(cfg).items() if k in fields}
    merged.update({k: _coerce(k, v, hints[k], from_string) for k, v in items.items()})
    return from_dict(type(cfg), merged)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    section: str,
) -> T:
    """Build a stage config: defaults <- recipe ``[section]`` (it may be missing: defaults) <- overrides."""
    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        data = read_recipe(path).get(section, {})
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path}: [{section}] must be a table")
        where = f"recipe {path} [{section}]"
    cfg = from_dict(cls, data, where=where)
    return apply_overrides(cfg, overrides, section=section) if overrides else cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (tuples kept as lists for JSON/TOML)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def save_resolved(cfg: Any, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the resolved config (plus e.g. the git commit) as JSON; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"config": to_dict(cfg), "type": type(cfg).__name__, **(extra or {})}
    p.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return p


def config_from_cli(cls: type[T], args: argparse.Namespace, section: str) -> T:
    """The one way a command builds its stage config: defaults <- recipe ``[section]`` (``--config``) <- ``--set``
    overrides <- explicit flags.

    An explicit flag is any argument whose ``dest`` is a field of ``cls`` and whose value is not None (flags
    default to None, ``store_true``/``store_false`` flags too, so an absent flag never overrides the recipe).
    """
    cfg = load_config(
        cls, getattr(args, "config", None), list(getattr(args, "set", None) or ()), section=section
    )
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return apply_overrides(cfg, given) if given else cfg
