"""Typed configs without a framework: dataclass defaults <- YAML file <- `key=value` overrides.

Every recipe declares one `@dataclass` config. Nested dataclasses are addressed with dots
(`model.dim=256`, `optim.lr=3e-4`). Unknown keys and values of the wrong type are refused with a
message naming the file (or the command line) and the key.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names where and which key."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # `key=a,b,c` on the command line
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # PyYAML reads "1e6" as a string
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: cannot use {value!r} as {_type_name(tp)}")


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} for {cls.__name__} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p!r} is not a section")
    node[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


BASE_KEY = "base"  # a YAML config may start from another: `base: tiny.yaml` (relative to the file)


def read_yaml_config(cls, path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config file as a dict of checked keys, on top of the file its `base` key names (if any):
    a larger preset says only what it changes."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{seen[-1]}: base: {path} is already a base of this config (a cycle)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    parent = data.pop(BASE_KEY, None)
    _check_keys(cls, data, str(path))
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: base: expected the path of another config file, got {parent!r}")
    return _merge(read_yaml_config(cls, path.parent / parent, seen + (path.resolve(),)), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: T | None = None) -> T:
    """Build `cls` from its defaults (or from `base`, a config made elsewhere, e.g. from a finished
    run), then the YAML file at `path`, then `key=value` overrides."""
    tree = to_dict(base if base is not None else cls())
    if path is not None:
        tree = _merge(tree, read_yaml_config(cls, Path(path)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        over: dict = {}
        _set_dotted(over, key.strip(), value)
        _check_keys(cls, over, "command line")
        tree = _merge(tree, over)
    return _build(cls, tree, "")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build `cls` from its defaults updated by a (nested) dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    _check_keys(cls, data, where or cls.__name__)
    return _build(cls, _merge(to_dict(cls()), data), where)


def _check_keys(cls, data: dict, where: str, prefix: str = "") -> None:
    """Refuse unknown keys early, with the full dotted name and where it came from."""
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        if k not in hints:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
            raise ConfigError(f"{where}: unknown key {prefix + k!r} (known at this level: {known})")
        sub = hints[k]
        if typing.get_origin(sub) in (typing.Union, types.UnionType):
            subs = [a for a in typing.get_args(sub) if dataclasses.is_dataclass(a)]
            sub = subs[0] if subs else sub
        if dataclasses.is_dataclass(sub) and isinstance(v, dict):
            _check_keys(sub, v, where, prefix + k + ".")


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_object(spec: str, where: str = "module:attr"):
    """The object a `module:attr` string names (a CLI command, a user's scorer or classifier).

    The one place the package turns a name into code: the CLI's command tables and every config
    field that accepts `module:attr` go through it, so the error for a wrong name reads the same."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{where}: expected `module:attr`, got {spec!r}")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module and not module.startswith(f"{e.name}."):
            raise  # a missing dependency inside an existing module is a real error
        raise ConfigError(f"{where}: no module {module!r} (from {spec!r})") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"{where}: module {module!r} has no {attr!r}") from None
