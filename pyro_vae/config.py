"""Config dataclasses: fields that carry their own help text, choices and ranges.

Every option of ``pyro-vae fit`` is a field of a config dataclass (``TrainConfig``, a
family's config). ``option`` attaches the help and what the field accepts: choices (from a
registry, so a new entry needs no change elsewhere) and bounds (``at_least``, ``above``,
``at_most``, ``below``). ``check_fields`` refuses a value outside them, naming the field
through ``errors.Flag`` (``--z-dim`` on the command line, ``z_dim`` from Python), so each
rule is declared once, beside the field it constrains. ``nested`` holds a config inside
another (M1+M2's M1): its fields become options with the field's name as a prefix
(``--m1-z-dim``), and are checked with the rest.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError, Flag

#: the largest seed: what numpy's and torch's generators both accept, with room for the
#: per-epoch streams derived from it
MAX_SEED = 2**32 - 1

Number = int | float


def option(default: Any, help: str, choices: Iterable[str] | None = None, *, at_least: Number | None = None,
           above: Number | None = None, at_most: Number | None = None, below: Number | None = None) -> Any:
    """A dataclass field with its CLI help text and the values it accepts: one of
    ``choices``, or a number within the bounds given (None, for an optional field, passes)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None,
                "bounds": {k: v for k, v in (("at_least", at_least), ("above", above), ("at_most", at_most),
                                            ("below", below)) if v is not None}}
    return dataclasses.field(default=default, metadata=metadata)


def nested(cls: type, help: str, formerly: dict[str, str] | None = None) -> Any:
    """A field holding a config dataclass ``cls`` (default: its defaults). ``help`` prefixes
    its fields' help on the command line; ``formerly`` maps keys that a dict of the outer
    config once held flat to the fields of ``cls`` they became, so that configs written
    before the nesting still load (``config_from_dict``)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "nested": cls,
                                                            "formerly": dict(formerly or {})})


def is_nested(f: dataclasses.Field) -> bool:
    """Whether the field holds a config of its own (``nested``)."""
    return f.metadata.get("nested") is not None


def describe_bounds(bounds: dict[str, Number]) -> str:
    """The range that ``bounds`` allow, in words: "at least 1", "positive", "in (0, 1]"..."""
    low = ("[", bounds["at_least"]) if "at_least" in bounds else ("(", bounds["above"]) if "above" in bounds else None
    high = (bounds["at_most"], "]") if "at_most" in bounds else (bounds["below"], ")") if "below" in bounds else None
    if low and high:
        if low[0] == "[" and high[1] == "]":
            return f"from {low[1]} to {high[0]}"
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        if low[1] == 0:
            return "non-negative" if low[0] == "[" else "positive"
        return f"at least {low[1]}" if low[0] == "[" else f"greater than {low[1]}"
    if high:
        return f"at most {high[0]}" if high[1] == "]" else f"less than {high[0]}"
    return "any number"


def _within(value: Number, bounds: dict[str, Number]) -> bool:
    return (value >= bounds.get("at_least", value) and value <= bounds.get("at_most", value)
            and ("above" not in bounds or value > bounds["above"])
            and ("below" not in bounds or value < bounds["below"]))


def check_choices(config: Any, prefix: str = "") -> None:
    """Refuse a field value outside its declared choices, listing them."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"unknown {{flag}} {value!r}; choose one of {', '.join(choices)}",
                              flag=Flag(prefix + f.name))


def check_fields(config: Any, prefix: str = "") -> None:
    """Refuse any field value outside what its ``option`` declares (choices, bounds), in
    this config and in the configs nested in it (named ``outer.inner``), one field at a
    time in their order; the message names the field as the caller spells it."""
    check_choices(config, prefix)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if is_nested(f):
            check_fields(value, f"{prefix}{f.name}.")
            continue
        bounds = f.metadata.get("bounds")
        if bounds and value is not None and not _within(value, bounds):
            raise ConfigError(f"{{flag}} must be {describe_bounds(bounds)}, got {value!r}", flag=Flag(prefix + f.name))


def config_from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build a config dataclass from JSON-like values (lists become tuples where typed so),
    refusing values of the wrong type (``where`` names their source in the message).
    Fields missing from ``values`` (a run directory written before they existed) take their
    defaults."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of options, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = _unflatten(cls, values)
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown {cls.__name__} option(s): "
                          f"{', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        if is_nested(fields[name]) and isinstance(value, dict):
            value = config_from_dict(hints[name], value, where)
        if not _has_type(value, hints[name]):
            raise ConfigError(f"{where + ': ' if where else ''}{{flag}} must be of type "
                              f"{_type_name(hints[name])}, got {value!r}", flag=Flag(name))
        kwargs[name] = value
    return cls(**kwargs)


def _unflatten(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the keys that a nested field's ``formerly`` names moved into it."""
    for f in dataclasses.fields(cls):
        formerly = f.metadata.get("formerly") or {}
        if not any(key in values for key in formerly):
            continue
        values = dict(values)
        inner = values.get(f.name, {})
        inner = dataclasses.asdict(inner) if dataclasses.is_dataclass(inner) else dict(inner)
        for old, new in formerly.items():
            if old in values:
                inner.setdefault(new, values.pop(old))
        values[f.name] = inner
    return values


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON-like value fits a config field's annotation (an int fits a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_args(hint) else hint.__name__
