"""A config from TOML with `--set section.key=value` overrides; unknown keys, wrong types and
impossible combinations raise `ConfigError` naming the key. Also the config back to TOML, its
hash and a readable diff of two configs (a resume that changed keys says which)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib  # Python >= 3.11: no tomli needed
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from ..core.errors import ConfigError, did_you_mean
from .checks import validate
from .ranges import RangeError
from .schema import SECTIONS, Config, ModelConfig, resolve_model


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin is Annotated:
        value = _coerce(key, value, args[0])
        try:
            return args[1].check(value)
        except RangeError as e:
            raise ConfigError(f"{key} = {value!r}: {e}") from None
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        numbers = [e for a, e in zip(args, errors) if typing.get_origin(a) is Annotated]
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ConfigError(numbers[0])  # a number out of range: say the range
        names = " or ".join(
            "none"
            if a is type(None)
            else getattr(typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a, "__name__", str(a))
            for a in args
        )
        raise ConfigError(f"{key} = {value!r}: expected {names}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected none")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _parse_cli_value(key: str, text: str, tp: Any) -> Any:
    """Turn the text of `--set key=text` into a value of the schema's type."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is a string
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _accepts_str_only(tp):
        value = text
    return _coerce(key, value, tp)


def _accepts_str_only(tp: Any) -> bool:
    if typing.get_origin(tp) is Annotated:
        return False
    return tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp)))


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested TOML-like data."""
    sections: dict[str, Any] = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section [{name}]{did_you_mean(name, list(SECTIONS))}")
        if not isinstance(body, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        cls = SECTIONS[name]
        hints = _field_types(cls)
        kwargs = {}
        for key, value in body.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {name}.{key}{did_you_mean(key, list(hints))}")
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kwargs)
    model = resolve_model(sections.pop("model", ModelConfig()))
    cfg = Config(model=model, **sections)
    validate(cfg)
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to raw TOML data, typed by the schema."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        if "." not in path:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, key = path.strip().split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"--set: unknown config section [{section}]{did_you_mean(section, list(SECTIONS))}")
        hints = _field_types(SECTIONS[section])
        if key not in hints:
            raise ConfigError(f"--set: unknown config key {section}.{key}{did_you_mean(key, list(hints))}")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        raw[section][key] = _parse_cli_value(path, text.strip(), hints[key])
    return raw


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML file, apply overrides, resolve presets and validate."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise ConfigError(f"--config {p}: not a regular file (a directory, pipe or device)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    if not raw:
        raise ConfigError(f"{p}: empty config (give at least one [section]; configs/tiny.toml is an example)")
    return from_dict(apply_overrides(raw, overrides or []))


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def to_dict_for_overrides(cfg: Config) -> dict[str, dict[str, Any]]:
    """Raw data that `from_dict` accepts back (None values dropped)."""
    return {name: {k: v for k, v in body.items() if v is not None} for name, body in to_dict(cfg).items()}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (None values are omitted: they mean 'default')."""
    lines = []
    for name, body in to_dict(cfg).items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def diff(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[str]:
    """Human-readable `section.key: old -> new` lines."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out
