"""The observation models p(x | z): what the decoder's output means, by name.

A decoder emits ``P * D`` numbers per item for ``D`` pixels, parameter-major (``out.view(...,
P, D)``); a likelihood turns them into a Pyro distribution with event shape ``(D,)``, checks
that the data lie in its support, gives the mean image for pictures, and proposes the
decoder's initial output bias from the mean training pixel.

- ``bernoulli``: 0/1 pixels, logits (P = 1). The default.
- ``continuous-bernoulli``: grey levels in [0, 1] with the normalizing constant that makes
  the Bernoulli a density on [0, 1] (Loaiza-Ganem & Cunningham 2019).
- ``gaussian``: any real values, the decoder gives the mean and the scale is a learned
  global (per pixel or per image).
- ``discretized-logistic``: 8-bit values k/255, a mixture of logistics per pixel
  discretized to the 256 bins (Salimans et al. 2017, PixelCNN++).

``discrete`` says whether ``log_prob`` is a log-mass (so bits per dimension mean something)
or a log-density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn
from torch.nn import functional as F

from .config import check_fields, option
from .errors import ConfigError, DataError, Flag

GAUSSIAN_SCALES = ("pixel", "image")
#: how to name each grey-level likelihood in a message
GREY = {f"grey{i}": Flag("likelihood", name)
        for i, name in enumerate(("continuous-bernoulli", "gaussian", "discretized-logistic"))}


@dataclass
class LikelihoodConfig:
    """Settings of the likelihoods; each reads only the fields that concern it."""

    gaussian_scale: str = option("pixel", "scale of --likelihood gaussian: a learned scale per pixel, or one "
                                 "for the whole image", GAUSSIAN_SCALES)
    logistic_mixtures: int = option(5, "mixture components per pixel of --likelihood discretized-logistic",
                                    at_least=1)


# ----------------------------------------------------------------------------- distributions


class BernoulliImage(dist.Independent):
    """Independent Bernoulli pixels along the last dimension, from logits: the same
    distribution as ``Bernoulli(logits=logits).to_event(1)``, with a cheaper ``log_prob``.

    Pyro's Bernoulli negates every pixel's cross-entropy before the sum over pixels; here
    the sum comes first, which saves one elementwise pass forward and one backward.
    """

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None):
        super().__init__(dist.Bernoulli(logits=logits), 1, validate_args=validate_args)

    @property
    def logits(self) -> torch.Tensor:
        return self.base_dist.logits

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> "BernoulliImage":
        return BernoulliImage(self.logits.expand(*batch_shape, *self.event_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


_CB_TAYLOR = 0.1  # |eta / 2| below which the series replace the closed forms


def cb_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C of the continuous Bernoulli at natural parameter ``eta = logit(lambda)``.

    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), and with 1 - 2 lambda = -tanh(eta/2)
    this is C = eta / tanh(eta / 2) = 2 u / tanh(u) with u = eta / 2: no cancellation of
    log(lambda) against log(1 - lambda), only the 0/0 at eta = 0. Near 0 (and for its
    gradient, 1/eta - 1/sinh(eta), which cancels badly) the series is used:
    log(u / tanh u) = u^2/3 - 7 u^4/90 + 62 u^6/2835 - 127 u^8/18900 + O(u^10).
    """
    u = logits / 2
    a = u.abs()
    small = a < _CB_TAYLOR
    a_safe = torch.where(small, torch.ones_like(a), a)
    # log tanh(a) = log1p(-e^{-2a}) - log1p(e^{-2a}) for a > 0, stable for large a too.
    e = torch.exp(-2 * a_safe)
    direct = torch.log(2 * a_safe) - torch.log1p(-e) + torch.log1p(e)
    u2 = u * u
    series = math.log(2.0) + u2 * (1 / 3 + u2 * (-7 / 90 + u2 * (62 / 2835 - u2 * 127 / 18900)))
    return torch.where(small, series, direct)


