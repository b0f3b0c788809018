"""The model registry: one name per family, used by the CLI, run loading and the tests."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..errors import ConfigError
from .gmvae import GMVAE, GMVAEConfig
from .ssvae import SSVAE, SSVAEConfig
from .vae import IWAE, VAE, VAEConfig

MODELS: dict[str, type] = {"vae": VAE, "iwae": IWAE, "gmvae": GMVAE, "ssvae": SSVAE}


def model_class(name: str) -> type:
    """Look a model family up by name, with the valid names in the error."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from JSON-like values (lists become tuples where typed so)."""
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


def build_model(name: str, x_dim: int, config: dict[str, Any] | None = None) -> Any:
    """Instantiate the family ``name`` for inputs of size ``x_dim``."""
    cls = model_class(name)
    return cls(x_dim, config_from_dict(cls.Config, config or {}))


__all__ = ["GMVAE", "GMVAEConfig", "IWAE", "MODELS", "SSVAE", "SSVAEConfig", "VAE", "VAEConfig", "build_model", "config_from_dict", "model_class"]
