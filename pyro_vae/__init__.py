"""pyro_vae: variational autoencoders as Pyro model/guide pairs, with honest bounds.

    from pyro_vae import VAE, TrainConfig, fit, load_run, estimate_bounds

Importing the package changes no Pyro setting. A family's ``model`` and ``guide`` train
with Pyro's ``SVI`` and ``pyro.optim``, with Pyro's ``ELBOModule`` and a torch optimizer,
or with the library's own loop (``fit``, ``CompiledLoss``); each family's parameters have
a name of their own in Pyro's parameter store, so two models never share a weight
(``pair``).

Importing the package loads nothing else, torch included: each name below is imported
from its module on first use, so that the command line (``python -m pyro_vae``) can set
its thread policy before torch starts (``threads``), and so that importing changes no
thread setting either.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names for type checkers and readers; at run time __getattr__ imports them
    from .bounds import BoundEstimates, estimate_bounds, log_weights
    from .compiled import CompiledLoss
    from .data import Dataset, load_dataset
    from .errors import PyroVAEError
    from .guides import GUIDES, make_flow
    from .likelihoods import LIKELIHOODS, make_likelihood
    from .models import (ADGM, DRAW, GAN, GMVAE, IWAE, M1M2, MODELS, SBN, SSVAE, VAE, Family, GANConfig, GMVAEConfig,
                         NetsConfig, SSVAEConfig, VAEConfig, ADGMConfig, DRAWConfig, M1M2Config, SBNConfig, build_model)
    from .nets import DECODERS, ENCODERS
    from .pair import own_parameters
    from .objectives import OBJECTIVES, ObjectiveSpec, RenyiObjective, WakeSleepObjective, make_objective
    from .train import Run, RunConfig, TrainConfig, fit, load_run, resolve, resume

#: each public name and the module that defines it
_MODULES = {
    "BoundEstimates": "bounds", "estimate_bounds": "bounds", "log_weights": "bounds", "CompiledLoss": "compiled",
    "Dataset": "data", "load_dataset": "data", "PyroVAEError": "errors", "GUIDES": "guides", "make_flow": "guides",
    "LIKELIHOODS": "likelihoods", "make_likelihood": "likelihoods", "ADGM": "models", "GAN": "models", "GANConfig": "models", "GMVAE": "models",
    "IWAE": "models", "M1M2": "models", "MODELS": "models", "SSVAE": "models", "VAE": "models", "Family": "models",
    "GMVAEConfig": "models", "NetsConfig": "models", "SSVAEConfig": "models", "VAEConfig": "models",
    "ADGMConfig": "models", "DRAW": "models", "DRAWConfig": "models", "M1M2Config": "models", "SBN": "models",
    "SBNConfig": "models", "build_model": "models", "DECODERS": "nets", "ENCODERS": "nets",
    "own_parameters": "pair", "OBJECTIVES": "objectives", "ObjectiveSpec": "objectives",
    "RenyiObjective": "objectives", "WakeSleepObjective": "objectives", "make_objective": "objectives",
    "Run": "train", "RunConfig": "train",
    "TrainConfig": "train", "fit": "train", "load_run": "train", "resolve": "train", "resume": "train",
}

__version__ = "0.1.0"
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (then kept)."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})
