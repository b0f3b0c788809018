"""Bayesian networks: weights as global latent variables, with the local reparameterization
trick (Kingma, Salimans & Welling 2015).

Every weight and bias w of a ``BayesianMLP`` has the prior N(0, sigma_p^2) and a mean-field
Gaussian posterior q(w) = N(mu, sigma^2). ``sample_weights`` draws them as Pyro sample sites
outside the data plate, marked ``infer[GLOBAL]``, with the prior in the model and q in the
guide. Both carry ``poutine.scale(batch / N)`` for a training set of N items: a step's
ELBO then counts the weights' KL(q || p) at batch / N, so N / batch times a step's
objective is an unbiased estimate of the whole training set's ELBO,

    sum_i E_q[log p(x_i | z_i, W)] - KL(q(z_i | x_i) || p(z_i)) - KL(q(W) || p(W)),

and an epoch of steps counts the weights' KL once. ``TraceMeanField_ELBO`` takes that KL
in closed form (Gaussian to Gaussian).

What the network's forward pass does with the draws while training (``sampling``):

- ``shared``: one weight draw for the whole minibatch (the sites' values);
- ``local``: the pre-activations of each datapoint drawn from their Gaussian given the
  layer's input a, N(a mu^T, a^2 (sigma^2)^T), which is the distribution that a weight draw
  gives them, one independent draw per datapoint and layer, at the cost of one draw per
  unit: the same expectation as ``shared``, with a variance that falls with the minibatch;
- ``independent``: a weight draw of its own for every datapoint (the slow reference
  estimator that ``local`` is equivalent to in distribution).

Out of training mode (evaluation, pictures) the network always uses the sites' draws, one
per particle, shared by the datapoints. Without draws it uses the posterior means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, Flag
from .keyed import GLOBAL
from .nets import activation

WEIGHT_SAMPLINGS = ("shared", "local", "independent")
#: the posterior scale every weight starts at (softplus of the raw parameter)
INITIAL_SCALE = 1e-3

Weights = list[tuple[torch.Tensor, torch.Tensor]]


def _softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


def _linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """a (..., B, in) times a weight (out, in), or one weight per particle (K, 1, out, in)
    as the particle plate draws it, plus the bias (out,) or (K, 1, out)."""
    if weight.dim() == 2:
        return F.linear(a, weight, bias)
    # the data plate's singleton dimension of the weight: one weight per particle, shared by the batch
    return torch.matmul(a, weight.squeeze(-3).transpose(-1, -2)) + bias


class BayesianLinear(nn.Module):
    """A linear layer whose weight and bias have a mean-field Gaussian posterior: locations
    initialised as ``nn.Linear``'s weights, scales at ``INITIAL_SCALE``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        init = nn.Linear(n_in, n_out)
        self.loc = nn.Parameter(init.weight.detach().clone())
        self.bias_loc = nn.Parameter(init.bias.detach().clone())
        self.raw_scale = nn.Parameter(torch.full((n_out, n_in), _softplus_inverse(INITIAL_SCALE)))
        self.bias_raw_scale = nn.Parameter(torch.full((n_out,), _softplus_inverse(INITIAL_SCALE)))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale)

    @property
    def bias_scale(self) -> torch.Tensor:
        return F.softplus(self.bias_raw_scale)

    def posterior(self) -> tuple[dist.Distribution, dist.Distribution]:
        """q of the weight (event shape (out, in)) and of the bias (event shape (out,))."""
        return (dist.Normal(self.loc, self.scale).to_event(2), dist.Normal(self.bias_loc, self.bias_scale).to_event(1))

    def prior(self, scale: float) -> tuple[dist.Distribution, dist.Distribution]:
        """N(0, scale^2) for every weight and bias."""
        return (dist.Normal(torch.zeros_like(self.loc), scale).to_event(2),
                dist.Normal(torch.zeros_like(self.bias_loc), scale).to_event(1))

    def local(self, a: torch.Tensor) -> torch.Tensor:
        """Pre-activations drawn per row of ``a`` from N(a mu^T + mu_b, a^2 (sigma^2)^T + sigma_b^2)."""
        mean = F.linear(a, self.loc, self.bias_loc)
        var = F.linear(a.pow(2), self.scale.pow(2), self.bias_scale.pow(2))
        return mean + var.sqrt() * torch.randn_like(mean)

    def independent(self, a: torch.Tensor) -> torch.Tensor:
        """Pre-activations from a weight draw of each row's own."""
        weight = self.loc + self.scale * torch.randn(*a.shape[:-1], *self.loc.shape, device=a.device)
        bias = self.bias_loc + self.bias_scale * torch.randn(*a.shape[:-1], *self.bias_loc.shape, device=a.device)
        return torch.einsum("...i,...oi->...o", a, weight) + bias


