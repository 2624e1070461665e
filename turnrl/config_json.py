"""Type checks of config data read from JSON (a run's config.json) against the config dataclasses' fields.

tyro checks command-line values; JSON files need their own check: unknown field names (with a "did you mean") and
values of the wrong type, named by their dotted field (`build`). Generic over dataclasses, so turnrl.config only
defines the fields; ConfigError and `check` are defined here so that every config module can use them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def check(cond: bool, msg: str) -> None:
    """ConfigError(msg) unless `cond`: the one way every config class validates a field."""
    if not cond:
        raise ConfigError(msg)


def json_field_problem(cls, data: dict, prefix: str) -> str | None:
    """What is wrong with `data` as fields of dataclass `cls` (the first unknown key or mistyped value, named
    `prefix` + key), or None. Nested dataclass fields are left to the caller."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            return f"unknown config field '{prefix}{key}'{hint}"
        if not dataclasses.is_dataclass(hints[key]) and not _is_instance(value, hints[key]):
            return f"config field {prefix}{key} must be {_type_name(hints[key])}, got {value!r}"
    return None


def build(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls` from JSON data (a run's config.json), its dataclass fields built the same
    way: ConfigError naming the first unknown or mistyped field (`json_field_problem`), then the classes' own
    checks."""
    problem = json_field_problem(cls, data, prefix)
    if problem is not None:
        raise ConfigError(problem)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"config field {prefix + key!r} must be an object of {hints[key].__name__} fields")
            value = build(hints[key], value, f"{prefix}{key}.")
        kwargs[key] = value
    return cls(**kwargs)


def _is_instance(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:  # JSON has no tuples: a tuple field comes back as a list
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_instance(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is_instance(v, a) for v, a in zip(value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return "of type " + (getattr(hint, "__name__", None) or str(hint))


def changed_fields(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the fields whose values differ between two configs' dicts (nested configs are walked; an
    env's `kwargs` dict is one value), except those in `ignore`."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "kwargs":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    fa, fb = flat(a), flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k) and k not in ignore)
