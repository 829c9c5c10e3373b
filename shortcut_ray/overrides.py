"""The one override path of the config: dotted keys -> typed values -> a new, validated Config.

    override(cfg, {"train.max_steps": 100, "optim.lr": "3e-4"})   presets, sweep spaces, trial configs
    apply_overrides(cfg, ["train.max_steps=100"])                 the `--set` of every job

Values are coerced to the field's type (strings parsed as `--set` parses them; JSON-ish values such as
Tune samples converted: list -> tuple, 3 -> 3.0 for a float), and the whole config is rebuilt once
through the dataclasses, so every invariant in `__post_init__` is checked on the result (an
intermediate combination of the updates is never built). Everything here is re-exported by config.py.
"""

from __future__ import annotations

import dataclasses
import typing


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


def check(ok: bool, msg: str) -> None:
    """ConfigError(msg) unless ok: the form of every config check (config.py, batch_layout.py)."""
    if not ok:
        raise ConfigError(msg)


def from_dict(cls, d: dict):
    """Nested dataclass `cls` from a (to_dict-shaped) dict; unknown keys are refused by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    check(not unknown, f"unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(names)}")
    kwargs = {}
    for name in names & set(d):
        t, v = hints[name], d[name]
        kwargs[name] = from_dict(t, v) if dataclasses.is_dataclass(t) else tuple(v) if typing.get_origin(t) is tuple \
            else v
    return cls(**kwargs)


def field_type(key: str, root: type | None = None):
    """Type of a dotted config key ('optim.lr' -> float); ConfigError naming the valid keys otherwise."""
    if root is None:
        from .config import Config as root
    typ, parts = root, key.strip().split(".")
    for i, name in enumerate(parts):
        hints = typing.get_type_hints(typ) if dataclasses.is_dataclass(typ) else {}
        if name not in hints:
            where = ".".join(parts[:i])
            if not where:
                sections = [k for k, t in hints.items() if dataclasses.is_dataclass(t)]
                raise ConfigError(f"unknown config key {key!r}: it must be section.key with section in "
                                  f"{sections} (e.g. train.max_steps)")
            raise ConfigError(f"unknown key {key!r}; valid keys in {where}: {sorted(hints)}")
        typ = hints[name]
    if dataclasses.is_dataclass(typ):
        raise ConfigError(f"{key!r} is a whole section; set one of its keys: "
                          f"{[f'{key}.{k}' for k in typing.get_type_hints(typ)]}")
    return typ


def parse_value(raw: str, typ):
    """A `--set` string as a value of type `typ` (bool: true/false/1/0/yes/no; tuple: 1,2,4 or [1,2,4])."""
    if typ is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean (true/false), got {raw!r}")
    if typ is int:
        return int(raw)
    if typ is float:
        return float(raw)
    if typing.get_origin(typ) is tuple:
        items = [s for s in raw.strip("()[] ").split(",") if s.strip()]
        (inner, *_rest) = typing.get_args(typ)
        return tuple(parse_value(s.strip(), inner) for s in items)
    return raw


def coerce(key: str, value, root: type | None = None):
    """`value` as the type of config key `key` (see the module docstring)."""
    typ = field_type(key, root)
    try:
        if isinstance(value, str) and typ is not str:
            return parse_value(value, typ)
        if typing.get_origin(typ) is tuple:
            (inner, *_rest) = typing.get_args(typ)
            return tuple(inner(v) for v in value)
        if typ in (int, float) and not isinstance(value, bool) or typ is bool and value in (0, 1):
            return typ(value)
        return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot use {value!r} for {key} ({getattr(typ, '__name__', typ)}): {e}") from None


def override(cfg, updates: typing.Mapping[str, object]):
    """`cfg` with dotted keys replaced: override(cfg, {"train.max_steps": 100, "optim.lr": "3e-4"})."""
    d = dataclasses.asdict(cfg)
    for key, value in updates.items():
        value = coerce(key, value, type(cfg))  # also checks that the key exists
        *path, name = key.strip().split(".")
        node = d
        for part in path:
            node = node[part]
        node[name] = value
    return from_dict(type(cfg), d)


def parse_overrides(items: typing.Iterable[str]) -> dict[str, str]:
    """['optim.lr=3e-4', ...] -> {'optim.lr': '3e-4', ...} (later items win)."""
    out = {}
    for item in items:
        check("=" in item, f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        out[key.strip()] = raw
    return out


def apply_overrides(cfg, overrides: typing.Iterable[str]):
    """Apply `section.key=value` strings (the `--set` of every job); values are parsed by field type."""
    return override(cfg, parse_overrides(overrides))