def cb_mean(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the continuous Bernoulli at ``eta = logit(lambda)`` (not lambda).

    E[x] = lambda / (2 lambda - 1) + 1 / (2 artanh(1 - 2 lambda)), which in u = eta / 2 is
    1/2 + (coth u - 1/u) / 2: half the Langevin function. Near u = 0 the difference cancels,
    so the series coth u - 1/u = u/3 - u^3/45 + 2 u^5/945 - u^7/4725 + O(u^9) is used there.
    """
    u = logits / 2
    small = u.abs() < _CB_TAYLOR
    u_safe = torch.where(small, torch.ones_like(u), u)
    direct = 1 / torch.tanh(u_safe) - 1 / u_safe
    u2 = u * u
    series = u * (1 / 3 + u2 * (-1 / 45 + u2 * (2 / 945 - u2 / 4725)))
    return 0.5 + 0.5 * torch.where(small, series, direct)


class ContinuousBernoulliImage(TorchDistribution):
    """Independent continuous-Bernoulli pixels on [0, 1] along the last dimension, from logits.

        log p(x | lambda) = x log lambda + (1 - x) log(1 - lambda) + log C(lambda)

    (Loaiza-Ganem & Cunningham 2019). The first two terms are minus the binary cross-entropy
    with logits; ``cb_log_norm`` adds the normalizer. Everything is computed from the logits,
    so it stays accurate where lambda rounds to 0, 1 or 0.5 in float32.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.unit_interval, 1)

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None):
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> "ContinuousBernoulliImage":
        return ContinuousBernoulliImage(self.logits.expand(*batch_shape, *self.event_shape))

    @property
    def mean(self) -> torch.Tensor:
        return cb_mean(self.logits)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        bce = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return (cb_log_norm(logits) - bce).sum(-1)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Inverse CDF: F(x) = (e^{eta x} - 1) / (e^eta - 1), so x = log1p(u expm1(eta)) / eta,
        for eta > 0 written as x = 1 + log(u + (1 - u) e^{-eta}) / eta, which cannot overflow."""
        eta = self.logits.expand(self._extended_shape(sample_shape))
        u = torch.rand_like(eta)
        small = eta.abs() < 1e-4
        eta_safe = torch.where(small, torch.ones_like(eta), eta)
        pos = 1 + torch.log(u + (1 - u) * torch.exp(-eta_safe.clamp(min=0))) / eta_safe
        neg = torch.log1p(u * torch.expm1(eta_safe.clamp(max=0))) / eta_safe
        x = torch.where(small, u, torch.where(eta > 0, pos, neg))
        return x.clamp(0, 1)


def _log_bin_factor(log_scales: torch.Tensor) -> torch.Tensor:
    """log(1 - e^{-d}) with d = a - b = 2 / (255 s), exact also for scales so wide that
    e^{-d} rounds to 1 or d to 0: there it is log d - d/2 + d^2/24 - O(d^4), with
    log d = log(2/255) - log s taken without forming d."""
    d = 2 / 255 * torch.exp(-log_scales)
    small = d < 1e-3
    d_safe = torch.where(small, torch.ones_like(d), d)
    series = math.log(2 / 255) - log_scales - d / 2 + d * d / 24
    return torch.where(small, series, torch.log(-torch.expm1(-d_safe)))


class DiscretizedLogisticImage(TorchDistribution):
    """Pixels k/255 (k = 0..255), each a mixture of logistics discretized to 256 bins
    (Salimans et al. 2017, PixelCNN++), independent over the last dimension.

    Channels are independent too: there is no autoregressive coupling of R, G and B within
    a pixel as in PixelCNN++, since the decoder emits all sub-pixels at once.

    With x rescaled to [-1, 1] (bins of half-width 1/255), component m with location mu and
    log-scale log s gives a = (x - mu + 1/255) / s, b = (x - mu - 1/255) / s and

        P(k) = sigmoid(a) - sigmoid(b)  for 0 < k < 255,
        P(0) = sigmoid(a),   P(255) = 1 - sigmoid(b)   (the tails go to the edge bins),

    mixed with softmax(logits) weights. The bin mass is taken in log space exactly:
    sigmoid(a) - sigmoid(b) = sigmoid(a) (1 - sigmoid(b)) (1 - e^{-(a - b)}), and a - b =
    2 / (255 s) does not depend on x, so nothing cancels and nothing underflows; PixelCNN++
    instead falls back to the density at the bin centre where the difference underflows,
    which this formula makes unnecessary. Log-scales are clamped below at -7.

    ``logits``, ``locs`` and ``log_scales`` have shape (..., M, D).
    """

    arg_constraints = {"logits": constraints.real, "locs": constraints.real,
                       "log_scales": constraints.real}
    support = constraints.independent(constraints.unit_interval, 1)
    LOG_SCALE_MIN = -7.0

    def __init__(self, logits: torch.Tensor, locs: torch.Tensor, log_scales: torch.Tensor,
                 validate_args: bool | None = None):
        logits, locs, log_scales = torch.broadcast_tensors(logits, locs, log_scales)
        self.logits, self.locs = logits, locs
        self.log_scales = log_scales.clamp(min=self.LOG_SCALE_MIN)
        super().__init__(locs.shape[:-2], locs.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> "DiscretizedLogisticImage":
        shape = (*batch_shape, *self.locs.shape[-2:])
        return DiscretizedLogisticImage(self.logits.expand(shape), self.locs.expand(shape),
                                        self.log_scales.expand(shape))

    @property
    def mean(self) -> torch.Tensor:
        """The mixture's mean location mapped back to [0, 1] (the tails that the edge bins
        absorb are ignored), clamped."""
        mu = (torch.softmax(self.logits, dim=-2) * self.locs).sum(-2)
        return ((mu + 1) / 2).clamp(0, 1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        v = value.unsqueeze(-2)  # (..., 1, D) against the components' (..., M, D)
        inv_s = torch.exp(-self.log_scales)
        centred = 2 * v - 1 - self.locs
        a = inv_s * (centred + 1 / 255)
        b = inv_s * (centred - 1 / 255)
        log_cdf_a = -F.softplus(-a)  # log sigmoid(a)
        log_sf_b = -F.softplus(b)  # log(1 - sigmoid(b))
        log_bin = log_cdf_a + log_sf_b + _log_bin_factor(self.log_scales)
        log_mass = torch.where(v < 0.5 / 255, log_cdf_a, torch.where(v > 254.5 / 255, log_sf_b, log_bin))
        log_mix = torch.log_softmax(self.logits, dim=-2)
        return torch.logsumexp(log_mix + log_mass, dim=-2).sum(-1)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """A component per pixel (Gumbel-max over the logits), a logistic draw from it,
        clamped to [-1, 1] and rounded to the nearest k/255."""
        shape = (*sample_shape, *self.locs.shape)
        gumbel = -torch.log(-torch.log(torch.rand(shape, device=self.locs.device).clamp(1e-10, 1 - 1e-7)))
        pick = torch.argmax(self.logits.expand(shape) + gumbel, dim=-2, keepdim=True)
        mu = self.locs.expand(shape).gather(-2, pick).squeeze(-2)
        log_s = self.log_scales.expand(shape).gather(-2, pick).squeeze(-2)
        u = torch.rand_like(mu).clamp(1e-5, 1 - 1e-5)
        x = (mu + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))).clamp(-1, 1)
        return torch.round((x + 1) / 2 * 255) / 255


# ----------------------------------------------------------------------------- likelihoods


def _value_range(x: torch.Tensor) -> str:
    return f"[{x.min().item():.4g}, {x.max().item():.4g}]"


class Likelihood(nn.Module):
    """p(x | decoder output) for flat data (..., D); learned globals are its Parameters.

    Subclasses set ``name``, ``discrete`` (log_prob is a log-mass) and ``params_per_value``
    (P, the decoder's numbers per pixel), and implement the methods below.
    """

    name: ClassVar[str]
    discrete: ClassVar[bool]
    params_per_value: int = 1

    def __init__(self, x_dim: int, config: LikelihoodConfig | None = None):
        super().__init__()
        self.config = config if config is not None else LikelihoodConfig()
        check_fields(self.config)
        self.x_dim = x_dim

    def distribution(self, params: torch.Tensor) -> dist.Distribution:
        """params (..., P*D) -> a distribution with batch shape (...) and event shape (D,)."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The mean image (..., D) with values in [0, 1], for pictures."""
        raise NotImplementedError

    def check_support(self, x: torch.Tensor, what: str) -> None:
        """Raise a one-line DataError if ``x`` (described by ``what``, e.g. "the training
        split of mnist") has values this likelihood cannot score, naming the flag that fits."""
        if x.numel() and not torch.isfinite(x).all():
            raise DataError(f"{what} has NaN or infinite values; the {self.name} likelihood needs finite values")

    def init_bias(self, pixel_mean: torch.Tensor) -> torch.Tensor:
        """The decoder's initial output bias (P*D,) from the mean training pixel (D,), so
        that the first steps model the average image (Burda et al. 2016 for Bernoulli)."""
        raise NotImplementedError

    def _check_unit_interval(self, x: torch.Tensor, what: str, needs: str, flags: str) -> None:
        if x.numel() and not ((x >= 0) & (x <= 1)).all():
            raise DataError(f"{what} has values in {_value_range(x)}, outside [0, 1]; "
                            f"the {self.name} likelihood needs {needs}; {flags}", **GREY)


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels from logits (P = 1); data must be exactly 0 or 1."""

    name = "bernoulli"
    discrete = True

    def distribution(self, params: torch.Tensor) -> BernoulliImage:
        return BernoulliImage(params)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def check_support(self, x: torch.Tensor, what: str) -> None:
        super().check_support(x, what)
        if x.numel() and not ((x == 0) | (x == 1)).all():
            raise DataError(f"{what} is not binary (values in {_value_range(x)} other than 0 and 1); "
                            "pass {dynamic} or {threshold}, or a grey-level likelihood: {grey0}, {grey1} or "
                            "{grey2}", dynamic=Flag("binarize", "dynamic"), threshold=Flag("binarize", "threshold"),
                            **GREY)

    @torch.no_grad()
    def init_bias(self, pixel_mean: torch.Tensor) -> torch.Tensor:
        """logit(p) = log p - log1p(-p) of the mean clamped to [1e-3, 1 - 1e-3], so that a
        pixel that is always 0 (or 1) gets a large but finite logit."""
        p = pixel_mean.clamp(1e-3, 1 - 1e-3)
        return torch.log(p) - torch.log1p(-p)


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous-Bernoulli pixels from logits (P = 1) for grey levels in [0, 1]; a density,
    so its log-likelihoods are not comparable with those of discrete likelihoods."""

    name = "continuous-bernoulli"
    discrete = False
    MEAN_CLAMP = 1e-2

    def distribution(self, params: torch.Tensor) -> ContinuousBernoulliImage:
        return ContinuousBernoulliImage(params)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return cb_mean(params)

    def check_support(self, x: torch.Tensor, what: str) -> None:
        super().check_support(x, what)
        self._check_unit_interval(x, what, "values in [0, 1]", "rescale the data to [0, 1] or pass {grey1}")

    @torch.no_grad()
    def init_bias(self, pixel_mean: torch.Tensor) -> torch.Tensor:
        """The logits whose continuous-Bernoulli mean (not lambda) is the pixel mean, found by
        bisection (the mean rises monotonically with the logit). The mean is clamped to
        [0.01, 0.99] first: it nears 0 only like -1/eta, so a mean of 1e-3 would need a
        logit near -1000, a bias the decoder could hardly move since d log p / d eta =
        x - E[x] is at most 1 in size. That caps the bias near |eta| = 100."""
        target = pixel_mean.double().clamp(self.MEAN_CLAMP, 1 - self.MEAN_CLAMP)
        lo, hi = torch.full_like(target, -200.0), torch.full_like(target, 200.0)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = cb_mean(mid) > target
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        return ((lo + hi) / 2).to(pixel_mean.dtype)


class GaussianLikelihood(Likelihood):
    """x ~ Normal(loc = decoder output, scale) per pixel (P = 1) with a learned scale shared
    over images: one per pixel (``gaussian_scale="pixel"``) or one for all pixels
    (``"image"``). scale = softplus(raw) + 1e-3, the floor keeping the density bounded;
    raw starts where the scale is 0.1, a tenth of the pixel range."""

    name = "gaussian"
    discrete = False
    SCALE_FLOOR = 1e-3
    SCALE_INIT = 0.1

    def __init__(self, x_dim: int, config: LikelihoodConfig | None = None):
        super().__init__(x_dim, config)
        shape = (x_dim,) if self.config.gaussian_scale == "pixel" else ()
        raw = math.log(math.expm1(self.SCALE_INIT - self.SCALE_FLOOR))
        self.raw_scale = nn.Parameter(torch.full(shape, raw))

    @property
    def scale(self) -> torch.Tensor:
        """(D,) or () positive scale."""
        return F.softplus(self.raw_scale) + self.SCALE_FLOOR

    def distribution(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Normal(params, self.scale).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.clamp(0, 1)

    def init_bias(self, pixel_mean: torch.Tensor) -> torch.Tensor:
        return pixel_mean.detach().clone()


class DiscretizedLogisticLikelihood(Likelihood):
    """A mixture of ``logistic_mixtures`` (M) discretized logistics per pixel for 8-bit data
    (P = 3M: mixture logits, locations in [-1, 1] units, log-scales). The decoder output
    is read as ``params.view(..., 3M, D)`` and split into three (..., M, D) blocks in that
    order. See ``DiscretizedLogisticImage``."""

    name = "discretized-logistic"
    discrete = True
    LOG_SCALE_INIT = math.log(0.1)

    def __init__(self, x_dim: int, config: LikelihoodConfig | None = None):
        super().__init__(x_dim, config)
        self.mixtures = self.config.logistic_mixtures
        self.params_per_value = 3 * self.mixtures

    def distribution(self, params: torch.Tensor) -> DiscretizedLogisticImage:
        logits, locs, log_scales = params.unflatten(-1, (3 * self.mixtures, self.x_dim)).chunk(3, dim=-2)
        return DiscretizedLogisticImage(logits, locs, log_scales)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.distribution(params).mean

    def check_support(self, x: torch.Tensor, what: str) -> None:
        super().check_support(x, what)
        continuous = "for continuous data pass {grey1} or {grey0}"
        self._check_unit_interval(x, what, "8-bit values k/255 (uint8 data divided by 255)", continuous)
        worst = max((((c * 255) - (c * 255).round()).abs().max().item()
                     for c in x.detach().reshape(-1).split(1 << 22)), default=0.0)
        if worst > 1e-4:
            raise DataError(f"{what} has values in {_value_range(x)} that are not multiples of 1/255 "
                            f"(off by up to {worst:.3g}/255); the {self.name} likelihood needs 8-bit "
                            f"values k/255; {continuous}", **GREY)

    @torch.no_grad()
    def init_bias(self, pixel_mean: torch.Tensor) -> torch.Tensor:
        """Logits 0, every location at the pixel mean in [-1, 1] units, log-scales log(0.1).
        The components start equal; the decoder's random weights tell them apart."""
        m = self.mixtures
        locs = (2 * pixel_mean - 1).repeat(m)
        return torch.cat([torch.zeros_like(locs), locs, torch.full_like(locs, self.LOG_SCALE_INIT)])


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (BernoulliLikelihood, ContinuousBernoulliLikelihood,
                              GaussianLikelihood, DiscretizedLogisticLikelihood)
}


def make_likelihood(name: str, x_dim: int, config: LikelihoodConfig | None = None) -> Likelihood:
    """The likelihood ``name`` for ``x_dim`` pixels; an unknown name lists the choices."""
    try:
        cls = LIKELIHOODS[name]
    except KeyError:
        raise ConfigError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}") from None
    return cls(x_dim, config)
