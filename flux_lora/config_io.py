"""Strict, typed loading of nested dataclass configurations from YAML and command-line overrides.

Values are coerced by the dataclass type hints (so YAML's ``5e-5``, which PyYAML reads as a string, becomes a
float), unknown keys are rejected with the nearest valid one, and every leaf can be overridden by its dotted path
(``train.learning_rate=5e-5`` or ``--train.learning_rate 5e-5``) or, when unambiguous, by its bare name
(``--quantize float8_e4m3fn``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from flux_lora.atomic import write_text_atomic

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file or command line) and what would be valid.

    ``key`` is the dotted path concerned (when known); ``value`` the offending value, for unknown choices."""

    def __init__(self, message: str, *, key: str | None = None, value: Any = None, unknown: bool = False):
        super().__init__(message)
        self.key, self.value, self.unknown = key, value, unknown


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
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}", key=key, value=value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _list_text(value)  # never split on commas: a prompt may hold one
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
        if not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
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
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!r}{_suggest(unknown[0], list(fields))}",
            key=f"{prefix}{unknown[0]}",
            unknown=True,
        )
    kwargs = {k: coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}", key=prefix.rstrip(".") or None) from e


def leaf_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> type hint for every non-dataclass field of ``cls``."""
    out: dict[str, Any] = {}
    for name, tp in get_type_hints(cls).items():
        if _is_dataclass_type(tp):
            out.update(leaf_paths(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


def parse_overrides(cls: type, args: list[str]) -> dict[str, list[str]]:
    """``["--train.lr", "1e-4", "lora.rank=8", "--quantize=float8_e4m3fn"]`` -> ``{dotted path: raw values}``.

    A bare field name is accepted when exactly one leaf of ``cls`` has it. A field given more than once keeps
    its last value, except that list fields collect them (``--sample.prompts "a, b" --sample.prompts c`` is two
    prompts)."""
    paths = list(leaf_paths(cls))
    by_name: dict[str, list[str]] = {}
    for p in paths:
        by_name.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    out: dict[str, list[str]] = {}
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
                near = difflib.get_close_matches(key, paths + list(by_name), n=1, cutoff=0.5)
                suggestion = f"; did you mean {near[0]!r}?" if near else "; --help lists every key"
                raise ConfigError(f"unknown key {key!r}{suggestion}", key=key, unknown=True)
        out.setdefault(key, []).append(value)
        i += 1
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = data.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
        data = node
    data[leaf] = value


def _accepts_list(tp: Any) -> bool:
    return get_origin(tp) in (list, tuple) or any(get_origin(a) in (list, tuple) for a in get_args(tp))


def _list_text(text: str) -> Any:
    """A list field's text: JSON/YAML list syntax (``[a, "b, c"]``) when it reads as a list, else one item."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            parsed = yaml.safe_load(stripped)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    return [text]


def _keeps_raw_text(tp: Any) -> bool:
    """String fields take command-line text as is (a prompt may contain ': ' or look like a number)."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (list, tuple):
        return _keeps_raw_text(args[0]) if args else False
    return tp is str or (get_origin(tp) in (Union, types.UnionType) and args == [str])


def _override_value(raws: list[str], tp: Any) -> Any:
    """Command-line text -> a value for a field of type ``tp``; repeated list flags are joined into one list."""
    if _accepts_list(tp) and (len(raws) > 1 or get_origin(tp) in (list, tuple)):
        keep = _keeps_raw_text(tp)
        items: list[Any] = []
        for raw in raws:
            parsed = _list_text(raw)
            items.extend(parsed if parsed != [raw] or keep else [yaml.safe_load(raw)])
        return items
    return raws[-1] if _keeps_raw_text(tp) else yaml.safe_load(raws[-1])


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file: pass the file, as configs/toy.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _with_hint(e: ConfigError, hint: str) -> str:
    """The error with the pointer from another trainer's name put first, right after the unknown key."""
    head = f"unknown key {e.key!r}"
    text = str(e)
    return head + hint + text[len(head) :] if hint and text.startswith(head) else text + hint


def _from_command_line(e: ConfigError, parsed: dict[str, list[str]]) -> bool:
    """Whether an error of ``build`` is about an overridden value. An unknown key never is (the command line's
    are refused earlier); otherwise the error's key, or an overridden path named as a whole word in it."""
    if e.unknown:
        return False
    return e.key in parsed or any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", str(e)) for k in parsed)


def _hint(e: ConfigError, foreign_keys: dict[str, str], foreign_values: dict[tuple[str, str], str]) -> str:
    """A pointer from a name another trainer uses to ours (or "")."""
    if e.key is None:
        return ""
    if e.unknown:
        name = e.key.rsplit(".", 1)[-1]
        return f" ({name!r} is another trainer's name: use {foreign_keys[name]})" if name in foreign_keys else ""
    pointer = foreign_values.get((e.key, str(e.value)))
    return f" (use {pointer})" if pointer else ""


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    foreign_keys: dict[str, str] | None = None,
    foreign_values: dict[tuple[str, str], str] | None = None,
) -> T:
    """YAML file (optional) + command-line overrides -> a validated ``cls`` instance.

    Errors name where the bad value came from: the YAML file, or the command line for overridden keys.
    ``foreign_keys`` (name -> our dotted path) and ``foreign_values`` ((path, value) -> advice) add a pointer to
    errors about names other tools use."""
    foreign_keys, foreign_values = foreign_keys or {}, foreign_values or {}
    data = _read_yaml(Path(path)) if path is not None else {}
    types_by_path = leaf_paths(cls)
    try:
        parsed = parse_overrides(cls, overrides or [])
        for key, raws in parsed.items():
            value = _override_value(raws, types_by_path[key])
            coerce(value, types_by_path[key], key)  # a bad value is reported as the command line's
            _set_dotted(data, key, value)
    except ConfigError as e:
        hint = _hint(e, foreign_keys, foreign_values)
        raise ConfigError(f"command line: {_with_hint(e, hint)}", key=e.key, unknown=e.unknown) from None
    try:
        return build(cls, data)
    except ConfigError as e:
        where = "command line" if _from_command_line(e, parsed) or path is None else str(path)
        hint = _hint(e, foreign_keys, foreign_values)
        raise ConfigError(f"{where}: {_with_hint(e, hint)}", key=e.key, unknown=e.unknown) from None


def type_name(tp: Any) -> str:
    """A short, readable name of a type hint: ``int``, ``str | None``, ``{constant,cosine}``, ``list[str]``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted path, type name, default, one-line description)`` for every leaf field of ``cls``, read from
    each field's ``metadata["help"]``."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(field_docs(tp, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f"{prefix}{f.name}", type_name(tp), default, f.metadata.get("help", "")))
    return rows


def help_text(cls: type) -> str:
    """Every field of ``cls`` as ``--dotted.path TYPE`` with its description and default, grouped by section."""
    lines, section = [], None
    for path, tname, default, doc in field_docs(cls):
        head = path.split(".")[0] if "." in path else ""
        if head != section:
            section = head
            lines.append(f"{head or 'run'}:")
        shown = yaml.safe_dump(to_dict(default), default_flow_style=True, width=10_000).strip().removesuffix("...")
        lines.append(f"  --{path} {tname}\n      {doc} (default: {shown.strip()})")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe mapping of a dataclass tree (Paths as strings)."""

    def plain(v: Any) -> Any:
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
