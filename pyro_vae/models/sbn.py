"""The sigmoid belief network (Neal 1992) with a Helmholtz machine's recognition network
(Dayan et al. 1995): layers of binary latent units, as a Pyro model/guide pair.

    h_L ~ Bernoulli(sigmoid(b)),   h_l | h_(l+1) ~ Bernoulli(sigmoid(W_l h_(l+1) + c_l)),
    x | h_1 ~ Bernoulli(sigmoid(W_0 h_1 + c_0)),
    q(h_1 | x) q(h_2 | h_1) ... q(h_L | h_(L-1)), each a factorised Bernoulli of a linear map.

No latent can be reparameterized, so the pair trains on objectives that need none: the
wake-sleep family (``rws``, ``wake-sleep``) and the score-function ELBO (``tracegraph``),
for which every guide layer declares a learned baseline, a linear function of the data,
in its site's ``infer``. The evaluator scores it as any other pair (the guide's discrete
draws are importance samples; nothing is enumerated). Every site lives in the data plate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ..config import option
from ..errors import ConfigError, Flag
from ..likelihoods import LikelihoodConfig, make_likelihood
from .base import Family, Shape

MAX_LAYERS = 3


@dataclass
class SBNConfig:
    """Binary units per layer, from the one next to x up to the top."""

    layers: tuple[int, ...] = option((200,), "binary units per latent layer, comma separated, from the layer next "
                                     f"to x up (1 to {MAX_LAYERS} layers)")

    @property
    def guide(self) -> str:
        """The guide is a factorised Bernoulli per layer: no flow (read by the objectives' checks)."""
        return "diagonal"

    @property
    def likelihood(self) -> str:
        return "bernoulli"


class SBN(Family):
    """Sigmoid belief network of binary layers, factorised Bernoulli guide per layer."""

    Config = SBNConfig
    default_objective = "rws"
    objectives = ("rws", "wake-sleep", "tracegraph")

    def __init__(self, shape: Shape | int, config: SBNConfig | None = None):
        super().__init__(shape, config or SBNConfig())
        sizes = self.config.layers
        self.likelihood = make_likelihood("bernoulli", self.x_dim, LikelihoodConfig())
        self.top_logits = nn.Parameter(torch.zeros(sizes[-1]))
        self.decoder = _OutputLayer(sizes[0], self.x_dim)  # p(x | h_1)
        # generative[l]: p(h_(l+1) | h_(l+2)) in 0-based layers; recognition[l]: q(h_(l+1) | h_l or x)
        self.generative = nn.ModuleList(nn.Linear(sizes[l + 1], sizes[l]) for l in range(len(sizes) - 1))
        self.recognition = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip((self.x_dim, *sizes), sizes))
        self.baselines = nn.ModuleList(nn.Linear(self.x_dim, 1) for _ in sizes)

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        layers = tuple(config.layers)
        if not 1 <= len(layers) <= MAX_LAYERS or min(layers) < 1:
            raise ConfigError(f"{{layers}} must be 1 to {MAX_LAYERS} positive sizes, got {','.join(map(str, layers))}",
                              layers=Flag("layers"))

    def prior(self, batch: int) -> dist.Distribution:
        """p(h_L) of the top layer for ``batch`` datapoints."""
        return dist.Bernoulli(logits=self.top_logits.expand(batch, -1)).to_event(1)

    def model(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """Top layer down to x; ``x`` is (batch, D) of 0/1 values."""
        layers = len(self.config.layers)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=kl_weight):
                h = pyro.sample(f"h{layers}", self.prior(x.shape[0]))
                for l in reversed(range(layers - 1)):
                    h = pyro.sample(f"h{l + 1}", dist.Bernoulli(logits=self.generative[l](h)).to_event(1))
            pyro.sample("x", self.decode(h), obs=x)

    def guide(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """x up to the top layer, each layer with a learned baseline (used by ``tracegraph``)."""
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=kl_weight):
            h = x
            for l, (layer, baseline) in enumerate(zip(self.recognition, self.baselines)):
                h = pyro.sample(f"h{l + 1}", dist.Bernoulli(logits=layer(h)).to_event(1),
                                infer={"baseline": {"nn_baseline": _Squeezed(baseline), "nn_baseline_input": x}})

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(h_1 | x), the bottom layer's factorised Bernoulli."""
        return dist.Bernoulli(logits=self.recognition[0](x)).to_event(1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(h_1 | x)."""
        p = torch.sigmoid(self.recognition[0](x))
        return p, (p * (1 - p)).sqrt()

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` ancestral draws: the pixel probabilities given h_1, or pixels drawn."""
        h = self.prior(n).sample()
        for l in reversed(range(len(self.config.layers) - 1)):
            h = dist.Bernoulli(logits=self.generative[l](h)).sample()
        return self.decode(h).sample() if draw else self.decode_mean(h)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """p(x | h_1) at the mode of q(h_1 | x)."""
        return self.decode_mean((self.recognition[0](x) > 0).to(x.dtype))


class _OutputLayer(nn.Linear):
    """The linear map from h_1 to the pixels' logits, whose bias the likelihood initialises."""

    @torch.no_grad()
    def init_output_bias(self, bias: torch.Tensor) -> None:
        self.bias.copy_(bias)


class _Squeezed(nn.Module):
    """A baseline network's (..., 1) output as (...), the shape of a site's log-density."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
