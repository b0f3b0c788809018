"""The variational autoencoder (Kingma & Welling 2014) as a Pyro model/guide pair.

    z ~ N(0, I),   x | z ~ Bernoulli(logits = decoder(z)),   q(z | x) = N(mu(x), diag sigma(x)^2)

Everything lives inside one ``pyro.plate("data")`` so that per-datapoint bounds (and
RenyiELBO's particle weights) are per datapoint. ``kl_weight`` scales the latent site in
both model and guide through ``poutine.scale``: beta-VAE and KL warm-up. Evaluation always
uses the unscaled log-densities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from .. import plots
from ..nets import BernoulliDecoder, BernoulliImage, GaussianEncoder
from .base import Family


@dataclass
class VAEConfig:
    """Network shape of the VAE. Defaults: the one-stochastic-layer net of Burda et al. 2016."""

    z_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"


class VAE(Family):
    """Standard-normal prior, Bernoulli decoder, diagonal Gaussian guide."""

    Config = VAEConfig
    default_objective = "meanfield"
    objectives = ("meanfield", "trace", "iwae", "renyi", "dreg")  # the flavours that train this pair

    def __init__(self, x_dim: int, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.x_dim = x_dim
        self.encoder = GaussianEncoder(x_dim, config.hidden, config.z_dim, config.activation)
        self.decoder = BernoulliDecoder(
            config.z_dim, tuple(reversed(config.hidden)), x_dim, config.activation
        )

    def prior(self, batch: int) -> dist.Distribution:
        """p(z) for ``batch`` datapoints, batch shape (batch,), event shape (z_dim,)."""
        zeros = self.decoder.net[0].weight.new_zeros(batch, self.config.z_dim)
        return dist.Normal(zeros, 1.0).to_event(1)

    def model(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """Generative story; ``x`` is a (batch, x_dim) tensor of 0/1 values."""
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior(x.shape[0]))
            logits = self.decoder(z)
            pyro.sample("x", BernoulliImage(logits), obs=x)

    def guide(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """Amortized posterior q(z | x)."""
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            with poutine.scale(scale=kl_weight):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z | x)."""
        return self.encoder(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli means p(x = 1 | z)."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def sample(self, n: int, binary: bool = False) -> torch.Tensor:
        """``n`` draws from the model: pixel probabilities, or 0/1 images if ``binary``."""
        probs = self.decode(self.prior(n).sample())
        return torch.bernoulli(probs) if binary else probs

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each input: the usual reconstruction picture."""
        return self.decode(self.encode(x)[0])

    def figures(self, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                directory: Path) -> list[Path]:
        """The latent manifold when z has two dimensions."""
        if self.config.z_dim != 2:
            return []
        return [plots.latent_manifold(self, image_shape, directory / "manifold.png")]


class IWAE(VAE):
    """The VAE pair trained on the importance-weighted bound (Burda et al. 2016)."""

    default_objective = "iwae"
    default_particles = 5
    objectives = ("iwae", "dreg", "renyi")
