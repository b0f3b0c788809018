"""Config dataclasses: fields that carry their own help text and choices.

Every option of ``pyro-vae fit`` is a field of a config dataclass (``TrainConfig``, a
family's config). ``option`` attaches the help and, where the values come from a registry,
the choices, so that the CLI generates its options from the dataclasses alone and a new
registry entry needs no change elsewhere.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError


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
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(f"unknown {flag} {value!r}; choose one of {', '.join(choices)}")


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from JSON-like values (lists become tuples where typed so).
    Fields missing from ``values`` (a run directory written before they existed) take their
    defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
