"""The VAE with a learned Gaussian-mixture prior, its component summed out exactly.

    y ~ Categorical(pi),   z | y ~ N(mu_y, diag sigma_y^2),   x | z ~ p(x | decoder(z))
    q(z | x) = N(mu(x), diag sigma(x)^2), or a flow of it      (the VAE's guide)

The component y is a discrete latent of the model only, marked for parallel enumeration:
``TraceEnum_ELBO`` replaces it by the exact sum log p(z) = logsumexp_y [log pi_y + log N(z;
mu_y, sigma_y)], with no Monte Carlo estimate of the KL to a mixture. The same model with
y marginalised inside a ``MixtureSameFamily`` prior is ``marginal_model``: it is what an
objective that cannot enumerate (Pyro's RenyiELBO) would train, and the tests check that
the two forms give the same bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from .. import plots
from ..config import option
from ..errors import ConfigError, Flag
from .base import Shape
from .vae import VAE, VAEConfig


@dataclass
class GMVAEConfig(VAEConfig):
    """The VAE's networks plus the mixture prior's shape and what of it is learned."""

    components: int = option(10, "mixture components of the prior", at_least=1)
    learn_weights: bool = option(False, "learn the mixture weights (else uniform)")
    learn_prior: bool = option(True, "learn the component means and scales")
    init_spread: float = option(0.3, "standard deviation of the initial component means", at_least=0)


def diag_normal_table(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc_c, diag scale_c^2) for every row c of ``loc`` and ``scale`` (C, D), as
    matrix products: shape (*z.shape[:-1], C).

        sum_d (z_d - m_cd)^2 / s_cd^2 = z^2 . (1/s_c^2) - 2 z . (m_c/s_c^2) + sum_d m_cd^2/s_cd^2

    The direct form builds a (..., C, D) tensor of elementwise terms, which is costly with
    many components. The products run in float64 because the expanded square cancels large
    terms when |m / s| is large, where float32 would lose the difference."""
    zz, m, s = z.double(), loc.double(), scale.double()
    inv_var = s.pow(-2)
    # log 2 pi per dimension summed as a float64 tensor: a traced loc.shape[-1] (``compiled``)
    # would turn the product into float32 arithmetic
    const = -((0.5 * m * m * inv_var + 0.5 * math.log(2 * math.pi)).sum(-1) + s.log().sum(-1))
    # one product: [z^2, z, 1] against [-inv_var / 2, m * inv_var, const]
    features = torch.cat([zz * zz, zz, torch.ones_like(zz[..., :1])], -1)
    weights = torch.cat([-0.5 * inv_var, m * inv_var, const.unsqueeze(-1)], -1)
    return (features @ weights.T).to(z.dtype)


