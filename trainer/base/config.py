"""Typed YAML configs: one YAML plus dotted `key=value` overrides into dataclasses.

The dataclasses hold every default; a YAML says only what differs. Anything wrong -- an unknown
key, a wrong type, a missing required value, an unreadable YAML, a path that must exist and does
not -- is refused before any work starts, with one line naming the file and the key path:

    yamls/x.yaml: model.depth: expected int, got 'twelve'
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

import yaml

from trainer.base import uris
from trainer.base.errors import ConfigError, UserError  # noqa: F401  (the names every job imports from here)




class KeyProblem(ConfigError):
    """A problem with one key found before the source is known (e.g. by a job's `config_class`);
    the CLI names the file or the command line in front of it."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key, self.msg = key, msg


class _MustExist:
    def __repr__(self) -> str:
        return "MustExist"


MUST_EXIST = _MustExist()
# A string path that must exist on disk when the config is loaded.
ExistingPath = Annotated[str, MUST_EXIST]

# Predicates for paths that do not exist yet but will, made by an earlier job (a chain's preflight).
_MADE_LATER: list = []


@contextlib.contextmanager
def paths_made_earlier(made):
    """Within it, an ExistingPath passes when `made(path)` holds: an earlier stage of a chain makes it."""
    _MADE_LATER.append(made)
    try:
        yield
    finally:
        _MADE_LATER.remove(made)

_CLI = "command line"
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")   # a number as people write it


def read_yaml(path: str) -> dict:
    """Read a YAML mapping; every failure is a ConfigError naming the file (and line)."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: {where}not valid YAML: {e.problem}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def parse_overrides(overrides: typing.Iterable[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{_CLI}: override {item!r}: expected key=value with a dotted key, e.g. model.depth=4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{_CLI}: override {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `extra` replaces."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _paths(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        p = f"{prefix}{k}"
        keys.add(p)
        if isinstance(v, dict):
            keys |= _paths(v, p + ".")
    return keys


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        args = typing.get_args(tp)
        return f"mapping of {_type_name(args[1])}" if args else "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _section_default(f: dataclasses.Field) -> dict | None:
    """A field's default as the mapping a YAML would spell, when that default is a dataclass instance."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return None
    return _as_yaml(default)


def _as_yaml(v: Any) -> Any:
    """A dataclass instance -> nested mappings of its init fields (what the loader takes back)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _as_yaml(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, (list, tuple)):
        return [_as_yaml(x) for x in v]
    if isinstance(v, dict):
        return {k: _as_yaml(x) for k, x in v.items()}
    return v


class _Builder:
    def __init__(self, source: str, cli_keys: set[str]):
        self.source = source
        self.cli_keys = cli_keys

    def fail(self, key: str, msg: str) -> typing.NoReturn:
        src = _CLI if key in self.cli_keys else self.source
        raise ConfigError(f"{src}: {key}: {msg}")

    def value(self, tp: Any, v: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return v
        if origin is Annotated:
            base, *marks = typing.get_args(tp)
            out = self.value(base, v, key)
            if MUST_EXIST in marks and out is not None and not any(made(out) for made in _MADE_LATER):
                if uris.is_uri(out):
                    try:
                        uris.check(out, must_exist=True)
                    except UserError as e:
                        self.fail(key, str(e))
                elif not os.path.exists(out):
                    self.fail(key, f"path does not exist: {out!r}")
            return out
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if v is None and type(None) in args:
                return None
            others = [a for a in args if a is not type(None)]
            if len(others) == 1:  # Optional[X]: X's own error (e.g. "path does not exist") is the message
                return self.value(others[0], v, key)
            for a in others:
                if a is type(None):
                    continue
                try:
                    return self.value(a, v, key)
                except ConfigError:
                    continue
            self.fail(key, f"expected {_type_name(tp)}, got {v!r}")
        if origin is Literal:
            if v not in typing.get_args(tp):
                self.fail(key, f"expected {_type_name(tp)}, got {v!r}")
            return v
        if origin in (list, tuple):
            if not isinstance(v, (list, tuple)):
                self.fail(key, f"expected {_type_name(tp)}, got {v!r}")
            (a, *_) = typing.get_args(tp) or (Any,)
            return [self.value(a, x, f"{key}[{i}]") for i, x in enumerate(v)]
        if origin is dict:
            if not isinstance(v, dict):
                self.fail(key, f"expected {_type_name(tp)}, got {v!r}")
            ka, va = typing.get_args(tp) or (str, Any)
            return {self.value(ka, k, key): self.value(va, x, f"{key}.{k}") for k, x in v.items()}
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                self.fail(key, f"expected a mapping of {tp.__name__} keys, got {v!r}")
            return self.dataclass(tp, v, key + ".")
        if tp is bool:
            if not isinstance(v, bool):
                self.fail(key, f"expected bool, got {v!r}")
            return v
        if tp is int:
            if isinstance(v, bool) or not isinstance(v, int):
                self.fail(key, f"expected int, got {v!r}")
            return v
        if tp is float:
            if isinstance(v, str) and _FLOAT.fullmatch(v.strip()):
                return float(v)         # YAML 1.1 (PyYAML) reads 1e-4 and 989e12, with no dot, as strings
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.fail(key, f"expected float, got {v!r}")
            return float(v)
        if tp is str:
            if not isinstance(v, str):
                self.fail(key, f"expected str, got {v!r}")
            return v
        if isinstance(tp, type) and not isinstance(v, tp):
            self.fail(key, f"expected {_type_name(tp)}, got {v!r}")
        return v

    def dataclass(self, cls: type, data: dict, prefix: str = "") -> Any:
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for k in data:
            if k not in fields:
                close = [f for f in fields if f.startswith(str(k)[:3])]
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.fail(f"{prefix}{k}", f"unknown key{hint}; {cls.__name__} takes: {', '.join(fields)}")
        kwargs = {}
        for name, f in fields.items():
            key = f"{prefix}{name}"
            # A section whose default is a configured instance (default_factory=lambda: X(a=1)) is the
            # base its YAML keys merge over, at any depth; built here, so its values are checked too.
            base = _section_default(f)
            if name in data:
                v = data[name]
                kwargs[name] = self.value(hints[name], merge(base, v) if base and isinstance(v, dict) else v, key)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(key, "required value missing")
            elif base is not None:
                kwargs[name] = self.value(hints[name], base, key)  # runs nested existence checks
        try:
            obj = cls(**kwargs)
        except (TypeError, ValueError) as e:
            self.fail(prefix.rstrip(".") or cls.__name__, str(e))
        return obj


def from_dict(cls: type, data: dict, source: str = "<dict>", cli_keys: set[str] | None = None) -> Any:
    """Build a config dataclass from a plain mapping with full checking."""
    return _Builder(source, cli_keys or set()).dataclass(cls, data)


def load(cls: type, path: str | None = None, overrides: typing.Iterable[str] = ()) -> Any:
    """YAML file (optional) + dotted overrides -> checked instance of `cls`."""
    data = read_yaml(path) if path else {}
    extra = parse_overrides(overrides)
    return from_dict(cls, merge(data, extra), source=path or _CLI, cli_keys=_paths(extra))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def describe(cls: type, prefix: str = "", default: Any = None) -> list[str]:
    """Lines 'key: type = default' for --help; `default`: the section's instance (its default_factory's)."""
    lines = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if default is not None:
            given = getattr(default, f.name)
        elif f.default is not dataclasses.MISSING:
            given = f.default
        elif f.default_factory is not dataclasses.MISSING:
            given = f.default_factory()
        else:
            given = dataclasses.MISSING
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, f"{prefix}{f.name}.", given if isinstance(given, tp) else None)
            continue
        lines.append(f"{prefix}{f.name}: {_type_name(tp)} = {'(required)' if given is dataclasses.MISSING else repr(given)}")
    return lines
