"""Encoder and decoder networks shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .likelihoods import BernoulliImage  # noqa: F401  (moved; re-exported for old imports)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    """Return a fresh activation module by name."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


def mlp(sizes: Sequence[int], act: str, final_activation: bool = False) -> nn.Sequential:
    """A stack of linear layers with ``act`` between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """Maps inputs to the location and scale of a diagonal Gaussian.

    The scale goes through softplus (not exp) so that a large pre-activation early in
    training cannot overflow into an infinite variance.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, act: str):
        super().__init__()
        self.body = mlp([in_dim, *hidden], act, final_activation=True)
        width = hidden[-1] if hidden else in_dim
        self.loc = nn.Linear(width, out_dim)
        self.scale = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.loc(h), F.softplus(self.scale(h)) + 1e-6


class BernoulliDecoder(nn.Module):
    """Maps latent codes to the logits of independent Bernoulli pixels."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, act: str):
        super().__init__()
        self.net = mlp([in_dim, *hidden, out_dim], act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @torch.no_grad()
    def init_output_bias(self, pixel_mean: torch.Tensor) -> None:
        """Start the output bias at the logit of the data's mean pixel (Burda et al. 2016),
        so that the first steps model the average image instead of fighting a 0.5 prior."""
        p = pixel_mean.clamp(1e-3, 1 - 1e-3)
        self.net[-1].bias.copy_(torch.log(p) - torch.log1p(-p))
