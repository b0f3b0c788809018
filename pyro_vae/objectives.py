"""ELBO flavours by name.

Each entry builds an object with Pyro's ELBO interface: ``loss`` and
``differentiable_loss``, which the library's loop uses (it runs ``backward`` itself, so any
torch optimizer, scheduler or gradient clipping applies); ``loss_and_grads``, which Pyro's
``SVI`` calls; and ``objective(model, guide)``, Pyro's ``ELBOModule`` for a torch optimizer.
The importance-weighted objectives are Pyro ``ELBO``s for that reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from pyro.poutine.util import site_is_subsample
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from .bounds import importance_traces, log_weights
from .errors import ConfigError, Flag


class RenyiObjective(ELBO):
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
            raise ConfigError(f"{{alpha}} must lie in [0, 1) for a Renyi bound, got {alpha}", alpha=Flag("alpha"))
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.alpha = alpha

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

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss, after ``backward`` of its differentiable form: what Pyro's ``SVI`` calls."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def _get_trace(self, model: Callable, guide: Callable, args: Any, kwargs: Any) -> Any:
        raise NotImplementedError("the bound is computed from log_weights, not from traces one particle at a time")


class DReGObjective(RenyiObjective):
    """The IWAE bound with the doubly reparameterized gradient estimator of Tucker et al.
    2018 for the guide (Pyro has none: pyro#2598).

    With normalised weights w~_k and log q's parameters held fixed, the guide's gradient
    is sum_k w~_k^2 d(log w_k)/dz_k dz_k/dphi instead of the standard estimator's
    sum_k w~_k d(log w_k)/dphi: the same expectation, without the score-function term
    whose variance grows with k (Rainforth et al. 2018). The model's gradient is the
    standard one, sum_k w~_k d(log p(x, z_k))/dtheta.

    One backward pass gives both: the surrogate sum_k w~_k log w_k (weights detached, log q
    with detached parameters) has the model's gradient, and a hook on each draw z_k scales
    the gradient flowing back into the guide by w~_k once more. The value is the IWAE
    bound. Guides that enumerate (the SSVAE's) are refused: their weights mix draws.
    """

    #: for ``compiled``: the hooks on the draws are not part of a trace
    traceable = False
    untraceable_reason = "the dreg objective's gradient hooks on the draws cannot be traced"

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1):
        super().__init__(num_particles, 0.0, max_plate_nesting)

    def differentiable_loss(self, model: Callable, guide: Callable, x: torch.Tensor, *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        log_w, _, guide_trace = importance_traces(model, guide, x, self.num_particles, *args,
                                                  max_plate_nesting=self.max_plate_nesting,
                                                  stop_guide_params=True, **kwargs)
        weights = torch.softmax(log_w, 0).detach()  # (particles, batch)
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if "_enumerate_dim" in site["infer"] or not site["fn"].has_rsample:
                raise ConfigError(f"the dreg objective needs reparameterized, non-enumerated guide "
                                  f"sites; {name!r} is not")
            z = site["value"]
            if z.requires_grad:
                extra = z.dim() - weights.dim()
                z.register_hook(lambda g, w=weights.reshape(weights.shape + (1,) * extra): g * w)
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)
        surrogate = (weights * log_w).sum(0)
        # value: minus the bound; gradient: minus the surrogate's (with the hooks above)
        return -(surrogate + (bound - surrogate).detach()).sum()


class AdversarialGame:
    """The two players' losses of a GAN (Goodfellow et al. 2014) from the discriminator's
    logits on real images (``real``) and on the generator's (``fake``), summed over the
    batch: the discriminator's cross-entropy -log D(x) - log(1 - D(G(z))), and the
    generator's, either the non-saturating -log D(G(z)) (``minimax=False``, the paper's
    practical choice) or the game's own log(1 - D(G(z))) (``minimax=True``), whose gradient
    vanishes while D rejects G's images confidently, as it does early in training. Not a
    bound: a family that trains on it (``has_density = False``) says so.

    ``traceable = False``: the family's step runs eagerly (it has no Pyro program to trace).
    """

    traceable = False
    untraceable_reason = "the GAN's step is plain torch code, run eagerly"

    def __init__(self, minimax: bool = False):
        self.minimax = minimax

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-real).sum() + F.softplus(fake).sum()

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return -F.softplus(fake).sum() if self.minimax else F.softplus(-fake).sum()


@dataclass(frozen=True)
class ObjectiveSpec:
    """An ELBO flavour with the settings it carries: whether it takes ``--alpha``, whether a
    KL weight (``--beta``, ``--kl-warmup``) means anything for it, whether the guide must be
    reparameterized, and how to build it for ``particles`` samples per datapoint."""

    name: str
    summary: str
    build: Callable[[int, float], Any]
    uses_alpha: bool = False
    allows_kl_weight: bool = True  # False for single importance-weighted bounds and the GAN game
    kl_weight_refusal: str = ("is a single importance-weighted bound: a KL weight inside its logsumexp "
                              "would make it bound nothing")
    needs_reparameterized_guide: bool = False
    flow_refusal: str = ""  # why a flow guide (``--guide`` other than diagonal) cannot be used
    flow_alternative: str | None = None  # the objective to use instead, then

    def check(self, alpha: float, beta: float, kl_warmup: float) -> None:
        """Refuse settings that this objective cannot use, naming the option (the ranges of
        each setting alone are ``TrainConfig``'s fields')."""
        if self.uses_alpha and not 0 < alpha < 1:
            raise ConfigError(f"{{alpha}} must lie in (0, 1) for {{objective}}, got {alpha}",
                              alpha=Flag("alpha"), objective=Flag("objective", self.name))
        if not self.allows_kl_weight and (beta != 1 or kl_warmup != 0):
            raise ConfigError(
                f"{{objective}} {self.kl_weight_refusal}, so {{beta}} and {{kl_warmup}} cannot be used with it",
                objective=Flag("objective", self.name), beta=Flag("beta"), kl_warmup=Flag("kl_warmup"))

    def check_guide(self, guide: str) -> None:
        """Refuse a flow guide this objective cannot use, with the reason and what to use."""
        if guide != "diagonal" and self.flow_refusal:
            instead = "; use {instead}" if self.flow_alternative else ""
            raise ConfigError(f"{{objective}} cannot train {{guide}}: {self.flow_refusal}{instead}",
                              objective=Flag("objective", self.name), guide=Flag("guide", guide),
                              instead=Flag("objective", self.flow_alternative))

    def for_guide(self, guide: str) -> str:
        """This objective's name, or the one that stands in for it with a flow guide (the
        default objective of a family, when a flow replaces its Gaussian guide)."""
        return self.flow_alternative if guide != "diagonal" and self.flow_refusal else self.name


def _elbo(cls: type) -> Callable[[int, float], ELBO]:
    # max_plate_nesting=1: every model keeps its latents inside one "data" plate
    return lambda k, alpha: cls(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)


_GAME_HAS_NO_KL = "is the GAN game, which has no KL term to weight"

OBJECTIVES: dict[str, ObjectiveSpec] = {spec.name: spec for spec in (
    ObjectiveSpec("meanfield", "TraceMeanField_ELBO: the ELBO with the analytic KL where one is registered",
                  _elbo(TraceMeanField_ELBO),
                  flow_refusal="a flow has no analytic KL to the prior, and TraceMeanField_ELBO would silently "
                               "estimate it by Monte Carlo, which is the trace objective",
                  flow_alternative="trace"),
    ObjectiveSpec("trace", "Trace_ELBO: Monte Carlo estimate of the whole ELBO", _elbo(Trace_ELBO)),
    ObjectiveSpec("enum", "TraceEnum_ELBO: sites marked for parallel enumeration summed out exactly",
                  _elbo(TraceEnum_ELBO)),
    ObjectiveSpec("iwae", "importance-weighted bound with k particles, enumerated sites summed out",
                  lambda k, alpha: RenyiObjective(k, 0.0), allows_kl_weight=False),
    ObjectiveSpec("renyi", "Renyi bound with alpha in (0, 1) and k particles, between IWAE and the ELBO",
                  lambda k, alpha: RenyiObjective(k, alpha), uses_alpha=True, allows_kl_weight=False),
    ObjectiveSpec("dreg", "the iwae bound with doubly reparameterized gradients for the guide",
                  lambda k, alpha: DReGObjective(k), allows_kl_weight=False,
                  needs_reparameterized_guide=True,
                  flow_refusal="its guide gradient needs log q(z | x) with every parameter of the guide stopped as "
                               "a function of z, which for a flow goes through the flow's inverse, and planar, "
                               "radial and Sylvester flows have none (not implemented for iaf either)",
                  flow_alternative="iwae"),
    ObjectiveSpec("gan", "the GAN game with the non-saturating generator loss -log D(G(z)) (models without a density)",
                  lambda k, alpha: AdversarialGame(minimax=False), allows_kl_weight=False,
                  kl_weight_refusal=_GAME_HAS_NO_KL),
    ObjectiveSpec("gan-minimax", "the GAN game with the minimax generator loss log(1 - D(G(z))), which stalls "
                  "early (models without a density)", lambda k, alpha: AdversarialGame(minimax=True),
                  allows_kl_weight=False, kl_weight_refusal=_GAME_HAS_NO_KL),
)}


def objective_spec(name: str) -> ObjectiveSpec:
    """Look an objective up by name, with the valid names in the error."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None


def make_objective(name: str, particles: int = 1, alpha: float = 0.5) -> ELBO | RenyiObjective:
    """Build the flavour ``name`` with ``particles`` samples per datapoint (averaged for
    the ELBOs, importance-weighted for ``iwae`` and ``renyi``; ``alpha`` is renyi's)."""
    spec = objective_spec(name)
    if particles < 1:
        raise ConfigError(f"{{particles}} must be at least 1, got {particles}", particles=Flag("particles"))
    return spec.build(particles, alpha)
