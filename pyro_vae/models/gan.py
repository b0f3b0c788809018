"""The generative adversarial network (Goodfellow et al. 2014) as a family of the contract.

    z ~ N(0, I),   image = G(z) = sigmoid(decoder(z)),   D(x) = sigmoid(discriminator(x))

The generator is a decoder of the networks registry (``--decoder``) whose output is read
as the logits of the image's grey levels, so that G(z) lies in [0, 1] like the data; the
discriminator is an encoder body of the registry (``--encoder``) with a one-logit head.
Both are trained on the objective's game (``objectives.AdversarialGame``: ``gan``, the
non-saturating generator loss, or ``gan-minimax``) by ``training_loss``.

The updates are simultaneous, not alternating: one step's loss is the discriminator's
loss, with the generator's images detached, plus the generator's loss, with the
discriminator's weights detached, so that one backward pass gives each player the
gradient of its own loss only, and one optimizer step moves both.

A GAN has no amortized posterior and no density. Its ``guide`` is its prior, an
importance sampler that is valid for any p(x | z), and ``set_observation`` gives it the
Gaussian observation model p(x | z) = N(G(z), sigma^2 I) of Wu et al. 2017, under which the
evaluator's bounds and AIS score it like any other family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch.nn import functional as F

from .. import plots
from ..config import option
from ..errors import ConfigError, Flag
from ..likelihoods import Likelihood
from ..nets import ACTIVATIONS, DECODERS, ENCODERS, make_classifier, make_decoder
from .base import OBSERVATIONS, Family, Shape

CLASSIFIER_STEPS = 400  # steps of the small classifier that names the classes of samples
INTERPOLATION_STEPS = 7  # images between the two ends of the interpolation


@dataclass
class GANConfig:
    """Network shape of the GAN: the generator mirrors ``hidden`` (as a VAE's decoder does)."""

    #: what ``resolve`` reads of a family's config: the GAN's "guide" is its prior, and it is
    #: scored (once given an observation model) by a Gaussian density, so grey data by default
    guide: ClassVar[str] = "prior"
    likelihood: ClassVar[str] = "gaussian"

    z_dim: int = option(10, "latent dimensions", at_least=1)
    hidden: tuple[int, ...] = option((256, 256), "hidden layer sizes of the discriminator, comma separated "
                                     "(the generator mirrors them)")
    activation: str = option("leaky-relu", "activation function", ACTIVATIONS)
    encoder: str = option("mlp", "the discriminator's body", ENCODERS)
    decoder: str = option("mlp", "the generator", DECODERS)


class GeneratorOutput(Likelihood):
    """The generator's image sigmoid(output) in [0, 1], and, once ``sigma`` is set, the
    Gaussian observation model N(image, sigma^2 I) around it (Wu et al. 2017)."""

    name = "gaussian"
    discrete = False

    def __init__(self, x_dim: int):
        super().__init__(x_dim)
        self.sigma: float | None = None

    def distribution(self, params: torch.Tensor) -> dist.Distribution:
        if self.sigma is None:
            raise ConfigError("a GAN has no density p(x | z) until it is given an observation model: pass "
                              "{observation} {sigma}", observation=Flag("observation", "gaussian"),
                              sigma=Flag("sigma", "S"))
        return dist.Normal(torch.sigmoid(params), self.sigma).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def check_support(self, x: torch.Tensor, what: str) -> None:
        super().check_support(x, what)
        self._check_unit_interval(x, what, "values in [0, 1] like its images", "rescale the data")

    @torch.no_grad()
    def init_bias(self, pixel_mean: torch.Tensor) -> torch.Tensor:
        """The logit of the mean pixel (clamped to [1e-3, 1 - 1e-3]): G starts at the mean image."""
        p = pixel_mean.clamp(1e-3, 1 - 1e-3)
        return torch.log(p) - torch.log1p(-p)


class GAN(Family):
    """A GAN (Goodfellow et al. 2014): a generator from the decoder registry against a discriminator."""

    Config = GANConfig
    default_objective = "gan"
    objectives = ("gan", "gan-minimax")
    has_encoder = False
    has_density = False
    score_name = "GAN value V(D, G)"
    evaluate_hint = "--observation gaussian --sigma S --iw 1000"
    figure_samples = 25
    adam_betas = (0.5, 0.999)  # Radford et al. 2016's beta1, with their learning rate 2e-4 (--lr)

    likelihood: GeneratorOutput

    def __init__(self, shape: Shape | int, config: GANConfig | None = None):
        super().__init__(shape, config or GANConfig())
        c = self.config
        self.likelihood = GeneratorOutput(self.x_dim)
        self.decoder = make_decoder(c.decoder, c.z_dim, self.image_shape, self.x_dim, 1,
                                    tuple(reversed(c.hidden)), c.activation)
        self.discriminator = make_classifier(c.encoder, self.image_shape, self.x_dim, c.hidden, c.activation, 1)

    def prior(self, batch: int) -> dist.Distribution:
        """p(z) for ``batch`` images, batch shape (batch,), event shape (z_dim,)."""
        return dist.Normal(torch.zeros(batch, self.config.z_dim, device=self.device), 1.0).to_event(1)

    # --- the Pyro pair: the prior, and the observation model once set --------------------

    def model(self, x: torch.Tensor) -> None:
        """z ~ N(0, I), x ~ N(G(z), sigma^2 I): defined once ``set_observation`` gave sigma."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x.shape[0]))
            pyro.sample("x", self.decode(z), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """The prior as the proposal: a GAN has no amortized posterior."""
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.prior(x.shape[0]))

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """What the guide draws from: the prior, whatever x."""
        return self.prior(x.shape[0])

    def set_observation(self, observation: str | None, sigma: float | None) -> None:
        """p(x | z) = N(G(z), sigma^2 I) (``observation="gaussian"``), as Wu et al. 2017
        score GANs; without it a GAN has nothing to score images by."""
        flags = dict(observation=Flag("observation", "gaussian"), sigma=Flag("sigma", "S"))
        if observation is None:
            raise ConfigError("a GAN has no density p(x | z) to score images by: pass {observation} {sigma}, the "
                              "Gaussian observation model N(G(z), S^2 I) of Wu et al. 2017 (S chosen on "
                              "validation images)", **flags)
        if observation not in OBSERVATIONS:
            raise ConfigError(f"unknown {{observation}} {observation!r}; choose one of {', '.join(OBSERVATIONS)}",
                              observation=Flag("observation", observation))
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < float("inf"):
            raise ConfigError(f"{{sigma}} must be a positive number with {{observation}}, got {sigma!r}", **flags)
        self.likelihood.sigma = float(sigma)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError("a GAN has no encoder q(z | x) to encode images with")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigError("a GAN has no encoder q(z | x), so it cannot reconstruct images")

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` images G(z), z ~ N(0, I); with ``draw`` and an observation model, draws from it."""
        z = self.prior(n).sample()
        return self.decode(z).sample() if draw and self.likelihood.sigma is not None else self.decode_mean(z)

    # --- the game ------------------------------------------------------------------------

    def _logits(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """The discriminator's logits (batch,); ``frozen``: through detached weights, so that
        a loss on them moves only what made ``x``."""
        if not frozen:
            return self.discriminator(x).squeeze(-1)
        weights = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, weights, (x,)).squeeze(-1)

    def _fake(self, n: int) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(torch.randn(n, self.config.z_dim, device=self.device)))

    def training_loss(self, objective: Any, batch: tuple[torch.Tensor, ...], kl_weight: float) -> torch.Tensor:
        """D's loss (G's images detached) plus G's loss (D's weights detached), summed over
        the batch: the gradient of each player's parameters is that of its own loss."""
        x = batch[0]
        fake = self._fake(x.shape[0])
        d_loss = objective.discriminator_loss(self._logits(x), self._logits(fake.detach()))
        return d_loss + objective.generator_loss(self._logits(fake, frozen=True))

    @torch.no_grad()
    def game(self, objective: Any, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
        """Per image on ``x`` and as many draws of z: both players' losses, the mean of
        D(x) and of D(G(z)), and the game's value V(D, G) = E log D(x) + E log(1 - D(G(z)))
        (-2 log 2 at the equilibrium of Goodfellow et al.'s theory), which D maximises."""
        totals = {"d_loss": 0.0, "g_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
        for i in range(0, x.shape[0], batch_size):
            real = self._logits(x[i : i + batch_size])
            fake = self._logits(self._fake(real.shape[0]))
            totals["d_loss"] += objective.discriminator_loss(real, fake).item()
            totals["g_loss"] += objective.generator_loss(fake).item()
            totals["d_real"] += torch.sigmoid(real).sum().item()
            totals["d_fake"] += torch.sigmoid(fake).sum().item()
        out = {k: v / x.shape[0] for k, v in totals.items()}
        return {"value": -out["d_loss"], **out}

    def epoch_scores(self, objective: Any, train_x: torch.Tensor, valid_x: torch.Tensor) -> dict[str, float]:
        """The game's value V(D, G) on the fixed images as ``train_bound`` / ``valid_bound``
        (not a bound on log p(x): a GAN has none; ``best.pt`` is the epoch where D told
        real from fake best, so use the last checkpoint), and the players' losses."""
        train, valid = self.game(objective, train_x), self.game(objective, valid_x)
        return {"train_bound": train["value"], "valid_bound": valid["value"],
                **{f"valid_{k}": v for k, v in valid.items() if k != "value"}}

    def curves(self, history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
        return plots.gan_curves(history, path, title=title)

    def metrics(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        """The observation model's sigma, when one is set (evaluation)."""
        return {} if self.likelihood.sigma is None else {"observation_sigma": self.likelihood.sigma}

    def figures(self, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                directory: Path) -> list[Path]:
        """An interpolation of 9 images (7 steps) between two samples of different classes,
        the classes named by a small classifier trained on ``x`` and ``labels``."""
        return [class_interpolation(self, x, labels, image_shape, directory / "interpolation.png")]


def small_classifier(x: torch.Tensor, labels: torch.Tensor, steps: int = CLASSIFIER_STEPS) -> torch.nn.Module:
    """A one-hidden-layer classifier of ``labels`` from ``x``, trained with Adam for ``steps``
    steps of 256 images: good enough to say which digit a sample looks like."""
    classes = int(labels.max()) + 1
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, classes))
    net.to(x.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    labels = labels.to(x.device).long()
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (256,), device=x.device)
            optimizer.zero_grad()
            F.cross_entropy(net(x[rows]), labels[rows]).backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def class_interpolation(model: GAN, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                        path: Path, candidates: int = 64) -> Path:
    """G along the straight line between two prior draws whose images a classifier trained
    on (``x``, ``labels``) puts in different classes, each with probability over 0.9 where
    such a pair exists (9 images: the two ends and 7 steps); without labels, between the
    first two draws."""
    z = model.prior(candidates).sample()
    title = "interpolation between two samples (no labels to class them)"
    a, b = 0, 1
    if labels is not None:
        probs = torch.softmax(small_classifier(x, labels)(model.decode_mean(z)), -1)
        confidence, which = probs.max(-1)
        sure = [i for i in range(candidates) if confidence[i] > 0.9] or list(range(candidates))
        a = sure[0]
        others = [i for i in sure if which[i] != which[a]] or [i for i in range(candidates) if which[i] != which[a]]
        b = others[0] if others else 1
        title = (f"interpolation between samples classed {int(which[a])} and {int(which[b])} "
                 "(classifier trained on MNIST labels)")
    t = torch.linspace(0, 1, INTERPOLATION_STEPS + 2, device=z.device).unsqueeze(1)
    images = model.decode_mean(z[a] * (1 - t) + z[b] * t)
    return plots.image_grid(images, image_shape, path, title=title, ncol=INTERPOLATION_STEPS + 2)
