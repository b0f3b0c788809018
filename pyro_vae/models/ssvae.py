"""The semi-supervised VAE of Kingma et al. 2014 (M2) as one Pyro model/guide pair.

    y ~ Categorical(uniform),   z ~ N(0, I),   x | y, z ~ p(x | decoder(z, onehot(y)))
    q(y | x) = Categorical(classifier(x)),   q(z | x, y) = N(mu(x, y), diag sigma(x, y)^2)

(q(z | x, y) through a flow's transforms, conditioned on the same features of (x, y),
with a flow ``--guide``). The label is observed where known and enumerated where not, the
batches pair unlabelled with labelled images, and the classifier gets an auxiliary loss:
all of it ``SemiSupervised``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ..guides import make_flow
from ..nets import GaussianEncoder, make_classifier, make_encoder
from .base import NetsConfig, Shape
from .semisupervised import SemiSupervised, SemiSupervisedConfig


@dataclass
class SSVAEConfig(SemiSupervisedConfig, NetsConfig):
    """Networks, classes and the semi-supervised setting of M2. The defaults (z of 64, two
    layers of 300 ELU units in every network, the classification loss weighted 100 per
    labelled image) are the course reference's. The classifier q(y | x) is the
    ``--encoder`` network followed by a linear layer; the label reaches q(z | x, y) and the
    decoder as a one-hot vector beside the features or z."""


class SSVAE(SemiSupervised):
    """Semi-supervised VAE (M2): the label observed where known, enumerated where not."""

    Config = SSVAEConfig

    def __init__(self, shape: Shape | int, config: SSVAEConfig | None = None):
        super().__init__(shape, config or SSVAEConfig())
        config = self.config
        self.classifier = make_classifier(config.encoder, self.image_shape, self.x_dim,
                                          config.classifier_hidden, config.activation, config.classes)
        self.encoder = GaussianEncoder(make_encoder(config.encoder, self.image_shape, self.x_dim, config.hidden,
                                                    config.activation, cond_dim=config.classes), config.z_dim)
        self._likelihood_and_decoder(config.z_dim + config.classes, tuple(reversed(config.hidden)))
        self.flow = make_flow(config.guide, self.encoder.body.out_dim, config.z_dim, config.flow_length)
        self._register_labelled()

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def model_sites(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> None:
        """z, y (observed where given) and x."""
        z, y = self._sample_z_and_y(x.shape[0], y, kl_weight)
        pyro.sample("x", self.decode(z, y), obs=x)

    def guide_sites(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> None:
        """q(y | x) (enumerated when y is not given) and q(z | x, y)."""
        if y is None:
            y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)), infer={"enumerate": "parallel"})
        loc, scale, h = self.encoder.with_features(x, self._onehot(y))
        with poutine.scale(scale=kl_weight):
            pyro.sample("z", self.flow.distribution(dist.Normal(loc, scale).to_event(1), h))
