"""pyro_vae: variational autoencoders as Pyro model/guide pairs, with honest bounds.

    from pyro_vae import VAE, TrainConfig, fit, load_run, estimate_bounds

Importing the package changes no Pyro setting. A family's ``model`` and ``guide`` train
with Pyro's ``SVI`` and ``pyro.optim``, with Pyro's ``ELBOModule`` and a torch optimizer,
or with the library's own loop (``fit``, ``CompiledLoss``); each family's parameters have
a name of their own in Pyro's parameter store, so two models never share a weight
(``pair``).
"""

from .bounds import BoundEstimates, estimate_bounds, log_weights
from .compiled import CompiledLoss
from .data import Dataset, load_dataset
from .errors import PyroVAEError
from .guides import GUIDES, make_flow
from .likelihoods import LIKELIHOODS, make_likelihood
from .models import (ADGM, GMVAE, IWAE, M1M2, MODELS, SSVAE, VAE, Family, GMVAEConfig, NetsConfig, SSVAEConfig, VAEConfig,
                     ADGMConfig, M1M2Config, build_model)
from .nets import DECODERS, ENCODERS
from .pair import own_parameters
from .objectives import OBJECTIVES, ObjectiveSpec, RenyiObjective, make_objective
from .train import Run, RunConfig, TrainConfig, fit, load_run, resolve, resume

__version__ = "0.1.0"
__all__ = [
    "ADGM", "ADGMConfig", "BoundEstimates", "build_model", "CompiledLoss", "Dataset", "DECODERS", "ENCODERS", "estimate_bounds", "Family", "fit",
    "GMVAE", "GUIDES", "GMVAEConfig", "IWAE", "LIKELIHOODS", "load_dataset", "M1M2", "M1M2Config", "load_run", "log_weights",
    "make_flow", "make_likelihood", "make_objective", "MODELS", "NetsConfig", "OBJECTIVES", "ObjectiveSpec", "own_parameters",
    "PyroVAEError", "RenyiObjective", "resolve", "resume", "Run", "RunConfig", "SSVAE", "SSVAEConfig", "TrainConfig", "VAE",
    "VAEConfig",
]
