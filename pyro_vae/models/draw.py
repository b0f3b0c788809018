"""DRAW (Gregor et al. 2015): a recurrent VAE that builds an image on a canvas over T steps,
with a latent z_t per step, as one Pyro model/guide pair.

Model (the canvas c holds the likelihood's parameters, ``P * D`` numbers per image):

    c_0 = b (learned, started at the likelihood's bias for the mean training pixel),
    for t = 1..T:  z_t ~ N(0, I),  h_t^dec = LSTM^dec(z_t, h_{t-1}^dec),  c_t = c_{t-1} + write(h_t^dec)
    x ~ p(x | c_T)

Guide, with x^_t = x - mean(c_{t-1}) the error image (x - sigmoid(c_{t-1}) for a Bernoulli):

    h_t^enc = LSTM^enc([read(x, x^_t, h_{t-1}^dec), h_{t-1}^dec], h_{t-1}^enc),
    q(z_t | x, z_<t) = N(mu(h_t^enc), diag sigma(h_t^enc)^2)

The guide runs the decoder on its own draws to get h^dec; the model recomputes every
decoder state from the z's it is given and reads nothing the guide computed. All T + 1
sites live inside the data plate (the z's under ``pyro.markov``), so the evaluator, AIS
and every objective treat them as they treat any set of latent sites; with ``meanfield``
each q(z_t | ...) against N(0, I) has its analytic KL.

Attention (``attention``): ``none`` reads the whole image and error image and writes the
whole canvas through a linear map; ``filterbank`` uses the paper's separable Gaussian
filterbanks, an N x N grid of filters whose centre (g_X, g_Y), stride delta, variance
sigma^2 and intensity gamma come from a linear map of h^dec (``filterbank``, ``Attention``):
read N = ``read_size``, write N = ``write_size``, the same filters for every channel.

Read-outs: a code z is the concatenation (z_1, ..., z_T), (..., T * z_dim). ``encode`` and
``posterior`` follow the guide along its mean path (each z_t at the mean of q(z_t | ...),
fed forward): the locations and scales of the T per-step Gaussians on that path. That is
q's conditional at that path, a summary for pictures and codes, not the density of the
guide's joint over z (which the evaluator uses). ``decode(z)`` runs the decoder over the T
codes of z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from .. import plots
from ..config import option
from ..data import Dataset
from ..errors import ConfigError, Flag
from ..likelihoods import LIKELIHOODS, LikelihoodConfig, make_likelihood
from ..nets import cat_last
from .base import Family, Shape

ATTENTIONS = ("filterbank", "none")


@dataclass
class DRAWConfig(LikelihoodConfig):
    """DRAW's sizes. Defaults: the paper's MNIST model (T = 64, LSTMs of 256, z of 100 per
    step, read 2 x 2, write 5 x 5)."""

    likelihood: str = option("bernoulli", "p(x | c_T) of each pixel: bernoulli for 0/1 data; continuous-bernoulli, "
                             "gaussian or discretized-logistic (8-bit data) for grey levels and colour", LIKELIHOODS)
    attention: str = option("filterbank", "filterbank: read and write N x N grids of Gaussian filters placed by "
                            "h^dec; none: read the whole image, write the whole canvas", ATTENTIONS)
    steps: int = option(64, "drawing steps T (one latent z_t each)", at_least=1)
    hidden: int = option(256, "units of the encoder's and the decoder's LSTM", at_least=1)
    z_dim: int = option(100, "latent dimensions per step", at_least=1)
    read_size: int = option(2, "N of the read filterbank (N x N per channel; --attention filterbank)", at_least=1)
    write_size: int = option(5, "N of the write filterbank (--attention filterbank)", at_least=1)

    @property
    def guide(self) -> str:
        """Each q(z_t | ...) is a diagonal Gaussian: DRAW takes no flow guide."""
        return "diagonal"

    def likelihood_config(self) -> LikelihoodConfig:
        return LikelihoodConfig(gaussian_scale=self.gaussian_scale, logistic_mixtures=self.logistic_mixtures)


class LSTM(nn.Module):
    """An LSTM cell on inputs with any leading dimensions (particles, data), which
    ``nn.LSTMCell`` does not take; the state (h, c) broadcasts against the input."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.input = nn.Linear(in_dim, 4 * hidden)
        self.recurrent = nn.Linear(hidden, 4 * hidden, bias=False)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, g, o = (self.input(x) + self.recurrent(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def filterbank(centre: torch.Tensor, stride: torch.Tensor, variance: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """The paper's 1-D Gaussian filterbank, (..., n, size): row i (1..n) is a Gaussian over
    the pixel positions a = 1..size centred at mu_i = centre + (i - n/2 - 1/2) stride with
    this variance, normalised to sum to 1 over a (a softmax, which is that normalisation
    without underflow)."""
    i = torch.arange(1, n + 1, dtype=centre.dtype, device=centre.device)
    a = torch.arange(1, size + 1, dtype=centre.dtype, device=centre.device)
    mu = centre.unsqueeze(-1) + (i - n / 2 - 0.5) * stride.unsqueeze(-1)
    return torch.softmax(-(a - mu.unsqueeze(-1)).pow(2) / (2 * variance[..., None, None]), -1)


class Window(NamedTuple):
    """Where one attention grid sits: centre (g_X, g_Y), stride, variance and intensity,
    each (...,) in pixel units (positions 1..W and 1..H)."""

    gx: torch.Tensor
    gy: torch.Tensor
    stride: torch.Tensor
    variance: torch.Tensor
    gamma: torch.Tensor


class Attention(nn.Module):
    """An N x N filterbank placed by a linear map of h^dec: (g~_X, g~_Y, log sigma^2,
    log delta~, log gamma) -> g_X = (W + 1)(g~_X + 1)/2, g_Y = (H + 1)(g~_Y + 1)/2,
    delta = (max(H, W) - 1) / (N - 1) delta~ (N = 1: delta~, one filter has no stride).
    ``read`` applies it to images, ``write`` transposes it onto the canvas.

    The grid starts over the middle half of the image (delta~ = 1/2) with filters whose
    standard deviation is half the stride: with delta~ = 1 and sigma = 1 a 2 x 2 read
    would sit on the four corner pixels, which are blank in MNIST, and carry nothing
    about x."""

    START_STRIDE = 0.5  # delta~ before training

    def __init__(self, hidden: int, n: int, image_shape: Shape):
        super().__init__()
        self.n, self.image_shape = n, image_shape
        self.place = nn.Linear(hidden, 5)
        stride = (max(image_shape[1:]) - 1) / max(n - 1, 1) * self.START_STRIDE
        with torch.no_grad():
            self.place.bias[2] = 2 * math.log(stride / 2)
            self.place.bias[3] = math.log(self.START_STRIDE)

    def window(self, h: torch.Tensor) -> Window:
        _, H, W = self.image_shape
        gx, gy, log_var, log_stride, log_gamma = self.place(h).unbind(-1)
        stride = (max(H, W) - 1) / max(self.n - 1, 1) * log_stride.exp()
        return Window((W + 1) / 2 * (gx + 1), (H + 1) / 2 * (gy + 1), stride, log_var.exp(), log_gamma.exp())

    def filters(self, w: Window) -> tuple[torch.Tensor, torch.Tensor]:
        """F_Y (..., N, H) and F_X (..., N, W)."""
        _, H, W = self.image_shape
        return filterbank(w.gy, w.stride, w.variance, self.n, H), filterbank(w.gx, w.stride, w.variance, self.n, W)

    def read(self, images: torch.Tensor, w: Window) -> torch.Tensor:
        """gamma F_Y x F_X^T for each channel of (..., C, H, W) images: (..., C, N, N)."""
        fy, fx = self.filters(w)
        return w.gamma[..., None, None, None] * (fy.unsqueeze(-3) @ images @ fx.unsqueeze(-3).transpose(-1, -2))

    def write(self, patch: torch.Tensor, w: Window) -> torch.Tensor:
        """F_Y^T p F_X / gamma for each channel of (..., K, N, N) patches: (..., K, H, W)."""
        fy, fx = self.filters(w)
        return (fy.unsqueeze(-3).transpose(-1, -2) @ patch @ fx.unsqueeze(-3)) / w.gamma[..., None, None, None]


class State(NamedTuple):
    """The decoder's recurrent state and the canvas after a step."""

    h: torch.Tensor
    c: torch.Tensor
    canvas: torch.Tensor


class DRAW(Family):
    """A recurrent VAE drawing on a canvas over T steps, with filterbank or no attention."""

    Config = DRAWConfig
    default_objective = "meanfield"
    objectives = ("meanfield", "trace", "iwae", "renyi", "dreg")

    def __init__(self, shape: Shape | int, config: DRAWConfig | None = None):
        super().__init__(shape, config or DRAWConfig())
        c = self.config
        if self.image_shape is None:
            raise ConfigError(f"draw needs images (C, H, W): its attention reads and writes windows of an image, "
                              f"and these data are flat vectors of shape {self.shape}; pass images (N, H, W), "
                              f"(N, H, W, C) or (N, C, H, W)")
        channels, H, W = self.image_shape
        if c.attention == "filterbank":
            for name in ("read_size", "write_size"):
                if getattr(c, name) > min(H, W):
                    raise ConfigError(f"{{flag}} must be at most the image's smaller side, {min(H, W)}, "
                                      f"got {getattr(c, name)}", flag=Flag(name))
        self.likelihood = make_likelihood(c.likelihood, self.x_dim, c.likelihood_config())
        self.params = self.likelihood.params_per_value
        if c.attention == "filterbank":
            self.reader = Attention(c.hidden, c.read_size, self.image_shape)
            self.writer = Attention(c.hidden, c.write_size, self.image_shape)
            read_dim, patch = 2 * channels * c.read_size**2, self.params * channels * c.write_size**2
        else:
            read_dim, patch = 2 * self.x_dim, self.params * self.x_dim
        self.encoder = LSTM(read_dim + c.hidden, c.hidden)
        self.q_loc = nn.Linear(c.hidden, c.z_dim)
        self.q_scale = nn.Linear(c.hidden, c.z_dim)
        self.decoder = LSTM(c.z_dim, c.hidden)
        self.patch = nn.Linear(c.hidden, patch)
        self.canvas0 = nn.Parameter(torch.zeros(self.params * self.x_dim))

    # --- the networks ----------------------------------------------------------------

    def start(self, batch: int) -> State:
        """h_0^dec = 0, its cell state 0, c_0 = b for ``batch`` images."""
        zeros = torch.zeros(batch, self.config.hidden, device=self.device)
        return State(zeros, zeros, self.canvas0.expand(batch, -1))

    def write(self, h: torch.Tensor) -> torch.Tensor:
        """write(h^dec): what a step adds to the canvas, (..., P * D)."""
        if self.config.attention == "none":
            return self.patch(h)
        n = self.config.write_size
        patch = self.patch(h).unflatten(-1, (self.params * self.image_shape[0], n, n))
        return self.writer.write(patch, self.writer.window(h)).flatten(-3)

    def read(self, x: torch.Tensor, error: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """read(x, x^, h^dec_{t-1}): (..., 2 C N^2), or (..., 2 D) without attention."""
        if self.config.attention == "none":
            return cat_last(x, error)
        w = self.reader.window(h)
        # (..., 2 C, H, W): the image's channels, then the error image's, under one window
        images = torch.stack(torch.broadcast_tensors(x, error), -2).unflatten(-1, self.image_shape)
        return self.reader.read(images.flatten(-4, -3), w).flatten(-3)

    def decoder_step(self, z: torch.Tensor, s: State) -> State:
        """h_t^dec = LSTM^dec(z_t, h_{t-1}^dec), c_t = c_{t-1} + write(h_t^dec)."""
        h, c = self.decoder(z, (s.h, s.c))
        return State(h, c, s.canvas + self.write(h))

    def step_posterior(self, x: torch.Tensor, s: State, enc: tuple[torch.Tensor, torch.Tensor]
                       ) -> tuple[dist.Distribution, tuple[torch.Tensor, torch.Tensor]]:
        """q(z_t | x, z_<t) from the decoder state after step t - 1, and the encoder's new state."""
        error = x - self.likelihood.mean(s.canvas)
        enc = self.encoder(cat_last(self.read(x, error, s.h), s.h), enc)
        return dist.Normal(self.q_loc(enc[0]), F.softplus(self.q_scale(enc[0])) + 1e-6).to_event(1), enc

    # --- the Pyro pair ---------------------------------------------------------------

    def model(self, x: torch.Tensor, kl_weight: float = 1.0) -> None:
        """Generative story: T codes drawn from N(0, I), the canvas built from them; ``x``
        is a (batch, D) tensor in the likelihood's support."""
        batch = x.shape[0]
        with pyro.plate("data", batch):
            s = self.start(batch)
            prior = dist.Normal(torch.zeros(batch, self.config.z_dim, device=self.device), 1.0).to_event(1)
            for t in pyro.markov(range(1, self.config.steps + 1)):
                with poutine.scale(scale=kl_weight):
                    z = pyro.sample(f"z_{t}", prior)
                s = self.decoder_step(z, s)
            pyro.sample("x", self.likelihood.distribution(s.canvas), obs=x)

    def guide(self, x: torch.Tensor, kl_weight: float = 1.0) -> list[State]:
        """q(z_1..z_T | x), running the decoder on its own draws; returns the decoder
        states it went through (for pictures; the model never sees them)."""
        batch = x.shape[0]
        states = []
        with pyro.plate("data", batch):
            s = self.start(batch)
            enc = (s.h, s.c)
            for t in pyro.markov(range(1, self.config.steps + 1)):
                q, enc = self.step_posterior(x, s, enc)
                with poutine.scale(scale=kl_weight):
                    z = pyro.sample(f"z_{t}", q)
                s = self.decoder_step(z, s)
                states.append(s)
        return states

    # --- read-outs -------------------------------------------------------------------

    def mean_path(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[State], list[Window | None]]:
        """The guide along its mean path (each z_t at its location, fed forward): the T
        locations and scales concatenated, (batch, T * z_dim) each, the decoder states and
        the read windows (None without attention)."""
        s = self.start(x.shape[0])
        enc = (s.h, s.c)
        locs, scales, states, windows = [], [], [], []
        for _ in range(self.config.steps):
            windows.append(self.reader.window(s.h) if self.config.attention == "filterbank" else None)
            q, enc = self.step_posterior(x, s, enc)
            loc, scale = q.base_dist.loc, q.base_dist.scale
            s = self.decoder_step(loc, s)
            locs.append(loc), scales.append(scale), states.append(s)
        return torch.cat(locs, -1), torch.cat(scales, -1), states, windows

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """The T per-step Gaussians along the guide's mean path, as one diagonal Gaussian
        over the concatenated code (see the module docstring): event shape (T * z_dim,)."""
        loc, scale, _, _ = self.mean_path(x)
        return dist.Normal(loc, scale).to_event(1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Locations and scales of the per-step Gaussians along the mean path, (batch, T * z_dim)."""
        loc, scale, _, _ = self.mean_path(x)
        return loc, scale

    def canvases(self, z: torch.Tensor) -> list[State]:
        """The decoder states and canvases c_1..c_T for concatenated codes (..., T * z_dim)."""
        s = self.start(1)
        s = State(*(v.expand(*z.shape[:-1], v.shape[-1]) for v in s))
        states = []
        for zt in z.chunk(self.config.steps, -1):
            s = self.decoder_step(zt, s)
            states.append(s)
        return states

    def decode(self, z: torch.Tensor, *args: Any) -> dist.Distribution:
        """p(x | z) for concatenated codes z (..., T * z_dim): the likelihood at c_T."""
        return self.likelihood.distribution(self.canvases(z)[-1].canvas)

    @torch.no_grad()
    def decode_mean(self, z: torch.Tensor, *args: Any) -> torch.Tensor:
        return self.likelihood.mean(self.canvases(z)[-1].canvas)

    def prior_codes(self, n: int) -> torch.Tensor:
        """``n`` concatenated codes from N(0, I), (n, T * z_dim)."""
        return torch.randn(n, self.config.steps * self.config.z_dim, device=self.device)

    @torch.no_grad()
    def sample(self, n: int, draw: bool = False) -> torch.Tensor:
        """``n`` images from the model: the likelihood's means at c_T, or draws from it."""
        z = self.prior_codes(n)
        return self.decode(z).sample() if draw else self.decode_mean(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | c_T) at the end of the guide's mean path."""
        return self.likelihood.mean(self.mean_path(x)[2][-1].canvas)

    # --- hooks of the training loop --------------------------------------------------

    def init_from_data(self, data: Dataset, seed: int) -> None:
        """c_0 from the mean training pixel (the logit of it, for a Bernoulli), so that the
        first steps add to the average image."""
        with torch.no_grad():
            self.canvas0.copy_(self.likelihood.init_bias(data.pixel_mean("train").to(self.device)))

    @torch.no_grad()
    def figures(self, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                directory: Path) -> list[Path]:
        """The canvas sequence mean(c_t), t = 1..T, of samples and of reconstructions (with
        the write windows, and the read windows of the reconstructions, drawn on them for
        filterbank attention), and interpolations between mean-path codes."""
        attention = self.config.attention == "filterbank"
        sampled = self.canvases(self.prior_codes(8))
        _, _, recon, reads = self.mean_path(x[:8])
        written = []
        for name, states, read in (("samples", sampled, None), ("reconstructions", recon, reads)):
            images = torch.stack([self.likelihood.mean(s.canvas) for s in states], 1)  # (n, T, D)
            boxes = None
            if attention:
                boxes = {"write": [self.box(self.writer, s.h) for s in states]}
                if read is not None:
                    boxes["read"] = [self.box(self.reader, w=w) for w in read]
            title = f"DRAW {name}, canvas after each of the {len(states)} steps"
            if boxes:
                title += " (" + ", ".join(f"{k} window {plots.BOX_COLOURS[k].removeprefix('tab:')}" for k in boxes) + ")"
            written.append(plots.canvas_sequence(images, image_shape, boxes, directory / f"canvas-{name}.png",
                                                 title=title))
        written.append(plots.latent_interpolation(self, x, image_shape, directory / "interpolation.png"))
        return written

    @staticmethod
    def box(attention: Attention, h: torch.Tensor | None = None, w: Window | None = None) -> torch.Tensor:
        """The span of a grid's filter centres, (..., 4): x0, y0, x1, y1 in the coordinates
        of a picture whose pixel k (1..W) is drawn at k - 1."""
        w = attention.window(h) if w is None else w
        half = (attention.n - 1) / 2 * w.stride
        # positions 1..W map to plotting coordinates 0..W-1
        return torch.stack([w.gx - half - 1, w.gy - half - 1, w.gx + half - 1, w.gy + half - 1], -1)

