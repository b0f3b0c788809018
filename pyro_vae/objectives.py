"""ELBO flavours by name, and the objectives that are not an ELBO's gradient (wake-sleep).

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
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO

from .bounds import guide_log_density, importance_traces, importance_traces_with_model, log_weights
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
class ScoreFunctionELBO(TraceGraph_ELBO):
    """Pyro's ``TraceGraph_ELBO`` with a ``differentiable_loss``: the ELBO whose gradient for
    non-reparameterized guide sites is the score function, Rao-Blackwellized over the
    sites downstream of each and reduced by the baselines a guide declares in its sites'
    ``infer["baseline"]`` (their squared-error loss is part of the gradient, not of the
    value). The value is minus the ELBO."""

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return surrogate + (-elbo - surrogate).detach()


class WakeSleepObjective(ELBO):
    """Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019) with per-datapoint
    weights, and wake-sleep (Hinton et al. 1995) as its k = 1, sleep-only case.

    For each datapoint x, k draws h_i ~ q(h | x) (cut from the graph: nothing is
    reparameterized) and log w_i = log p(x, h_i) - log q(h_i | x), normalised over the k
    draws of that datapoint alone, w~_i = softmax(log w)_i:

    - wake-theta: sum_i w~_i grad_theta log p(x, h_i), the IWAE-k gradient for the model;
    - wake-phi: sum_i w~_i grad_phi log q(h_i | x), a self-normalised estimate of
      -grad_phi KL(p(h | x) || q(h | x));
    - sleep-phi: grad_phi log q(h' | x') for (x', h') drawn from the model, one per row.

    The guide's gradient is ``insomnia`` x wake-phi + (1 - insomnia) x sleep-phi. One
    surrogate carries all three (the weights detached), so the training loop's backward
    gives them; its value is minus the IWAE-k bound (the ELBO at k = 1), summed over the
    batch. Pyro's ``ReweightedWakeSleep`` normalises over particles of the whole batch's
    summed log-densities instead, which minibatches cannot use.

    The sleep phase runs the model with its observed sites drawn (``poutine.uncondition``)
    and the guide on the drawn x with its latent sites replayed from the model's draws: it
    needs a model with one observed site, of x's shape, whose latent sites the guide
    names alike.
    """

    untraceable_reason = "the sleep phase's draws from the model are not traced"

    def __init__(self, num_particles: int = 5, insomnia: float = 1.0, max_plate_nesting: int = 1):
        if not 0 <= insomnia <= 1:
            raise ConfigError(f"{{insomnia}} must be from 0 to 1, got {insomnia}", insomnia=Flag("insomnia"))
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.insomnia = insomnia
        self.traceable = insomnia == 1  # for ``compiled``: the sleep phase is not traced
        self._model_checked = False

    def wake(self, model: Callable, guide: Callable, x: torch.Tensor, *args: Any,
             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_w, log_p, log_q)`` of the wake phase's draws, each (particles, batch):
        log_p carries the model's gradient, log_q the guide's, log_w both."""
        log_w, _, guide_trace, model_trace = importance_traces_with_model(
            model, guide, x, self.num_particles, *args, stop_draws=True, max_plate_nesting=self.max_plate_nesting,
            **kwargs)
        if not self._model_checked:
            if not any(s["fn"].log_prob(s["value"]).requires_grad for s in model_trace.nodes.values()
                       if s["type"] == "sample"):
                raise ConfigError("wake-sleep learns the model's parameters, and this model has none")
            self._model_checked = True
        log_q = guide_log_density(guide_trace)
        return log_w, log_w + log_q, log_q

    def sleep(self, model: Callable, guide: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """log q(h' | x') of one draw (x', h') from the model per row of ``x``, (batch,)."""
        with poutine.block():
            dream = poutine.trace(poutine.uncondition(model)).get_trace(x, *args, **kwargs)
        observed = [s for s in dream.nodes.values() if s["type"] == "sample" and s["infer"].get("was_observed")]
        if len(observed) != 1 or observed[0]["value"].shape != x.shape:
            raise ConfigError("the sleep phase needs a model with one observed site of the data's shape; "
                              "use {insomnia}", insomnia=Flag("insomnia", 1.0))
        for site in dream.nodes.values():
            if site["type"] == "sample":
                site["value"] = site["value"].detach()
        x_dream = observed[0]["value"]
        guide_trace = poutine.trace(poutine.replay(guide, trace=dream)).get_trace(x_dream, *args, **kwargs)
        return guide_log_density(guide_trace)

    def differentiable_loss(self, model: Callable, guide: Callable, x: torch.Tensor, *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        log_w, log_p, log_q = self.wake(model, guide, x, *args, **kwargs)
        weights = torch.softmax(log_w, 0).detach()  # per datapoint: normalised over its own draws
        surrogate = (weights * log_p).sum(0)
        if self.insomnia > 0:
            surrogate = surrogate + self.insomnia * (weights * log_q).sum(0)
        if self.insomnia < 1:
            surrogate = surrogate + (1 - self.insomnia) * self.sleep(model, guide, x, *args, **kwargs)
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)
        return -(surrogate + (bound - surrogate).detach()).sum()

    def loss(self, model: Callable, guide: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> float:
        """Minus the IWAE-k bound summed over the batch, as a float."""
        with torch.no_grad():
            log_w, _ = log_weights(model, guide, x, self.num_particles, *args,
                                   max_plate_nesting=self.max_plate_nesting, **kwargs)
            return -(torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum().item()

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss, after ``backward`` of the surrogate: what Pyro's ``SVI`` calls."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def _get_trace(self, model: Callable, guide: Callable, args: Any, kwargs: Any) -> Any:
        raise NotImplementedError("wake-sleep is computed from importance_traces, not from traces one particle "
                                  "at a time")


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective with the settings it carries: whether it takes ``--alpha`` or
    ``--insomnia``, whether a KL weight (``--beta``, ``--kl-warmup``) means anything for it,
    whether the guide must be reparameterized, the particles it needs (at least
    ``min_particles``; exactly ``fixed_particles`` where set; ``default_particles``, where
    set, replaces the family's default), and how to build it for ``particles`` samples per
    datapoint."""

    name: str
    summary: str
    build: Callable[..., Any]
    uses_alpha: bool = False
    allows_kl_weight: bool = True  # False for single importance-weighted bounds and the GAN game
    kl_weight_refusal: str = ("is a single importance-weighted bound: a KL weight inside its logsumexp "
                              "would make it bound nothing")
    needs_reparameterized_guide: bool = False
    flow_refusal: str = ""  # why a flow guide (``--guide`` other than diagonal) cannot be used
    flow_alternative: str | None = None  # the objective to use instead, then
    uses_insomnia: bool = False
    min_particles: int = 1
    fixed_particles: int | None = None
    default_particles: int | None = None
    trains_global_latents: bool = False  # a latent outside the data plate (a Bayesian network's weights)

    def check(self, alpha: float, beta: float, kl_warmup: float, particles: int | None = None,
              insomnia: float = 1.0) -> None:
        """Refuse settings that this objective cannot use, naming the option (the ranges of
        each setting alone are ``TrainConfig``'s fields)."""
        if self.uses_alpha and not 0 < alpha < 1:
            raise ConfigError(f"{{alpha}} must lie in (0, 1) for {{objective}}, got {alpha}",
                              alpha=Flag("alpha"), objective=Flag("objective", self.name))
        if not self.allows_kl_weight and (beta != 1 or kl_warmup != 0):
            raise ConfigError(
                f"{{objective}} {self.kl_weight_refusal}, so {{beta}} and {{kl_warmup}} cannot be used with it",
                objective=Flag("objective", self.name), beta=Flag("beta"), kl_warmup=Flag("kl_warmup"))
        self.check_particles(particles, insomnia)

    def check_particles(self, particles: int | None, insomnia: float = 1.0) -> None:
        """Refuse a number of particles, or an ``insomnia``, that this objective cannot use."""
        if not self.uses_insomnia and insomnia != 1:
            raise ConfigError("{insomnia} mixes the guide's wake and sleep phases of {rws}; {objective} has none",
                              insomnia=Flag("insomnia"), rws=Flag("objective", "rws"),
                              objective=Flag("objective", self.name))
        if particles is not None and self.fixed_particles is not None and particles != self.fixed_particles:
            raise ConfigError(f"{{objective}} takes {{particles}}; got {particles}",
                              objective=Flag("objective", self.name), particles=Flag("particles", self.fixed_particles))
        if particles is not None and particles < self.min_particles:
            raise ConfigError(f"{{objective}} needs {{particles}} of at least {self.min_particles} (its weights are "
                              f"normalised over them), got {particles}",
                              objective=Flag("objective", self.name), particles=Flag("particles"))

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
_NO_INVERSE = ("it scores draws cut from the graph and the model's own draws under the guide, which for a flow "
               "goes through the flow's inverse, and planar, radial and Sylvester flows have none")

OBJECTIVES: dict[str, ObjectiveSpec] = {spec.name: spec for spec in (
    ObjectiveSpec("meanfield", "TraceMeanField_ELBO: the ELBO with the analytic KL where one is registered",
                  _elbo(TraceMeanField_ELBO), trains_global_latents=True,
                  flow_refusal="a flow has no analytic KL to the prior, and TraceMeanField_ELBO would silently "
                               "estimate it by Monte Carlo, which is the trace objective",
                  flow_alternative="trace"),
    ObjectiveSpec("trace", "Trace_ELBO: Monte Carlo estimate of the whole ELBO", _elbo(Trace_ELBO),
                  trains_global_latents=True),
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
    ObjectiveSpec("tracegraph", "TraceGraph_ELBO: the ELBO with score-function gradients, Rao-Blackwellized, "
                  "with the guide's baselines", trains_global_latents=True,
                  # particles one after another: a baseline's shape is that of one particle's log-density
                  build=lambda k, alpha: ScoreFunctionELBO(num_particles=k, max_plate_nesting=1)),
    ObjectiveSpec("rws", "reweighted wake-sleep with k particles per datapoint: the iwae gradient for the model, "
                  "wake (and, by --insomnia, sleep) phases for the guide", lambda k, alpha, insomnia:
                  WakeSleepObjective(k, insomnia), allows_kl_weight=False, uses_insomnia=True, min_particles=2,
                  default_particles=5, flow_refusal=_NO_INVERSE, flow_alternative="iwae"),
    ObjectiveSpec("wake-sleep", "wake-sleep: one draw per datapoint for the model, the sleep phase for the guide",
                  lambda k, alpha: WakeSleepObjective(1, 0.0), allows_kl_weight=False, fixed_particles=1,
                  default_particles=1, flow_refusal=_NO_INVERSE, flow_alternative="trace"),
)}


def objective_spec(name: str) -> ObjectiveSpec:
    """Look an objective up by name, with the valid names in the error."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None


def make_objective(name: str, particles: int = 1, alpha: float = 0.5, insomnia: float = 1.0) -> ELBO:
    """Build the flavour ``name`` with ``particles`` samples per datapoint (averaged for
    the ELBOs, importance-weighted for ``iwae``, ``renyi`` and ``rws``; ``alpha`` is
    renyi's, ``insomnia`` rws's)."""
    spec = objective_spec(name)
    if particles < 1:
        raise ConfigError(f"{{particles}} must be at least 1, got {particles}", particles=Flag("particles"))
    spec.check_particles(particles, insomnia)
    return spec.build(particles, alpha, insomnia) if spec.uses_insomnia else spec.build(particles, alpha)
