"""pyro_vae: variational autoencoders as Pyro model/guide pairs, with honest bounds.

    from pyro_vae import VAE, TrainConfig, fit, load_run, estimate_bounds

Importing the package turns on ``pyro.settings.set(module_local_params=True)``: each
PyroModule keeps its own parameters (no global parameter store), so two models in one
process never share weights by name and plain torch optimizers apply.
"""

import pyro

from .bounds import BoundEstimates, estimate_bounds, log_weights
from .compiled import CompiledLoss
from .data import Dataset, load_dataset
from .errors import PyroVAEError
from .guides import GUIDES, make_flow
from .likelihoods import LIKELIHOODS, make_likelihood
from .models import (ADGM, GMVAE, IWAE, M1M2, MODELS, SSVAE, VAE, Family, GMVAEConfig, NetsConfig, SSVAEConfig, VAEConfig,
                     ADGMConfig, M1M2Config, build_model)
from .nets import DECODERS, ENCODERS
from .objectives import OBJECTIVES, ObjectiveSpec, RenyiObjective, make_objective
from .train import Run, RunConfig, TrainConfig, fit, load_run, resolve, resume

pyro.settings.set(module_local_params=True)

__version__ = "0.1.0"
__all__ = [
    "ADGM", "ADGMConfig", "BoundEstimates", "build_model", "CompiledLoss", "Dataset", "DECODERS", "ENCODERS", "estimate_bounds", "Family", "fit",
    "GMVAE", "GUIDES", "GMVAEConfig", "IWAE", "LIKELIHOODS", "load_dataset", "M1M2", "M1M2Config", "load_run", "log_weights",
    "make_flow", "make_likelihood", "make_objective", "MODELS", "NetsConfig", "OBJECTIVES", "ObjectiveSpec",
    "PyroVAEError", "RenyiObjective", "resolve", "resume", "Run", "RunConfig", "SSVAE", "SSVAEConfig", "TrainConfig", "VAE",
    "VAEConfig",
]
