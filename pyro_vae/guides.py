"""Posterior families q(z | x) by name: the diagonal Gaussian and amortized normalizing flows.

Every guide starts from the encoder's diagonal Gaussian N(mu(x), diag sigma(x)^2) and
pushes it through K invertible transforms f_K o ... o f_1 whose parameters are computed
from x, through the encoder's features h(x) (Rezende & Mohamed 2015, section 4.2). For
z_0 from the base and z_K = f_K(... f_1(z_0)),

    log q(z_K | x) = log N(z_0; mu(x), sigma(x)^2) - sum_k log |det df_k / dz_{k-1}|,

which is what ``TransformedDistribution.log_prob`` computes at a value it has just drawn
(planar, radial and Sylvester maps have no closed-form inverse: a draw is scored through
the cache of the forward pass, which is what a guide trace needs).

- ``diagonal``: no transform, no parameter (a model built with it is the plain VAE).
- ``planar`` (Pyro's ``ConditionalPlanar``): f(z) = z + u_hat tanh(w^T z + b), with
  u_hat = u + (m(w^T u) - w^T u) w / |w|^2 and m(a) = -1 + softplus(a), so that
  w^T u_hat > -1 and f is invertible (the paper's appendix A.1).
- ``radial`` (Pyro's ``ConditionalRadial``): f(z) = z + beta h(alpha, r) (z - z_0),
  h = 1 / (alpha + r), r = |z - z_0|, with alpha = softplus(.) > 0 and
  beta = -alpha + softplus(.) >= -alpha (appendix A.2).
- ``iaf`` (Pyro's ``ConditionalAffineAutoregressive``, stable form): Kingma et al. 2016,
  z' = s * z + (1 - s) * m with (m, logit s) from a masked autoregressive network of z
  that also takes the encoder's features h as its context; the order of the
  autoregression is reversed at every other step.
- ``sylvester``: the triangular Sylvester flow of van den Berg et al. 2018,
  f(z) = z + Q R tanh(R~ Q^T z + b) with R, R~ upper triangular and Q the identity or the
  reversal permutation (alternating), so that
  log |det| = sum_i log |1 + tanh'(a_i) R~_ii R_ii|, a = R~ Q^T z + b;
  the diagonals are tanh(.) so R~_ii R_ii > -1 and f is invertible.

Parameters are amortized by one linear layer on the features per transform (a masked
network for ``iaf``), initialised so that each transform starts at (planar, radial,
sylvester) or near (iaf: s = sigmoid(2) everywhere, m the network's output) the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive, ConditionalPlanar, ConditionalRadial
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.distributions import Transform, constraints
from torch.nn import functional as F

from .errors import ConfigError, Flag

SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(SOFTPLUS_ONE) = 1


class Flow(nn.Module):
    """K amortized transforms of R^z_dim conditioned on encoder features of ``features``
    values. ``transforms(h)`` gives the transforms for features h (..., features);
    ``distribution(base, h)`` the base pushed through them."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def transforms(self, h: torch.Tensor) -> list[Transform]:
        return [layer.condition(h) for layer in self.layers]

    def distribution(self, base: dist.Distribution, h: torch.Tensor) -> dist.Distribution:
        """q(z | x): the base (event dim 1) through the transforms; the base itself if none."""
        if not self.layers:
            return base
        return dist.TransformedDistribution(base, self.transforms(h))

    def push(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """z through the transforms (e.g. the base's mean, for a reconstruction)."""
        for t in self.transforms(h):
            z = t(z)
        return z


class _Heads(nn.Module):
    """A linear layer from features to a transform's raw parameters, split into pieces of
    the given sizes, with a zero weight and the given bias at the start: every datapoint
    begins with the same transform, which training then amortizes."""

    def __init__(self, features: int, bias: torch.Tensor, sizes: tuple[int, ...],
                 finish: Callable[..., tuple[torch.Tensor, ...]] | None = None):
        super().__init__()
        self.linear = nn.Linear(features, bias.numel())
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(bias)
        self.sizes = sizes
        self.finish = finish

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = self.linear(h).split(self.sizes, -1)
        return self.finish(*parts) if self.finish else parts


def planar(features: int, z_dim: int, length: int) -> Flow:
    """Planar flow: raw (b, u, w) from the features. w starts as a random direction and
    u as w log(e - 1) / |w|^2, where u_hat = 0: the identity."""
    layers = []
    for _ in range(length):
        w = torch.randn(z_dim) / math.sqrt(z_dim)
        u = w * SOFTPLUS_ONE / w.pow(2).sum()
        layers.append(ConditionalPlanar(_Heads(features, torch.cat([torch.zeros(1), u, w]), (1, z_dim, z_dim))))
    return Flow(layers)


def radial(features: int, z_dim: int, length: int) -> Flow:
    """Radial flow: raw (z_0, alpha', beta') from the features; alpha' and beta' start at
    log(e - 1), so alpha = 1 and beta = -alpha + softplus(beta') = 0: the identity. The
    reference points z_0 start as standard normal draws."""
    layers = []
    for _ in range(length):
        bias = torch.cat([torch.randn(z_dim), torch.full((2,), SOFTPLUS_ONE)])
        layers.append(ConditionalRadial(_Heads(features, bias, (z_dim, 1, 1))))
    return Flow(layers)


def iaf(features: int, z_dim: int, length: int) -> Flow:
    """Inverse autoregressive flow: one masked network per step, of one hidden layer as
    wide as the features (at least z_dim), with the features as context."""
    width = max(features, z_dim)
    layers = []
    for k in range(length):
        order = torch.arange(z_dim) if k % 2 == 0 else torch.arange(z_dim).flip(0)
        arn = ConditionalAutoRegressiveNN(z_dim, features, [width], permutation=order)
        layers.append(ConditionalAffineAutoregressive(arn, stable=True))
    return Flow(layers)


class ConditionedSylvester(Transform):
    """f(z) = z + Q R tanh(R~ Q^T z + b) for given R, R~ (..., M, M) upper triangular,
    b (..., M), and Q a permutation of the coordinates (``order``)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, r: torch.Tensor, r_tilde: torch.Tensor, b: torch.Tensor, order: torch.Tensor):
        super().__init__(cache_size=1)
        self.r, self.r_tilde, self.b, self.order = r, r_tilde, b, order
        self.inverse_order = torch.argsort(order)

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        # a = R~ Q^T x + b, Q^T x being x in the permuted order
        return (self.r_tilde @ x[..., self.order].unsqueeze(-1)).squeeze(-1) + self.b

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        step = (self.r @ torch.tanh(self._pre(x)).unsqueeze(-1)).squeeze(-1)
        return x + step[..., self.inverse_order]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise KeyError("a Sylvester flow has no closed-form inverse: only values it has just produced "
                       "can be scored")

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """By Sylvester's identity det(I + Q R D R~ Q^T) = det(I + D R~ R), D = diag tanh'(a),
        and D R~ R is upper triangular with diagonal tanh'(a_i) R~_ii R_ii."""
        slope = 1 - torch.tanh(self._pre(x)).pow(2)
        diagonal = self.r_tilde.diagonal(dim1=-2, dim2=-1) * self.r.diagonal(dim1=-2, dim2=-1)
        return torch.log1p(slope * diagonal).sum(-1)


class ConditionalSylvester(nn.Module):
    """Amortized triangular Sylvester transform: strictly upper parts of R and R~, their
    diagonals (through tanh, so that R~_ii R_ii lies in (-1, 1)) and b from one linear
    layer on the features. Starts at R = 0 (the identity), R~ with tanh(1) on its diagonal,
    b = 0."""

    def __init__(self, features: int, z_dim: int, reverse: bool):
        super().__init__()
        self.z_dim = z_dim
        self.register_buffer("rows", torch.triu_indices(z_dim, z_dim, 1)[0], persistent=False)
        self.register_buffer("cols", torch.triu_indices(z_dim, z_dim, 1)[1], persistent=False)
        order = torch.arange(z_dim).flip(0) if reverse else torch.arange(z_dim)
        self.register_buffer("order", order, persistent=False)
        off = z_dim * (z_dim - 1) // 2
        bias = torch.cat([torch.zeros(off), torch.zeros(z_dim), torch.zeros(off), torch.ones(z_dim),
                          torch.zeros(z_dim)])
        self.heads = _Heads(features, bias, (off, z_dim, off, z_dim, z_dim))

    def _triangular(self, upper: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        m = upper.new_zeros(*upper.shape[:-1], self.z_dim, self.z_dim)
        m[..., self.rows, self.cols] = upper
        return m + torch.diag_embed(torch.tanh(diagonal))

    def condition(self, h: torch.Tensor) -> ConditionedSylvester:
        r_up, r_diag, rt_up, rt_diag, b = self.heads(h)
        return ConditionedSylvester(self._triangular(r_up, r_diag), self._triangular(rt_up, rt_diag), b,
                                    self.order)


def sylvester(features: int, z_dim: int, length: int) -> Flow:
    """Triangular Sylvester flow, Q alternating between the identity and the reversal."""
    return Flow([ConditionalSylvester(features, z_dim, reverse=k % 2 == 1) for k in range(length)])


def diagonal(features: int, z_dim: int, length: int) -> Flow:
    """No transform: q(z | x) is the encoder's Gaussian. No parameters, no random draws."""
    return Flow([])


GUIDES: dict[str, Callable[[int, int, int], Flow]] = {
    "diagonal": diagonal, "planar": planar, "radial": radial, "iaf": iaf, "sylvester": sylvester,
}


def make_flow(name: str, features: int, z_dim: int, length: int) -> Flow:
    """The guide ``name`` (``--guide``) with ``length`` transforms (``--flow-length``) of
    R^z_dim conditioned on ``features`` encoder features."""
    try:
        build = GUIDES[name]
    except KeyError:
        raise ConfigError(f"unknown {{guide}} {name!r}; choose one of {', '.join(GUIDES)}",
                          guide=Flag("guide")) from None
    return build(features, z_dim, length)


def is_flow(fn: Any) -> bool:
    """Whether a guide site's distribution is a flow (carries log-determinants)."""
    return isinstance(fn, torch.distributions.TransformedDistribution)
