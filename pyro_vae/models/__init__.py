"""The model registry: one name per family, used by the CLI, run loading and the tests."""

from __future__ import annotations

from typing import Any

from ..config import config_from_dict
from ..errors import ConfigError
from .adgm import ADGM, ADGMConfig
from .base import Family, NetsConfig
from .draw import DRAW, DRAWConfig
from .gan import GAN, GANConfig
from .gmvae import GMVAE, GMVAEConfig
from .m1m2 import M1M2, M1M2Config
from .sbn import SBN, SBNConfig
from .sentence_vae import RNNLM, RNNLMConfig, SentenceVAE, SentenceVAEConfig
from .ssvae import SSVAE, SSVAEConfig
from .vae import IWAE, VAE, VAEConfig

MODELS: dict[str, type[Family]] = {"vae": VAE, "iwae": IWAE, "gmvae": GMVAE, "ssvae": SSVAE, "m1m2": M1M2, "adgm": ADGM,
                                  "sbn": SBN, "sentence-vae": SentenceVAE, "rnnlm": RNNLM, "draw": DRAW,
                                  "gan": GAN}


def model_class(name: str) -> type[Family]:
    """Look a model family up by name, with the valid names in the error."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def build_model(name: str, shape: tuple[int, ...] | int, config: dict[str, Any] | None = None) -> Family:
    """Instantiate the family ``name`` for data of ``shape``: (C, H, W) images or (D,)
    vectors (an int D is read as (D,))."""
    cls = model_class(name)
    return cls(shape, config_from_dict(cls.Config, config or {}))


__all__ = ["ADGM", "ADGMConfig", "DRAW", "DRAWConfig", "Family", "GAN", "GANConfig", "GMVAE", "GMVAEConfig", "IWAE",
           "M1M2", "M1M2Config", "MODELS", "NetsConfig", "RNNLM", "RNNLMConfig", "SBN", "SBNConfig", "SSVAE",
           "SSVAEConfig", "SentenceVAE", "SentenceVAEConfig", "VAE",
           "VAEConfig", "build_model", "config_from_dict", "model_class"]
