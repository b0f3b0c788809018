"""ELBO flavours by name.

Each entry builds an object with Pyro's ELBO interface (``loss`` and
``differentiable_loss``); the training loop runs ``backward`` itself, so any torch
optimizer, scheduler or gradient clipping applies, and the networks need no Pyro
parameter store.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from .bounds import log_weights
from .errors import ConfigError


class RenyiObjective:
    """The Renyi bound of Li & Turner 2016 with k particles, per datapoint,

        L_alpha = 1 / (1 - alpha) * log (1/k) sum_k w_k^(1 - alpha),

    summed over the batch. alpha = 0 is the importance-weighted bound of Burda et al.
    2016 (IWAE); as alpha -> 1 it tends to the ELBO. Built on ``bounds.log_weights``, so
    variables a model marks for parallel enumeration (the GMVAE's component) are summed
    out exactly inside each weight, where Pyro's RenyiELBO would sample them; on models
    without them it agrees with RenyiELBO draw for draw (tested). Log-densities are
    unscaled: a KL weight or warm-up has no meaning inside the logsumexp, and
    ``TrainConfig.check`` refuses them with these objectives.
    """

    def __init__(self, num_particles: int = 1, alpha: float = 0.0, max_plate_nesting: int = 1):
        if not 0 <= alpha < 1:
            raise ConfigError(f"--alpha must lie in [0, 1) for a Renyi bound, got {alpha}")
        self.num_particles = num_particles
        self.alpha = alpha
        self.max_plate_nesting = max_plate_nesting

    def differentiable_loss(self, model: Callable, guide: Callable, x: torch.Tensor, *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        """Minus the bound summed over the batch, differentiable through the reparameterized draws."""
        log_w, _ = log_weights(model, guide, x, self.num_particles, *args,
                               max_plate_nesting=self.max_plate_nesting, **kwargs)
        scaled = (1 - self.alpha) * log_w
        return -((torch.logsumexp(scaled, 0) - math.log(self.num_particles)) / (1 - self.alpha)).sum()

    def loss(self, model: Callable, guide: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> float:
        """Minus the bound summed over the batch, as a float."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, x, *args, **kwargs).item()


# max_plate_nesting=1: every model keeps its latents inside one "data" plate.
OBJECTIVES: dict[str, Callable[[int, float], ELBO | RenyiObjective]] = {
    # analytic KL where one is registered (Gaussian guide to Gaussian prior)
    "meanfield": lambda k, alpha: TraceMeanField_ELBO(
        num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1
    ),
    # Monte Carlo estimate of the whole ELBO
    "trace": lambda k, alpha: Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1),
    # discrete sites marked for parallel enumeration are summed out exactly
    "enum": lambda k, alpha: TraceEnum_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1),
    # the importance-weighted bound with k particles (enumerated sites summed out exactly)
    "iwae": lambda k, alpha: RenyiObjective(k, 0.0),
    # the Renyi bound with k particles and alpha in (0, 1), between IWAE and the ELBO
    "renyi": lambda k, alpha: RenyiObjective(k, alpha),
}

# objectives whose value is not a sum of per-site terms, so no site may carry a scale
UNSCALED_OBJECTIVES = ("iwae", "renyi")


def make_objective(name: str, particles: int = 1, alpha: float = 0.5) -> ELBO | RenyiObjective:
    """Build the flavour ``name`` with ``particles`` samples per datapoint (averaged for
    the ELBOs, importance-weighted for ``iwae`` and ``renyi``; ``alpha`` is renyi's)."""
    if particles < 1:
        raise ConfigError(f"--particles must be at least 1, got {particles}")
    try:
        factory = OBJECTIVES[name]
    except KeyError:
        raise ConfigError(
            f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}"
        ) from None
    return factory(particles, alpha)
