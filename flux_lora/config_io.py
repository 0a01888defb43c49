"""Strict, typed loading of nested dataclass configurations from YAML and command-line overrides.

Values are coerced by the dataclass type hints (so YAML's ``5e-5``, which PyYAML reads as a string, becomes a
float), unknown keys are rejected with the nearest valid one, and every leaf can be overridden by its dotted path
(``train.learning_rate=5e-5`` or ``--train.learning_rate 5e-5``) or, when unambiguous, by its bare name
(``--quantize float8_e4m3fn``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from flux_lora.atomic import write_text_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) and what would be valid."""


def _suggest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` (a type hint), or raise :class:`ConfigError` naming ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if tp is int:
            if isinstance(number, float) and not number.is_integer():
                raise ConfigError(f"{key}: expected a whole number, got {value!r}")
            return int(number)
        return float(number)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")


def build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys and bad values raise."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!r}{_suggest(unknown[0], list(fields))}")
    kwargs = {k: coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def leaf_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> type hint for every non-dataclass field of ``cls``."""
    out: dict[str, Any] = {}
    for name, tp in get_type_hints(cls).items():
        if _is_dataclass_type(tp):
            out.update(leaf_paths(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


def parse_overrides(cls: type, args: list[str]) -> dict[str, str]:
    """``["--train.lr", "1e-4", "lora.rank=8", "--quantize=float8_e4m3fn"]`` -> ``{dotted path: raw value}``.

    A bare field name is accepted when exactly one leaf of ``cls`` has it."""
    paths = list(leaf_paths(cls))
    by_name: dict[str, list[str]] = {}
    for p in paths:
        by_name.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif arg.startswith("--"):
            if i + 1 >= len(args):
                raise ConfigError(f"option {arg} needs a value")
            key, value = arg, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"cannot read override {arg!r}: use key=value or --key value")
        key = key.lstrip("-").replace("-", "_")
        if key not in paths:
            matches = by_name.get(key, [])
            if len(matches) == 1:
                key = matches[0]
            elif len(matches) > 1:
                raise ConfigError(f"override {key!r} is ambiguous: use one of {matches}")
            else:
                raise ConfigError(f"unknown key {key!r}{_suggest(key, paths + list(by_name))}")
        out[key] = value
        i += 1
    return out


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = data.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
        data = node
    data[leaf] = value


def _keeps_raw_text(tp: Any) -> bool:
    """String fields take command-line text as is (a prompt may contain ': ' or look like a number)."""
    args = [a for a in get_args(tp) if a is not type(None)]
    return tp is str or (get_origin(tp) in (Union, types.UnionType) and args == [str])


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + command-line overrides -> a validated ``cls`` instance."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    types_by_path = leaf_paths(cls)
    for key, raw in parse_overrides(cls, overrides or []).items():
        _set_dotted(data, key, raw if _keeps_raw_text(types_by_path[key]) else yaml.safe_load(raw))
    try:
        return build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a dataclass tree (Paths as strings)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return str(v) if isinstance(v, Path) else v

    return plain(cfg)


def dump(cfg: Any, path: str | Path) -> Path:
    """Write the resolved configuration as YAML, atomically; ``load`` reads it back to an equal config."""
    return write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
