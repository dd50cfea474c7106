"""Typed dataclass configurations: strict loading, CLI overrides, saving next to artifacts.

Every stage describes its options as a dataclass. :func:`from_dict` rejects unknown keys and wrong
types *before* any data is read; :func:`apply_overrides` applies ``key.sub=value`` strings from the
command line; :func:`save_config` writes the resolved configuration beside an artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import yaml

from .errors import ConfigError
from .fileio import JSONValue, atomic_file, read_text

T = TypeVar("T")


class DataclassInstance(Protocol):
    """Any dataclass instance (what :func:`dataclasses.asdict` accepts), e.g. a config."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


def check_choices(obj: DataclassInstance, names: tuple[str, ...], section: str = "") -> None:
    """:class:`ConfigError` when a field of ``obj`` named in ``names`` holds a value outside its
    ``Literal`` annotation: what :func:`from_dict` checks for a config file, for a dataclass built
    in Python (``section``: the prefix of the option's name in the message, e.g. ``"finetune"``)."""
    hints = typing.get_type_hints(type(obj))
    for name in names:
        allowed = typing.get_args(hints[name])
        if getattr(obj, name) not in allowed:
            option = f"{section}.{name}" if section else name
            raise ConfigError(f"{option}={getattr(obj, name)!r} is not one of {list(allowed)}.")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict | None):
        raise ConfigError(f"{where} must be a mapping of option names to values, got {type(data).__name__}.")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} in {where}. Valid options: {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {where}: {exc}") from exc
    return obj


# long: one dispatch over the annotation kinds a config may use (union, literal, list, dict, dataclass, scalar).
def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # an optional value: the one type's own message
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} matches none of {hint}.")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}.")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        inner = args[1] if len(args) == 2 else Any
        if inner is Any:  # free-form options (model overrides, objective): "5e-4" is the number YAML 1.1 misses
            return {key: _yaml11_float(item) for key, item in value.items()}
        return {key: _coerce(item, inner, f"{where}.{key}") for key, item in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    if hint is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not abs(number) <= _FLOAT_MAX:  # NaN, infinite, or an integer beyond any float
                raise ConfigError(f"{where}: expected a finite number, got {value!r}.")
            return float(number)
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}.{_quote_hint(value)}")
    if hint is Path:
        if value == "":  # Path("") is the current folder
            raise ConfigError(f"{where}: the path is empty; give a file or folder path (or leave the option out).")
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}.{_quote_hint(value)}")
    return value


def _quote_hint(value: Any) -> str:
    """For a name YAML read as a number or boolean (``goal: 1``, ``output_dir: 2024``): how to give it as text."""
    if isinstance(value, (bool, int, float)):
        return f" YAML reads {value!r} unquoted as a {type(value).__name__}; quote it to give the name: '{value}'."
    return ""


_FLOAT_MAX = sys.float_info.max

#: a number in exponent notation without a dot ("5e-4"), which YAML 1.1 reads as a string
_EXPONENT_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _yaml11_float(value: Any) -> Any:
    """``value``, or the float a string such as ``"5e-4"`` stands for (YAML 1.1 leaves it a string)."""
    return float(value) if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()) else value


def to_dict(obj: DataclassInstance) -> dict[str, JSONValue]:
    """A plain, YAML/JSON-serialisable dict of a dataclass (paths become strings)."""

    def plain(value: object) -> JSONValue:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


def apply_overrides(data: dict[str, Any], overrides: list[str] | None, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """A nested dict copy of ``data`` with ``values`` (dotted key -> value, taken as given, e.g. a
    CLI option's string) and then the ``a.b=value`` ``overrides`` (values parsed as YAML) set."""
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for key, value in (values or {}).items():
        _set_dotted(result, key, value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.learning_rate=1e-4).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {key.strip()}: the value {raw!r} is not valid YAML ({str(exc).splitlines()[0]}); "
                f"quote it as a string, e.g. {key.strip()}='{raw}'."
            ) from exc
        _set_dotted(result, key, value)
    return result


def _set_dotted(result: dict[str, Any], key: str, value: Any) -> None:
    node = result
    parts = key.strip().split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is not None and not isinstance(child, dict):  # replacing it would hide the wrong value
            section = ".".join(parts[: depth + 1])
            raise ConfigError(f"{key.strip()}: {section} is {child!r}, not a mapping of options; fix {section} in the config file.")
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> T:
    """Read a YAML/JSON config file (optional), set ``values`` and apply CLI ``overrides`` (see
    :func:`apply_overrides`), validate into ``cls``."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path, text = read_text(path, "config file", "a YAML or JSON config")
        where = str(path)
        data = _parse_config_text(text, path)
    if overrides or values:
        data = _with_mapping_defaults(cls, data)
    return from_dict(cls, apply_overrides(data, overrides, values), where)


def _with_mapping_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the non-empty default of every mapping field it does not set (also in nested
    dataclasses), so that ``a.key=value`` sets one key of such a mapping and keeps the others (a whole
    mapping given in the file or as ``a={...}`` still replaces the default)."""
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            continue
        default = f.default_factory()  # type: ignore[misc]
        if isinstance(default, dict) and default and f.name not in out:
            out[f.name] = dict(default)
        elif dataclasses.is_dataclass(default) and isinstance(out.get(f.name, {}), dict):
            nested = _with_mapping_defaults(type(default), out.get(f.name, {}))
            if nested:
                out[f.name] = nested
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping naming one key twice is an error (PyYAML keeps the
    last value without a word: an option set twice in a config file silently lost one setting)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"option {key!r} is given twice", key_node.start_mark)
        seen.add(key if isinstance(key, (str, int, float, bool)) else id(key_node))
    return loader.construct_mapping(node, deep)


class _DuplicateOption(Exception):
    """A JSON object naming one key twice (json keeps the last value)."""


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateOption(next(key for key in keys if keys.count(key) > 1))
    return dict(pairs)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _parse_config_text(text: str, path: Path) -> dict[str, Any]:
    """A config file's mapping: YAML, or JSON that YAML does not read (e.g. tab-indented); an option
    given twice is refused."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        if "is given twice" in str(getattr(exc, "problem", "")):
            raise ConfigError(f"config file {path}: {_yaml_problem(exc)}. Keep one of them.") from exc
        try:
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        except _DuplicateOption as duplicate:
            raise ConfigError(f"config file {path}: option {duplicate.args[0]!r} is given twice. Keep one of them.") from exc
        except ValueError:
            raise ConfigError(f"config file {path} is not valid YAML or JSON: {_yaml_problem(exc)}. Fix it there.") from exc
    if data is None:  # nothing but comments
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values.")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where it is (line and column, counted from 1)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def save_config(obj: DataclassInstance, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved dataclass ``obj`` as YAML into ``directory`` (atomically)."""
    path = Path(directory) / name
    with atomic_file(path) as handle:
        yaml.safe_dump(to_dict(obj), handle, sort_keys=False)
    return path


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and (data or not prefix):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def changed_settings(old: dict[str, JSONValue], new: dict[str, JSONValue]) -> list[tuple[str, JSONValue, JSONValue]]:
    """(dotted key, old value, new value) of every setting that differs between two config dicts."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [(key, flat_old.get(key), flat_new.get(key)) for key in sorted(set(flat_old) | set(flat_new))
            if flat_old.get(key) != flat_new.get(key)]
