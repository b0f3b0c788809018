"""M1+M2 (Kingma et al. 2014): the semi-supervised M2 stacked on the latent space of a
trained VAE (M1), as one Pyro model/guide pair over the images.

    y ~ Categorical(uniform),   z2 ~ N(0, I),   z1 | y, z2 ~ N(mu(z2, y), diag sigma(z2, y)^2),
    x | z1 ~ p(x | M1's decoder(z1))
    q(z1 | x) = M1's posterior,   q(y | z1) = Categorical(classifier(z1)),
    q(z2 | z1, y) = N(mu(z1, y), diag sigma(z1, y)^2)

M1 is a ``vae`` (or ``iwae``) run, trained beforehand; its weights are copied into this
model and stay frozen while M2 trains (``--train-m1`` trains them on the stacked objective
too). Because M1's encoder and decoder do not change, the stacked ELBO's gradient is M2's
ELBO gradient on the features z1 drawn from q(z1 | x) at each step, as in the paper, while
its value stays a bound on log p(x) of the whole generative model: log p(x | z1) +
log p(z1 | y, z2) + log p(y) + log p(z2) - log q(z1 | x) - log q(y | z1) - log q(z2 | z1, y),
with y enumerated where unlabelled. ``--features mean`` trains M2 on the mean of q(z1 | x)
instead (a point mass in the guide while training, so the training objective is M2's ELBO
on fixed features plus a constant; what is scored, in evaluation mode, always draws z1
from q(z1 | x), so every bound reported is a bound). Labels are predicted by q(y | z1) at
the mean of q(z1 | x).

The labelled subset, the batches and the loss are the SSVAE's (``SemiSupervised``). M1's
config, ``m1``, is read from the ``--m1-run`` given, or used to train M1 first when none
is: ``stacking`` does either, so that this module only models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ..config import nested, option
from ..data import Dataset
from ..errors import ConfigError, Flag
from ..nets import GaussianEncoder, make_classifier, make_encoder
from .base import Shape
from .semisupervised import SemiSupervised, SemiSupervisedConfig
from .vae import VAE, VAEConfig

FEATURES = ("sample", "mean")
#: the keys of M1's settings in the flat configs written before M1 had a config of its own
#: (``m1_z_dim``, and the unprefixed network, likelihood and guide options), with the
#: ``VAEConfig`` field each became
FLAT_M1_KEYS = {"m1_z_dim": "z_dim", "m1_hidden": "hidden", "m1_activation": "activation",
                **{name: name for name in ("encoder", "decoder", "likelihood", "guide", "flow_length",
                                           "gaussian_scale", "logistic_mixtures")}}


@dataclass
class M1M2Config(SemiSupervisedConfig):
    """M2's networks and semi-supervised setting (the SSVAE's options, over M1's features;
    M2's networks are fully connected) and M1: a trained VAE run, or the VAE to train first,
    whose config ``m1`` is (``--m1-z-dim``, ``--m1-likelihood``, ...)."""

    z_dim: int = option(64, "dimensions of M2's latent z2", at_least=1)
    hidden: tuple[int, ...] = option((300, 300), "hidden layer sizes of q(z2|z1,y) and p(z1|y,z2), comma "
                                     "separated")
    classifier_hidden: tuple[int, ...] = option((300, 300), "hidden layer sizes of the classifier q(y|z1), "
                                                "comma separated")
    m1: VAEConfig = nested(VAEConfig, "M1 (when trained here)",
                           formerly=FLAT_M1_KEYS)
    m1_run: str | None = option(None, "a trained vae or iwae run on the same data to take M1 from; without it "
                                "M1 is trained first, into RUN_DIR-m1 (continued there if it was stopped)")
    m1_epochs: int = option(100, "epochs of M1's training (when M1 is trained here)", at_least=1)
    features: str = option("sample", "what M2 trains on: a draw from q(z1 | x) at every step (sample, as Kingma "
                           "et al.), or its mean", FEATURES)
    train_m1: bool = option(False, "also train M1's weights on the stacked objective (default: M1 frozen)")

    # what the training loop reads of every family's config: here M1's, whose likelihood
    # scores the pixels and whose guide draws z1
    @property
    def likelihood(self) -> str:
        return self.m1.likelihood

    @property
    def guide(self) -> str:
        return self.m1.guide


class M1M2(SemiSupervised):
    """M1+M2: the semi-supervised M2 on the latent features of a trained VAE (M1)."""

    Config = M1M2Config

    @classmethod
    def check_config(cls, config: M1M2Config) -> None:
        """M2 decodes through M1's point-estimate decoder: M1 cannot be Bayesian here."""
        super().check_config(config)
        if config.m1.bayesian != "none":
            raise ConfigError("M1+M2 uses M1's decoder as it is: {bayesian} cannot be used in it",
                              bayesian=Flag("m1.bayesian", config.m1.bayesian))

    def __init__(self, shape: Shape | int, config: M1M2Config | None = None):
        super().__init__(shape, config or M1M2Config())
        c = self.config
        self.m1 = VAE(self.shape, c.m1)
        self.m1.requires_grad_(c.train_m1)
        d = c.m1.z_dim
        self.classifier = make_classifier("mlp", None, d, c.classifier_hidden, c.activation, c.classes)
        self.encoder = GaussianEncoder(make_encoder("mlp", None, d, c.hidden, c.activation, cond_dim=c.classes),
                                       c.z_dim)
        # p(z1 | y, z2): a Gaussian whose location and scale both depend on (z2, y)
        self.feature_decoder = GaussianEncoder(
            make_encoder("mlp", None, c.z_dim, tuple(reversed(c.hidden)), c.activation, cond_dim=c.classes), d)
        self._register_labelled()

    # M1's pieces are what the loop and the checks mean by "the" likelihood and decoder
    @property
    def likelihood(self) -> Any:
        return self.m1.likelihood

    @property
    def decoder(self) -> torch.nn.Module:
        return self.m1.decoder

    def _points_at_features(self) -> bool:
        return self.training and self.config.features == "mean"

    def feature_density(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """p(z1 | y, z2), event shape (m1.z_dim,)."""
        loc, scale = self.feature_decoder(z, self._onehot(y))
        return dist.Normal(loc, scale).to_event(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The point M1 gives M2 for classification: the mean of q(z1 | x) (for a flow
        guide, the base's mean through the transforms); a draw from it while training with
        ``--features sample``."""
        if self.training and self.config.features == "sample":
            return self.m1.posterior(x).rsample()
        loc, _, h = self.m1.encoder.with_features(x)
        return self.m1.flow.push(loc, h)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def model_sites(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> None:
        """z2, y (observed where given), z1 given both, and x from M1's decoder."""
        z, y = self._sample_z_and_y(x.shape[0], y, kl_weight)
        z1 = pyro.sample("z1", self.feature_density(z, y))
        pyro.sample("x", self.m1.decode(z1), obs=x)

    def guide_sites(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> None:
        """q(z1 | x) from M1, q(y | z1) (enumerated when y is not given) and q(z2 | z1, y)."""
        if self._points_at_features():
            z1 = pyro.sample("z1", dist.Delta(self.features(x), event_dim=1))
        else:
            z1 = pyro.sample("z1", self.m1.posterior(x))
        if y is None:
            y = pyro.sample("y", dist.Categorical(logits=self.classifier(z1)), infer={"enumerate": "parallel"})
        loc, scale = self.encoder(z1, self._onehot(y))
        with poutine.scale(scale=kl_weight):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def init_from_data(self, data: Dataset, seed: int) -> None:
        """M1's output bias from the data, unless M1 comes from ``m1_run`` (whose weights
        the training layer copies in), and the labelled subset."""
        if self.config.m1_run is None:
            self.m1.init_from_data(data, seed)
        self.labelled.copy_(self._labelled_subset(data, seed))

    # --- read-outs ------------------------------------------------------------------------

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z2 | x) with z1 at the mean of q(z1 | x): sum_y q(y | z1) q(z2 | z1, y), a
        mixture (batch shape (batch,), event shape (z_dim,))."""
        z1 = self.features(x)
        labels = torch.arange(self.config.classes, device=x.device).unsqueeze(-1)
        loc, scale = (t.transpose(0, 1) for t in self.encoder(z1, self._onehot(labels)))
        return dist.MixtureSameFamily(dist.Categorical(logits=self.classifier(z1)),
                                      dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z2 | z1, y), z1 the mean of q(z1 | x), y the predicted label."""
        z1 = self.features(x)
        return self.encoder(z1, self._onehot(self.classifier(z1).argmax(-1)))

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """p(x | z1) at z1 = the mean of p(z1 | y, z2): both stages, the second plugged in."""
        return self.m1.decode(self.feature_density(z, y).mean)

    @torch.no_grad()
    def decode_mean(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z1) at z1 = the mean of p(z1 | y, z2), for pictures."""
        return self.m1.decode_mean(self.feature_density(z, y).mean)

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` images drawn down the model: y uniform, z2, then z1 from p(z1 | y, z2); the
        pixel likelihood's means, or draws from it."""
        y = torch.randint(self.config.classes, (n,), device=self.device)
        z1 = self.feature_density(torch.randn(n, self.config.z_dim, device=self.device), y).sample()
        return self.m1.decode(z1).sample() if draw else self.m1.decode_mean(z1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x to z1 (M1's mean) to z2 (q's mean at the predicted label) and back up through
        both decoders' means."""
        z1 = self.features(x)
        y = self.classifier(z1).argmax(-1)
        return self.decode_mean(self.encoder(z1, self._onehot(y))[0], y)