class BayesianMLP(nn.Module):
    """A fully connected network of ``BayesianLinear`` layers with ``act`` between them,
    whose weights are the global latents ``NAME.i.weight`` / ``NAME.i.bias`` (``sample_weights``)."""

    def __init__(self, sizes: Sequence[int], act: str, prior_scale: float, sampling: str, name: str):
        super().__init__()
        check_weight_options(prior_scale, sampling)
        self.layers = nn.ModuleList(BayesianLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.acts = nn.ModuleList(activation(act) for _ in sizes[2:])
        self.prior_scale, self.sampling, self.name = prior_scale, sampling, name
        self.register_buffer("data_size", torch.tensor(0, dtype=torch.int64))

    def sample_weights(self, batch: int, posterior: bool) -> Weights:
        """The weights as sample sites outside the data plate: from q (``posterior``, in the
        guide) or from the prior (in the model), scaled by batch / N (by 1 before
        ``data_size`` N is known)."""
        n = int(self.data_size)
        weights = []
        with poutine.scale(scale=batch / n if n else 1.0):
            for i, layer in enumerate(self.layers):
                w_dist, b_dist = layer.posterior() if posterior else layer.prior(self.prior_scale)
                weights.append((pyro.sample(f"{self.name}.{i}.weight", w_dist, infer={GLOBAL: True}),
                                pyro.sample(f"{self.name}.{i}.bias", b_dist, infer={GLOBAL: True})))
        return weights

    def forward(self, a: torch.Tensor, weights: Weights | None = None) -> torch.Tensor:
        """The network on ``a`` with the drawn ``weights`` (as ``sampling`` says while
        training), or with the posterior means when none are given."""
        for i, layer in enumerate(self.layers):
            if weights is None:
                a = F.linear(a, layer.loc, layer.bias_loc)
            elif self.training and self.sampling == "local":
                a = layer.local(a)
            elif self.training and self.sampling == "independent":
                a = layer.independent(a)
            else:
                a = _linear(a, *weights[i])
            if i < len(self.acts):
                a = self.acts[i](a)
        return a

    def kl(self) -> torch.Tensor:
        """KL(q(W) || p(W)) in closed form, summed over every weight and bias."""
        total = torch.zeros(())
        for layer in self.layers:
            for q, p in zip(layer.posterior(), layer.prior(self.prior_scale)):
                total = total + torch.distributions.kl_divergence(q, p)
        return total


class BayesianMLPDecoder(nn.Module):
    """The fully connected decoder (``nets.MLPDecoder``'s shape) with Bayesian weights."""

    def __init__(self, in_dim: int, x_dim: int, params_per_value: int, hidden: Sequence[int], act: str,
                 prior_scale: float, sampling: str):
        super().__init__()
        self.net = BayesianMLP([in_dim, *hidden, params_per_value * x_dim], act, prior_scale, sampling, "decoder")

    def forward(self, z: torch.Tensor, weights: Weights | None = None) -> torch.Tensor:
        return self.net(z, weights)

    @torch.no_grad()
    def init_output_bias(self, bias: torch.Tensor) -> None:
        """Set the location of the output layer's bias (the likelihood's choice)."""
        self.net.layers[-1].bias_loc.copy_(bias)


def check_weight_options(prior_scale: float, sampling: str) -> None:
    """Refuse a prior scale that is not positive, or an unknown way to draw the weights."""
    if not prior_scale > 0:
        raise ConfigError(f"{{weight_prior}} must be positive, got {prior_scale}", weight_prior=Flag("weight_prior"))
    if sampling not in WEIGHT_SAMPLINGS:
        raise ConfigError(f"unknown {{weight_sampling}} {sampling!r}; choose one of {', '.join(WEIGHT_SAMPLINGS)}",
                          weight_sampling=Flag("weight_sampling"))
