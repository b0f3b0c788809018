"""A model whose log p(x) is exact: the linear-Gaussian (probabilistic PCA) pair that the
tests and the calibration experiment check the estimators against.

    z ~ N(0, I_d),   x | z ~ N(W z + mu, s^2 I_D),   so  x ~ N(mu, W W^T + s^2 I_D),

with the exact posterior N(A (x - mu), Sigma), Sigma = (I + W^T W / s^2)^-1,
A = Sigma W^T / s^2. The guide is a diagonal Gaussian with mean ``shrink * A (x - mu)`` and
standard deviations ``width`` times the posterior's marginal ones: ``width < 1`` makes the
importance weights heavy-tailed, with Pareto shape k = the largest eigenvalue of
I - S Sigma^-1 S (S the guide's diagonal standard deviations), when the mean is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch


@dataclass
class LinearGaussian:
    """The pair and the quantities the checks need."""

    model: Callable[[torch.Tensor], None]
    guide: Callable[[torch.Tensor], None]
    marginal: dist.MultivariateNormal  # p(x), exact
    W: torch.Tensor
    mu: torch.Tensor
    s: float
    posterior_cov: torch.Tensor
    guide_matrix: torch.Tensor  # the guide's mean is guide_matrix @ (x - mu)
    guide_sd: torch.Tensor
    k: float  # Pareto shape of the weights' tail (meaningful for shrink = 1)


def linear_gaussian(seed: int = 1, width: float = 1.0, shrink: float = 1.0, x_dim: int = 5,
                    z_dim: int = 2, s: float = 0.7) -> LinearGaussian:
    """The pair with W and mu drawn from ``seed`` (W first, then mu)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(x_dim, z_dim, generator=g)
    mu = torch.randn(x_dim, generator=g)
    cov = torch.linalg.inv(torch.eye(z_dim) + W.T @ W / s**2)
    A = cov @ W.T / s**2 * shrink
    sd = cov.diagonal().sqrt() * width
    S = torch.diag(sd)
    k = torch.linalg.eigvalsh(torch.eye(z_dim) - S @ torch.linalg.inv(cov) @ S).max().item()

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + mu, s).to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x - mu) @ A.T, sd).to_event(1))

    marginal = dist.MultivariateNormal(mu, W @ W.T + s**2 * torch.eye(x_dim))
    return LinearGaussian(model, guide, marginal, W, mu, s, cov, A, sd, k)