class ComponentNormal(dist.Independent):
    """z | y ~ N(loc[y], diag scale[y]^2): the same distribution as
    ``Normal(loc[y], scale[y]).to_event(1)``, with ``log_prob`` from ``diag_normal_table``
    (every component scored by matrix products, then component y picked), so that an
    enumerated y costs a (C, samples, images) selection instead of a
    (C, samples, images, D) elementwise pass."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, batch_shape: Any = None):
        base = dist.Normal(loc[y], scale[y])
        super().__init__(base if batch_shape is None else base.expand((*batch_shape, loc.shape[-1])), 1)
        self.table_loc, self.table_scale, self.y = loc, scale, y

    def expand(self, batch_shape: Any, _instance: Any = None) -> "ComponentNormal":
        # y stays unexpanded: selecting from the table by a broadcast y would make the
        # backward pass scatter into a (batch x C) copy of the table for every component
        return ComponentNormal(self.table_loc, self.table_scale, self.y, batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        table = diag_normal_table(value, self.table_loc, self.table_scale)  # (*value batch, C)
        batch, y = value.shape[:-1], self.y
        if y.dim() > len(batch) and all(n == 1 for n in y.shape[y.dim() - len(batch):]):
            # enumerated y varies only left of the value's dimensions: pick whole slices
            lead = y.shape[: y.dim() - len(batch)]
            out = table.movedim(-1, 0)[y.reshape(-1)].reshape(*lead, *batch)
        else:
            shape = torch.broadcast_shapes(y.shape, batch)
            out = table.expand(*shape, table.shape[-1]).gather(-1, y.expand(shape).unsqueeze(-1)).squeeze(-1)
        return out.expand(torch.broadcast_shapes(out.shape, self.batch_shape))


class MixturePrior(nn.Module):
    """A mixture of diagonal Gaussians over R^z_dim with (optionally) learned parameters.

    Means start as draws from N(0, init_spread^2 I) so that components differ from the
    first step, and scales at 1. A small spread starts the mixture close to N(0, I), where
    the encoder's codes begin; a spread of 1 would put each component about sqrt(z_dim)
    from the origin, far from those codes. Scales stay positive through a softplus."""

    def __init__(self, components: int, z_dim: int, learn_weights: bool, learn_prior: bool,
                 init_spread: float):
        super().__init__()
        values = {
            "logits": (torch.zeros(components), learn_weights),
            "loc": (torch.randn(components, z_dim) * init_spread, learn_prior),
            "raw_scale": (torch.full((components, z_dim), math.log(math.e - 1.0)), learn_prior),
        }
        for name, (value, learned) in values.items():
            if learned:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale) + 1e-4

    @property
    def log_weights(self) -> torch.Tensor:
        """log pi_y, shape (components,)."""
        return torch.log_softmax(self.logits, -1)

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        """log pi_y + log N(z; mu_y, sigma_y) for every component: shape (*z.shape[:-1], C)."""
        return self.log_weights + diag_normal_table(z, self.loc, self.scale)

    def distribution(self, batch: int) -> dist.Distribution:
        """The marginal p(z) for ``batch`` datapoints: batch shape (batch,), event (z_dim,)."""
        c, d = self.loc.shape
        return dist.MixtureSameFamily(
            dist.Categorical(logits=self.log_weights.expand(batch, c)),
            dist.Normal(self.loc.expand(batch, c, d), self.scale.expand(batch, c, d)).to_event(1),
        )


class GMVAE(VAE):
    """Gaussian-mixture prior with the component enumerated exactly, diagonal Gaussian
    guide, the configured networks and likelihood."""

    Config = GMVAEConfig
    default_objective = "enum"
    objectives = ("enum", "iwae", "renyi", "dreg")
    has_clusters = True
    pair_methods = ("model", "guide", "marginal_model")

    def __init__(self, shape: Shape | int, config: GMVAEConfig | None = None):
        config = config or GMVAEConfig()
        super().__init__(shape, config)
        self.mixture = MixturePrior(config.components, config.z_dim, config.learn_weights,
                                    config.learn_prior, config.init_spread)

    @classmethod
    def check_config(cls, config: GMVAEConfig) -> None:
        """The VAE's rules; its Bayesian decoder is not built here."""
        super().check_config(config)
        if config.bayesian != "none":
            raise ConfigError("the gmvae has no {bayesian} networks; use {vae}",
                              bayesian=Flag("bayesian", config.bayesian),
                              vae=Flag("model", cli="pyro-vae fit vae"))

    def prior(self, batch: int) -> dist.Distribution:
        """The marginal mixture p(z) (what ``sample`` and ``marginal_model`` use)."""
        return self.mixture.distribution(batch)

    def model(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """Generative story with the component y as an enumerated site."""
        batch = x.shape[0]
        with pyro.plate("data", batch):
            # y and z together are the prior: one scale for both, as TraceEnum_ELBO requires
            with poutine.scale(scale=kl_weight):
                y = pyro.sample("y", dist.Categorical(logits=self.mixture.log_weights.expand(batch, -1)),
                                infer={"enumerate": "parallel"})
                z = pyro.sample("z", ComponentNormal(self.mixture.loc, self.mixture.scale, y))
            pyro.sample("x", self.decode(z), obs=x)

    def marginal_model(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """The same model with y summed out inside the prior (no discrete site)."""
        VAE.model(self, x, kl_weight)

    @torch.no_grad()
    def component_posterior(self, x: torch.Tensor, num_samples: int = 100) -> torch.Tensor:
        """p(y | x) for each row of ``x``, shape (batch, components).

        p(y | x) = E_{p(z|x)}[p(y | z)], estimated by self-normalised importance sampling
        with ``num_samples`` draws from q(z | x): proportional to
        sum_k p(x | z_k) pi_y N(z_k; mu_y, sigma_y) / q(z_k | x). Consistent as the number
        of draws grows, exact in y for every draw."""
        q = self.posterior(x)
        z = q.sample((num_samples,))
        log_w = self.decode(z).log_prob(x) - q.log_prob(z)  # scored at once: a flow's cached draw
        scores = torch.logsumexp(log_w.unsqueeze(-1) + self.mixture.log_joint(z), 0)
        return torch.softmax(scores, -1)

    @torch.no_grad()
    def sample_components(self, components: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` mean images from each listed component: shape (len * n, D),
        grouped by component."""
        loc = self.mixture.loc[components].repeat_interleave(n, 0)
        scale = self.mixture.scale[components].repeat_interleave(n, 0)
        return self.decode_mean(dist.Normal(loc, scale).sample())

    def figures(self, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                directory: Path) -> list[Path]:
        """The VAE's figures, samples per component (the most probable components first)
        and the latent space coloured by component and, when known, by label."""
        written = super().figures(x, labels, image_shape, directory)
        order = torch.argsort(self.mixture.log_weights, descending=True)[:20]
        images = self.sample_components(order, 10)
        written.append(plots.image_grid(images, image_shape, directory / "component-samples.png",
                                        title="samples per mixture component (rows)", ncol=10))
        x = x[:2000]
        loc = self.encode(x)[0]
        assignment = self.assign(x)
        panels = [("by component", assignment)] + ([("by label", labels[: len(x)])] if labels is not None else [])
        written.append(plots.latent_scatter(loc, panels, directory / "latent-components.png",
                                            centres=self.mixture.loc.detach()))
        return written

    @torch.no_grad()
    def assign(self, x: torch.Tensor, num_samples: int = 100, batch_size: int = 500) -> torch.Tensor:
        """The most probable component of each row of ``x`` under p(y | x)."""
        return torch.cat([self.component_posterior(x[i : i + batch_size], num_samples).argmax(-1)
                          for i in range(0, x.shape[0], batch_size)])
