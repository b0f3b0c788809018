"""The variational autoencoder (Kingma & Welling 2014) as a Pyro model/guide pair.

    z ~ N(0, I),   x | z ~ p(x | decoder(z)),   q(z | x) = N(mu(x), diag sigma(x)^2)

or, with a flow ``--guide``, that Gaussian pushed through amortized transforms
(``guides``), the guide's site then carrying the log-determinants in its log-density.

p(x | .) is the configured likelihood (Bernoulli by default); the encoder and decoder
are the configured networks (fully connected by default). Everything lives inside one
``pyro.plate("data")`` so that per-datapoint bounds (and RenyiELBO's particle weights)
are per datapoint. ``kl_weight`` scales the latent site in both model and guide through
``poutine.scale``: beta-VAE and KL warm-up. Evaluation always uses the unscaled
log-densities.

With ``--bayesian decoder`` the decoder's weights W are latent too (``bayesian``): the
prior N(0, sigma_p^2) and a mean-field Gaussian q(W), global sites outside the data plate
whose KL counts batch / N per step, drawn as ``--weight-sampling`` says while training.
The model is then p(W) prod_i p(z_i) p(x_i | z_i, W) and ``evaluate`` scores the
predictive likelihood under q(W) (``bounds``).
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
from ..bayesian import WEIGHT_SAMPLINGS, BayesianMLPDecoder, Weights
from ..config import option
from ..errors import ConfigError, Flag
from ..guides import make_flow
from ..nets import ACTIVATIONS, GaussianEncoder, make_encoder
from .base import Family, NetsConfig, Shape


#: the networks that ``--bayesian`` can make Bayesian
BAYESIAN_PARTS = ("none", "decoder")


@dataclass
class VAEConfig(NetsConfig):
    """Network shape of the VAE. Defaults: the one-stochastic-layer net of Burda et al. 2016."""

    z_dim: int = option(50, "latent dimensions", at_least=1)
    hidden: tuple[int, ...] = option((200, 200), "hidden layer sizes, comma separated (the decoder "
                                     "mirrors them; conv nets use the last as their dense layer)")
    activation: str = option("tanh", "activation function", ACTIVATIONS)
    bayesian: str = option("none", "networks whose weights are latent variables with a Gaussian prior and a "
                           "mean-field Gaussian posterior (the fully connected decoder)", BAYESIAN_PARTS)
    weight_prior: float = option(1.0, "standard deviation sigma_p of the prior N(0, sigma_p^2) of every weight of "
                                 "a --bayesian network", above=0)
    weight_sampling: str = option("local", "how a --bayesian network draws its weights while training: shared "
                                  "(one draw per minibatch), local (pre-activations per datapoint, the local "
                                  "reparameterization trick), independent (a weight draw per datapoint: slow)",
                                  WEIGHT_SAMPLINGS)


class VAE(Family):
    """Standard-normal prior, the configured guide (diagonal Gaussian by default), networks
    and likelihood."""

    Config = VAEConfig
    default_objective = "meanfield"
    # the flavours that train this pair
    objectives = ("meanfield", "trace", "iwae", "renyi", "dreg", "rws", "wake-sleep")

    def __init__(self, shape: Shape | int, config: VAEConfig | None = None):
        super().__init__(shape, config or VAEConfig())
        c = self.config
        self.encoder = GaussianEncoder(
            make_encoder(c.encoder, self.image_shape, self.x_dim, c.hidden, c.activation), c.z_dim)
        self._likelihood_and_decoder(c.z_dim, tuple(reversed(c.hidden)))
        if c.bayesian == "decoder":
            self.decoder = BayesianMLPDecoder(c.z_dim, self.x_dim, self.likelihood.params_per_value,
                                              tuple(reversed(c.hidden)), c.activation, c.weight_prior,
                                              c.weight_sampling)
        # last, so that a flow leaves the networks' initial weights as the diagonal guide's
        self.flow = make_flow(c.guide, self.encoder.body.out_dim, c.z_dim, c.flow_length)

    @classmethod
    def check_config(cls, config: VAEConfig) -> None:
        """The Bayesian decoder is the fully connected one."""
        super().check_config(config)
        if config.bayesian == "decoder" and config.decoder != "mlp":
            raise ConfigError("{bayesian} needs the fully connected {mlp}", bayesian=Flag("bayesian", "decoder"),
                              mlp=Flag("decoder", "mlp"))

    @classmethod
    def global_latents(cls, config: VAEConfig) -> bool:
        return config.bayesian != "none"

    def init_from_data(self, data: Any, seed: int) -> None:
        """The output bias from the mean pixel and, for a Bayesian decoder, the size N of
        the training set, which scales the weights' KL per step."""
        super().init_from_data(data, seed)
        if self.config.bayesian != "none":
            self.decoder.net.data_size.fill_(len(data.split("train")))

    def weights(self, batch: int, posterior: bool) -> Weights | None:
        """The Bayesian decoder's weights as sample sites (the prior's in the model, q's in
        the guide); None for a point-estimate decoder."""
        return self.decoder.net.sample_weights(batch, posterior) if self.config.bayesian != "none" else None

    def decode(self, z: torch.Tensor, weights: Weights | None = None) -> dist.Distribution:
        """p(x | z), with the decoder's drawn ``weights`` when it is Bayesian (else its
        posterior means)."""
        return self.likelihood.distribution(self.decoder(z) if weights is None else self.decoder(z, weights))

    def prior(self, batch: int) -> dist.Distribution:
        """p(z) for ``batch`` datapoints, batch shape (batch,), event shape (z_dim,)."""
        zeros = torch.zeros(batch, self.config.z_dim, device=self.device)
        return dist.Normal(zeros, 1.0).to_event(1)

    def model(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """Generative story; ``x`` is a (batch, D) tensor in the likelihood's support."""
        weights = self.weights(x.shape[0], posterior=False)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior(x.shape[0]))
            pyro.sample("x", self.decode(z, weights), obs=x)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x): N(mu(x), diag sigma(x)^2), through the flow's transforms if any (then
        a ``TransformedDistribution`` that can score only values it has just drawn)."""
        loc, scale, h = self.encoder.with_features(x)
        return self.flow.distribution(dist.Normal(loc, scale).to_event(1), h)

    def guide(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """Amortized posterior q(z | x) (and q(W) of a Bayesian decoder's weights)."""
        self.weights(x.shape[0], posterior=True)
        with pyro.plate("data", x.shape[0]):
            q = self.posterior(x)
            with poutine.scale(scale=kl_weight):
                pyro.sample("z", q)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z | x) (of its base Gaussian, for a flow guide)."""
        return self.encoder(x)

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` draws from the model: the likelihood's means, or draws from it if ``draw``."""
        z = self.prior(n).sample()
        return self.decode(z).sample() if draw else self.decode_mean(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each input (for a flow, the image of the base's
        mean under the transforms): the usual reconstruction picture."""
        loc, _, h = self.encoder.with_features(x)
        return self.decode_mean(self.flow.push(loc, h))

    def figures(self, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                directory: Path) -> list[Path]:
        """Interpolations between posterior means; when z has two dimensions the latent
        manifold and, with a flow guide, q(z | x) beside the true posterior for four images."""
        written = [plots.latent_interpolation(self, x, image_shape, directory / "interpolation.png")]
        if self.config.z_dim == 2:
            written.append(plots.latent_manifold(self, image_shape, directory / "manifold.png"))
            if self.config.guide != "diagonal":
                written.append(plots.posterior_pictures(
                    self, x[:4], image_shape, directory / "posteriors.png",
                    title=f"{self.config.guide} guide, K = {self.config.flow_length}"))
        return written


class IWAE(VAE):
    """The VAE pair trained on the importance-weighted bound (Burda et al. 2016)."""

    default_objective = "iwae"
    default_particles = 5
    objectives = ("iwae", "dreg", "renyi")
