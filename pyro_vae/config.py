"""Config dataclasses: fields that carry their own help text and choices.

Every option of ``pyro-vae fit`` is a field of a config dataclass (``TrainConfig``, a
family's config). ``option`` attaches the help and, where the values come from a registry,
the choices, so that the CLI generates its options from the dataclasses alone and a new
registry entry needs no change elsewhere.
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


def option(default: Any, help: str, choices: Iterable[str] | None = None) -> Any:
    """A dataclass field with its CLI help text and (optionally) the values it accepts."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None}
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(config: Any) -> None:
    """Refuse a field value outside its declared choices, listing them."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"unknown {{flag}} {value!r}; choose one of {', '.join(choices)}", flag=Flag(f.name))


def config_from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build a config dataclass from JSON-like values (lists become tuples where typed so),
    refusing values of the wrong type (``where`` names their source in the message).
    Fields missing from ``values`` (a run directory written before they existed) take their
    defaults."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of options, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown {cls.__name__} option(s): "
                          f"{', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        if not _has_type(value, hints[name]):
            raise ConfigError(f"{where + ': ' if where else ''}{{flag}} must be of type "
                              f"{_type_name(hints[name])}, got {value!r}", flag=Flag(name))
        kwargs[name] = value
    return cls(**kwargs)


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
