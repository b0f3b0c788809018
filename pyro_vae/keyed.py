"""Random draws keyed by (seed, datapoint, particle): counter-based noise for evaluation.

Pyro's sample sites draw from torch's global generator, so the draws an image gets depend
on which images share its batch, how the particles are chunked and, across processes, on
each process's generator. Here the standard normal noise of every element is a function
of its coordinates instead: a splitmix64 hash of (seed, site name, datapoint key, particle
index, position in the rest of the value), turned into a normal by the inverse CDF. An
image's estimate is then the same whatever the batch size, the chunks or the number of
processes, and computing it needs no generator state (which a Python loop of generators
per image would, one call per image and chunk).

``KeyedNoise`` is the Pyro messenger that supplies these draws to the guide's sample sites;
it covers every reparameterized site built on normal noise (Normal, MultivariateNormal,
their ``Independent`` and ``TransformedDistribution`` forms, masked or not), and Bernoulli
sites, drawn as 1 where the normal CDF of the noise (a keyed uniform) is below the
probability; it refuses any other, rather than let it draw unkeyed noise silently.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributions as td
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer: a bijection of 64-bit words with full avalanche (int64
    arithmetic wraps around, as the algorithm needs)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


@dataclass(frozen=True)
class DrawKeys:
    """Where a chunk of draws sits: the evaluation's seed, the key of each datapoint of the
    batch (its row in the split), and the index of the chunk's first particle."""

    seed: int
    index: torch.Tensor
    first_particle: int | torch.Tensor = 0  # a 0-d tensor in a traced chunk (``compiled``), where an int would be baked in


def keyed_normal(keys: DrawKeys, site: str, shape: torch.Size, particle_axis: int, data_axis: int,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape`` whose element at (particle p, datapoint b, other
    coordinates r) depends only on (seed, site, index[b], first_particle + p, r)."""
    P, B = shape[particle_axis], shape[data_axis]
    rest = [n for i, n in enumerate(shape) if i not in (particle_axis, data_axis)]
    base = torch.tensor(_signed((keys.seed * 0x100000001B3 + zlib.crc32(site.encode())) % (1 << 64)),
                        dtype=torch.int64, device=device)
    h = _mix(_mix(base + _GOLDEN) ^ keys.index.to(device, torch.int64))  # (B,)
    particles = torch.arange(P, device=device) + keys.first_particle
    h = _mix(h ^ (particles.unsqueeze(-1) * _GOLDEN))  # (P, B)
    h = _mix(h.unsqueeze(-1) ^ torch.arange(math.prod(rest), device=device))  # (P, B, rest)
    # 53 bits as (2u - 1) in (-1, 1), u = (k + 1/2) 2^-53: normal tails to 8.3 sd; erfinv is
    # the inverse CDF that torch vectorizes (ndtri is several times slower on CPU)
    v = _shr(h, 11).double().mul_(2.0**-52).add_(2.0**-53 - 1.0)
    eps = (torch.erfinv(v) * math.sqrt(2.0)).to(dtype).view(P, B, *rest)
    return torch.movedim(eps, (0, 1), (particle_axis, data_axis))


def reparameterized(fn: td.Distribution, eps: torch.Tensor) -> torch.Tensor:
    """A draw of ``fn`` from its standard normal noise ``eps`` (of ``fn``'s full shape);
    for a Bernoulli, a discrete draw by inversion of the uniform Phi(eps)."""
    if isinstance(fn, (td.Independent, MaskedDistribution)):
        return reparameterized(fn.base_dist, eps)
    if isinstance(fn, td.Bernoulli):
        return (0.5 * torch.erfc(-eps / math.sqrt(2.0)) < fn.probs).to(fn.probs.dtype)
    if isinstance(fn, td.Normal):
        return fn.loc + fn.scale * eps
    if isinstance(fn, td.MultivariateNormal):
        return fn.loc + (fn.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    if isinstance(fn, td.TransformedDistribution):
        base_shape = fn.base_dist.batch_shape + fn.base_dist.event_shape
        if base_shape.numel() == eps.numel():
            value = reparameterized(fn.base_dist, eps.reshape(base_shape))
            for t in fn.transforms:
                value = t(value)
            return value
    raise ValueError(f"keyed draws need a guide site built on normal noise (Normal, MultivariateNormal, "
                     f"or a transform of one) or a Bernoulli, not a {type(fn).__name__}; enumerate discrete sites")


#: the ``infer`` key of a sample site that is a global latent, outside the data plate (the
#: weights of a Bayesian network): the evaluator draws it inside each importance weight,
#: keyed by (seed, site, particle) alone, and leaves its prior / guide ratio out of the
#: per-datapoint weights (``bounds.importance_traces``)
GLOBAL = "global_latent"
#: the datapoint key of a global latent's draws: one draw per particle for every datapoint
GLOBAL_KEY = -1


class KeyedNoise(Messenger):
    """Supply the value of every guide sample site that is neither observed, enumerated nor
    given (by replay) from ``keyed_normal``; a global latent's (``GLOBAL``) from the key of
    no datapoint, so that every datapoint sees the same draw of each particle. Enter it
    outside the particle plate, so that each site's distribution arrives broadcast over
    particles and data."""

    def __init__(self, keys: DrawKeys, particle_dim: int):
        super().__init__()
        self.keys, self.particle_dim = keys, particle_dim

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        fn = msg["fn"]
        nb = len(fn.batch_shape)
        shape = fn.batch_shape + fn.event_shape
        keys = self.keys
        if msg["infer"].get(GLOBAL) and nb >= -self.particle_dim and shape[nb - 1] == 1:
            keys = DrawKeys(keys.seed, torch.full((1,), GLOBAL_KEY, device=keys.index.device), keys.first_particle)
        if nb < -self.particle_dim or shape[nb - 1] != len(keys.index):
            raise ValueError(f"site {msg['name']!r} is not inside the particle and data plates "
                             f"(shape {tuple(shape)}); keyed draws need both")
        eps = keyed_normal(keys, msg["name"], shape, nb + self.particle_dim, nb - 1,
                           torch.get_default_dtype(), keys.index.device)
        msg["value"] = reparameterized(fn, eps)


def fold(*words: int) -> int:
    """A 63-bit seed that depends on every word (as ``fold_in`` does for JAX keys): for
    streams of their own, such as each training process's generator."""
    h = torch.tensor(_GOLDEN, dtype=torch.int64)
    for w in words:
        h = _mix(h ^ torch.tensor(_signed(w % (1 << 64)), dtype=torch.int64))
    return int(h) & ((1 << 63) - 1)
