"""ELBO flavours by name.

Each entry builds a Pyro ELBO; the training loop calls its ``differentiable_loss`` and runs
``backward`` itself, so any torch optimizer, scheduler or gradient clipping applies, and
the networks need no Pyro parameter store.
"""

from __future__ import annotations

from collections.abc import Callable

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from .errors import ConfigError

# max_plate_nesting=1: every model keeps its latents inside one "data" plate.
OBJECTIVES: dict[str, Callable[[int], ELBO]] = {
    # analytic KL where one is registered (Gaussian guide to Gaussian prior)
    "meanfield": lambda k: TraceMeanField_ELBO(
        num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1
    ),
    # Monte Carlo estimate of the whole ELBO
    "trace": lambda k: Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1),
}


def make_objective(name: str, particles: int = 1) -> ELBO:
    """Build the ELBO flavour ``name`` averaged over ``particles`` samples per datapoint."""
    if particles < 1:
        raise ConfigError(f"--particles must be at least 1, got {particles}")
    try:
        factory = OBJECTIVES[name]
    except KeyError:
        raise ConfigError(
            f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}"
        ) from None
    return factory(particles)
