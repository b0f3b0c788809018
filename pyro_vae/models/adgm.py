"""The auxiliary deep generative model (ADGM, Maaløe et al. 2016) for semi-supervised
learning as one Pyro model/guide pair: M2 with an auxiliary latent a that makes the
guide richer while the model of x stays M2's.

    y ~ Categorical(uniform),   z ~ N(0, I),   x | y, z ~ p(x | decoder(z, onehot(y))),
    a | x, y, z ~ N(mu(x, y, z), diag sigma(x, y, z)^2)
    q(a | x) = N(mu(x), diag sigma(x)^2),   q(y | a, x) = Categorical(classifier(x, a)),
    q(z | a, x, y) = N(mu(x, a, y), diag sigma(x, a, y)^2)

(q(z | a, x, y) through a flow's transforms with a flow ``--guide``). Integrating a out
leaves p(x, y, z) unchanged, so the ELBO E_q[log p(x, y, z, a) - log q(a, y, z | x)] is a
bound on M2's log p(x); its guide, q(y, z | x) = E_q(a|x)[q(y | a, x) q(z | a, x, y)], is a
continuous mixture, and p(a | x, y, z) is what the bound learns to approximate the guide's
posterior over a with.

The label is handled as in the SSVAE (``SemiSupervised``): observed where known, marked
for parallel enumeration in the guide where not, so ``TraceEnum_ELBO`` sums it out
exactly given the guide's draw of a (one draw of a per image, one of z per label); the
classifier gets aux_weight * -log q(y | a, x) on labelled images at a fresh draw of a.
Predictions average q(y | a, x) over ``class_draws`` draws of a, an estimate of the
guide's q(y | x).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ..config import option
from ..guides import make_flow
from ..nets import GaussianEncoder, cat_last, make_encoder
from .base import Shape
from .semisupervised import SemiSupervised
from .ssvae import SSVAEConfig


CLASS_DRAW_BLOCK = 100  # draws of a scored at once by a prediction


@dataclass
class ADGMConfig(SSVAEConfig):
    """M2's networks and semi-supervised setting (the SSVAE's options) and the auxiliary
    latent a: its size, and the draws of it that a prediction averages over. q(a | x) and
    p(a | x, y, z) have the ``hidden`` layers, q(y | a, x) the ``classifier_hidden`` ones."""

    a_dim: int = option(64, "dimensions of the auxiliary latent a", at_least=1)
    class_draws: int = option(16, "draws of a ~ q(a | x) over which a prediction averages q(y | a, x)",
                              at_least=1)


class ADGM(SemiSupervised):
    """M2 with an auxiliary latent a in the guide, q(a | x) q(y | a, x) q(z | a, x, y), and
    p(a | x, y, z) in the model."""

    Config = ADGMConfig

    def __init__(self, shape: Shape | int, config: ADGMConfig | None = None):
        super().__init__(shape, config or ADGMConfig())
        c = self.config
        image, d = self.image_shape, self.x_dim
        self.aux_encoder = GaussianEncoder(make_encoder(c.encoder, image, d, c.hidden, c.activation), c.a_dim)
        self.classifier_body = make_encoder(c.encoder, image, d, c.classifier_hidden, c.activation, cond_dim=c.a_dim)
        self.classifier_head = nn.Linear(self.classifier_body.out_dim, c.classes)
        self.encoder = GaussianEncoder(make_encoder(c.encoder, image, d, c.hidden, c.activation,
                                                    cond_dim=c.a_dim + c.classes), c.z_dim)
        self.aux_decoder = GaussianEncoder(make_encoder(c.encoder, image, d, c.hidden, c.activation,
                                                        cond_dim=c.z_dim + c.classes), c.a_dim)
        self._likelihood_and_decoder(c.z_dim + c.classes, tuple(reversed(c.hidden)))
        self.flow = make_flow(c.guide, self.encoder.body.out_dim, c.z_dim, c.flow_length)
        self._register_labelled()

    # --- the conditionals -------------------------------------------------------------

    def aux_posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(a | x), event shape (a_dim,)."""
        loc, scale = self.aux_encoder(x)
        return dist.Normal(loc, scale).to_event(1)

    def aux_density(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> dist.Distribution:
        """p(a | x, y, z), event shape (a_dim,)."""
        loc, scale = self.aux_decoder(x, cat_last(z, self._onehot(y)))
        return dist.Normal(loc, scale).to_event(1)

    def logits_given_aux(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The logits of q(y | a, x), (..., classes)."""
        return self.classifier_head(self.classifier_body(x, a))

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """log q(y | x) up to a constant: q(y | a, x) at one draw of a while training (the
        classification loss of the paper), else averaged over ``class_draws`` draws."""
        q_a = self.aux_posterior(x)
        if self.training:
            return self.logits_given_aux(x, q_a.rsample())
        total, left = 0.0, self.config.class_draws
        while left:  # in blocks, so that memory stays bounded however many draws are asked for
            a = q_a.sample((min(left, CLASS_DRAW_BLOCK),))
            total = total + torch.softmax(self.logits_given_aux(x, a), -1).sum(0)
            left -= len(a)
        return total.log()

    # --- the Pyro pair ------------------------------------------------------------------

    def model_sites(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> None:
        """z, y (observed where given), x and p(a | x, y, z); ``kl_weight`` scales the
        latent sites z and a."""
        z, y = self._sample_z_and_y(x.shape[0], y, kl_weight)
        pyro.sample("x", self.decode(z, y), obs=x)
        with poutine.scale(scale=kl_weight):
            pyro.sample("a", self.aux_density(x, y, z))

    def guide_sites(self, x: torch.Tensor, y: torch.Tensor | None, kl_weight: float) -> None:
        """q(a | x), q(y | a, x) (enumerated when y is not given) and q(z | a, x, y)."""
        with poutine.scale(scale=kl_weight):
            a = pyro.sample("a", self.aux_posterior(x))
        if y is None:
            y = pyro.sample("y", dist.Categorical(logits=self.logits_given_aux(x, a)),
                            infer={"enumerate": "parallel"})
        loc, scale, h = self.encoder.with_features(x, cat_last(a, self._onehot(y)))
        with poutine.scale(scale=kl_weight):
            pyro.sample("z", self.flow.distribution(dist.Normal(loc, scale).to_event(1), h))

    # --- read-outs ----------------------------------------------------------------------

    def _readout_logits(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | a, x) at the mean of q(a | x): ``posterior`` is the mixture at that a (the
        guide's own marginal over z also integrates over a)."""
        return self.logits_given_aux(x, self.aux_encoder(x)[0])

    def _condition(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The read-outs take q(z | a, x, y) at the mean of q(a | x)."""
        return cat_last(self.aux_encoder(x)[0], onehot)
