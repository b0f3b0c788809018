"""Per-datapoint importance-sampled bounds on log p(x) for any model/guide pair.

For each datapoint x and K draws z_k ~ q(z | x),

    log w_k = log p(x, z_k) - log q(z_k | x)
    ELBO    = mean_k log w_k
    IWAE-k  = E[ logsumexp of k weights - log k ]        (Burda et al. 2016)
    log p(x) ~ logsumexp_{k<=K} log w_k - log K           (the IWAE-K bound, K large)

IWAE-K is a bound in expectation (E IWAE-K <= log p(x)) and a noisy one: its Monte Carlo
error and the shape k-hat of the tail of the weights, which says whether that error can
be trusted, come from ``diagnostics``, as does the jackknife estimate (JVI, Nowozin 2018),
an estimate of log p(x) with the O(1/K) part of IWAE-K's bias removed, which is no bound.

Pyro's ``Importance`` and ``vectorized_importance_weights`` give one weight per particle
for the whole batch; here the particles are a plate of their own and nothing is summed
over the data plate, so every weight belongs to one datapoint. Sites marked for parallel
enumeration are summed out exactly inside each weight: their log-densities broadcast
along extra left dimensions, and a logsumexp over those dimensions marginalises them
before any average over K. A site enumerated in the guide contributes its model prior and no guide density, which
makes w_k = sum_y p(x, y, z_k^y) / q(z_k^y | x, y), still unbiased for p(x).

Every latent lives inside the model's data plate, except global latents that model and
guide mark ``infer[keyed.GLOBAL]`` (the weights W of a Bayesian network, outside the data
plate). Those are drawn from the guide inside each importance weight, one draw W_k per
particle (shared by the datapoints of that particle, keyed by the seed and the particle),
and their prior / guide ratio p(W_k) / q(W_k) is left out of the per-datapoint weight:

    w_k = p(x | z_k, W_k) p(z_k) / q(z_k | x),   W_k ~ q(W),   E[w_k] = E_q(W)[p(x | W)],

so that IWAE-K is a bound, in expectation, on the log predictive likelihood under the
weight posterior, log E_q(W)[p(x | W)] (and the ELBO on E_q(W)[log p(x | W)]), not on the
marginal likelihood log p(x) of the prior over W, and the KL term reported is z's alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from .compiled import Compiled
from .diagnostics import K_HAT_INFINITE_VARIANCE, K_HAT_UNRELIABLE, WeightStream, _Moments
from .keyed import GLOBAL, DrawKeys, KeyedNoise
from .pair import family_of, own_parameters

DEFAULT_SWEEP = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def _site_log_prob(site: dict) -> torch.Tensor:
    # unscaled on purpose: KL annealing and subsample scales are training devices, not densities
    lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(lp, mask=site["mask"])


def _detached(fn: Any) -> Any:
    """The same distribution with its parameters cut from the graph (for DReG's log q)."""
    if isinstance(fn, dist.Independent):
        return _detached(fn.base_dist).to_event(fn.reinterpreted_batch_ndims)
    if not isinstance(fn, (dist.Normal, dist.LogNormal, dist.Laplace, dist.StudentT)):
        raise ValueError(f"cannot stop the gradient of the parameters of a {type(fn).__name__} guide site")
    return type(fn)(**{k: getattr(fn, k).detach() for k in fn.arg_constraints if k in fn.__dict__})


def log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int,
    *args: Any,
    max_plate_nesting: int = 1,
    keys: DrawKeys | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log importance weights of ``num_particles`` draws for each row of ``x``.

    Returns ``(log_w, log_lik)``, both of shape (num_particles, batch): the weights, and
    the observed sites' log-likelihood for the same draws (averaged over any enumerated
    variables under their posterior given x and z), from which E_q[log p(x | z)] and the
    KL term of the ELBO are read off.

    The particles are a vectorized plate left of the model's own plates (as in Pyro's
    ``vectorize_particles=True``), so the encoder runs once per datapoint and the decoder
    once per draw; enumerated sites take the dimensions left of the particle plate.
    With ``keys`` the guide's draws are keyed by (seed, datapoint, particle)
    (``keyed.KeyedNoise``) instead of coming from torch's global generator.
    """
    log_w, log_lik, _ = importance_traces(model, guide, x, num_particles, *args,
                                          max_plate_nesting=max_plate_nesting, keys=keys, **kwargs)
    return log_w, log_lik


def importance_traces(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int,
    *args: Any,
    max_plate_nesting: int = 1,
    stop_guide_params: bool = False,
    stop_draws: bool = False,
    keys: DrawKeys | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, poutine.Trace]:
    """``log_weights`` and the guide's trace. With ``stop_guide_params`` the guide's
    log-densities are computed with their distribution parameters detached, so that the
    guide's parameters reach the weights only through the reparameterized draws (the
    form that doubly reparameterized gradients need). With ``stop_draws`` the guide's
    draws are cut from the graph before the model scores them (and in the guide trace
    returned), so that the guide's parameters reach the weights only through log q (what
    wake-sleep's gradients need)."""
    log_w, log_lik, guide_trace, _ = importance_traces_with_model(
        model, guide, x, num_particles, *args, max_plate_nesting=max_plate_nesting,
        stop_guide_params=stop_guide_params, stop_draws=stop_draws, keys=keys, **kwargs)
    return log_w, log_lik, guide_trace


def importance_traces_with_model(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int,
    *args: Any,
    max_plate_nesting: int = 1,
    stop_guide_params: bool = False,
    stop_draws: bool = False,
    keys: DrawKeys | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, poutine.Trace, poutine.Trace]:
    """``importance_traces`` and the model's trace (replayed on the guide's draws)."""
    batch = x.shape[0]
    particle_dim = -1 - max_plate_nesting
    first_enum_dim = particle_dim - 1

    keyed = contextlib.nullcontext() if keys is None else KeyedNoise(keys, particle_dim)
    with keyed, pyro.plate("_iw_particles", num_particles, dim=particle_dim):
        guide_trace = poutine.trace(
            poutine.enum(guide, first_available_dim=first_enum_dim)
        ).get_trace(x, *args, **kwargs)
        if stop_draws:
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and not site["is_observed"]:
                    site["value"] = site["value"].detach()
        guide_enum_dims = [
            s["infer"]["_enumerate_dim"]
            for s in guide_trace.nodes.values()
            if s["type"] == "sample" and "_enumerate_dim" in s["infer"]
        ]
        model_first_dim = min(guide_enum_dims) - 1 if guide_enum_dims else first_enum_dim
        model_trace = poutine.trace(
            poutine.replay(poutine.enum(model, first_available_dim=model_first_dim), trace=guide_trace)
        ).get_trace(x, *args, **kwargs)

    log_joint: Any = 0.0
    log_lik: Any = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get(GLOBAL):
            continue
        lp = _site_log_prob(site)
        if lp.dim() < 2 or lp.shape[-1] != batch:
            raise ValueError(
                f"site {name!r} is not inside the data plate (log-density shape "
                f"{tuple(lp.shape)}); per-datapoint bounds need every site in it"
            )
        log_joint = log_joint + lp
        if site["is_observed"]:
            log_lik = log_lik + lp
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site) \
                and not site["infer"].get(GLOBAL):
            if "_enumerate_dim" not in site["infer"]:
                if stop_guide_params:
                    site = {**site, "fn": _detached(site["fn"])}
                log_joint = log_joint - _site_log_prob(site)

    # sum out enumerated variables: every dimension left of (particles, data)
    if not isinstance(log_lik, torch.Tensor):  # no observed site
        log_lik = log_joint.new_zeros(())
    shape = torch.broadcast_shapes(log_joint.shape, log_lik.shape, (num_particles, batch))
    log_joint = log_joint.expand(shape).reshape(-1, num_particles, batch)
    log_lik = log_lik.expand(shape).reshape(log_joint.shape)
    if log_joint.shape[0] == 1:
        return log_joint[0], log_lik[0], guide_trace, model_trace
    posterior = torch.softmax(log_joint, dim=0)
    return torch.logsumexp(log_joint, dim=0), (posterior * log_lik).sum(0), guide_trace, model_trace


def guide_log_density(guide_trace: poutine.Trace) -> torch.Tensor | float:
    """log q of a guide trace's draws: the unscaled log-densities of its latent sites,
    summed (each datapoint's, where the sites are in the data plate)."""
    total: Any = 0.0
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            total = total + _site_log_prob(site)
    return total


def _chunk_weights(model: Callable, guide: Callable, seed: int, compile: bool, log: Callable[[str], None] | None,
                   kwargs: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, ...]]:
    """``(x, index, first particle, particles) -> log_weights`` of one chunk with keyed
    draws: eager, or through a ``Compiled`` trace keyed by the chunk's shape."""
    def eager(x: torch.Tensor, index: torch.Tensor, first: Any, n: int) -> tuple[torch.Tensor, ...]:
        with own_parameters():  # the evaluator writes nothing to Pyro's parameter store
            return log_weights(model, guide, x, n, keys=DrawKeys(seed, index, first), **kwargs)

    if not compile:
        return eager
    family = family_of(model)
    if family is None or kwargs:
        if log:
            log("compiled evaluator chunk off, running eagerly: it needs the model as a method of its module, "
                "and no extra arguments")
        return eager
    compiled = Compiled(family, "evaluator chunk", log)

    def traced(x: torch.Tensor, index: torch.Tensor, first: int, n: int) -> tuple[torch.Tensor, ...]:
        first_t = torch.tensor(first, dtype=torch.int64, device=x.device)
        return compiled(lambda *ts: eager(*ts, n), (x, index, first_t), (n, seed))

    return traced


class _IWAEGroups:
    """IWAE-k per datapoint from disjoint groups of k consecutive draws, fed in chunks:
    the mean of the groups' log mean weights and its standard error. A group runs across
    chunks as a running logsumexp; draws after the last whole group are left out."""

    def __init__(self, k: int, like: torch.Tensor):
        self.k = k
        self.partial = torch.full_like(like, -math.inf)
        self.filled = 0
        self.groups = _Moments(like)

    def _complete(self, lse: torch.Tensor) -> None:
        self.groups.update(lse - math.log(self.k))

    def update(self, lw: torch.Tensor) -> None:
        i, n, k = 0, lw.shape[0], self.k
        if self.filled:
            i = min(k - self.filled, n)
            self.partial = torch.logaddexp(self.partial, torch.logsumexp(lw[:i], 0))
            self.filled += i
            if self.filled < k:
                return
            self._complete(self.partial.unsqueeze(0))
            self.filled = 0
        whole = (n - i) // k
        if whole:
            self._complete(torch.logsumexp(lw[i : i + whole * k].view(whole, k, -1), 1))
            i += whole * k
        if i < n:
            self.partial, self.filled = torch.logsumexp(lw[i:], 0), n - i

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.groups.mean, self.groups.std() / math.sqrt(self.groups.n)


@dataclass
class BoundEstimates:
    """Per-datapoint bound estimates in nats (higher is better), one entry per datapoint.

    ``log_px`` is IWAE-K; ``log_px_se`` its Monte Carlo error (``diagnostics.log_mean_exp_se``,
    which models the tail of the weights), to be trusted only where ``k_hat`` <= 0.7;
    ``log_px_se_delta`` the plain delta-method error, kept for comparison (too small under
    heavy tails). ``jackknife`` is the JVI estimate of order 1 from the same draws (an
    estimate, not a bound), ``jackknife_se`` its error (that of IWAE-K, to first order).
    """

    num_particles: int
    elbo: torch.Tensor
    elbo_se: torch.Tensor
    log_lik: torch.Tensor  # E_q[log p(x | z)], the reconstruction term
    log_px: torch.Tensor  # IWAE bound at K = num_particles
    log_px_se: torch.Tensor
    iwae: dict[int, torch.Tensor] = field(default_factory=dict)
    iwae_se: dict[int, torch.Tensor] = field(default_factory=dict)
    k_hat: torch.Tensor | None = None  # Pareto shape of the upper tail of each image's weights
    log_px_se_delta: torch.Tensor | None = None
    jackknife: torch.Tensor | None = None
    jackknife_se: torch.Tensor | None = None

    @classmethod
    def cat(cls, parts: Sequence[BoundEstimates]) -> BoundEstimates:
        """The estimates of consecutive blocks of datapoints as one (as one call on all of
        them gives, since the draws are keyed by datapoint)."""
        def join(values: list[Any]) -> Any:
            if values[0] is None:
                return None
            if isinstance(values[0], dict):
                return {k: torch.cat([v[k] for v in values]) for k in values[0]}
            return torch.cat(values)

        return cls(parts[0].num_particles, **{f.name: join([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(cls) if f.name != "num_particles"})

    @property
    def kl(self) -> torch.Tensor:
        """The ELBO's KL term, KL(q(z|x) || p(z)) (with enumerated variables inside)."""
        return self.log_lik - self.elbo

    @property
    def unreliable(self) -> torch.Tensor:
        """Datapoints whose IWAE-K error cannot be trusted: k-hat > 0.7, or no finite error."""
        bad = ~torch.isfinite(self.log_px_se)
        if self.k_hat is not None:
            bad |= self.k_hat > K_HAT_UNRELIABLE
        return bad

    def summary(self) -> dict[str, Any]:
        """Dataset means with two standard errors each: ``mc_se`` (the Monte Carlo error of
        this estimate, for these images) and ``data_se`` (spread over images / sqrt(N)).

        The Monte Carlo error of IWAE-K and of the jackknife estimate is ``None`` when any
        image's k-hat exceeds 0.7 (``mc_se_withheld`` then counts them, and
        ``mc_se_trusted_images`` gives the error of the mean over the other images); the
        delta-method error is ``mc_se_delta``, for comparison. ``pareto_k`` summarises
        k-hat: the shares of images above 0.5 (infinite variance of the weights) and 0.7
        (PSIS: the estimate is unreliable at this K), and the worst images' positions."""
        n = self.elbo.numel()
        bad = self.unreliable

        def quad(se: torch.Tensor) -> float | None:
            return _nan_to_none(se.pow(2).sum().sqrt().item() / se.numel()) if se.numel() else None

        def stats(values: torch.Tensor, se: torch.Tensor | None = None,
                  tail_aware: bool = False) -> dict[str, Any]:
            out: dict[str, Any] = {"mean": values.mean().item()}
            out["mc_se"] = None if se is None else quad(se)
            out["data_se"] = _nan_to_none(values.std().item() / math.sqrt(n)) if n > 1 else None
            if tail_aware and se is not None:
                withheld = int(bad.sum())
                out["mc_se_withheld"] = withheld
                if withheld:
                    out["mc_se"] = None
                    out["mc_se_trusted_images"] = quad(se[~bad])
                if self.log_px_se_delta is not None:
                    out["mc_se_delta"] = quad(self.log_px_se_delta)
            return out

        K = self.num_particles
        summary: dict[str, Any] = {
            "num_images": n,
            "num_particles": K,
            "elbo": stats(self.elbo, self.elbo_se),
            "reconstruction": stats(self.log_lik),
            "kl": stats(self.kl),
            "log_px": stats(self.log_px, self.log_px_se, tail_aware=True),
            "iwae": {str(k): stats(v, self.iwae_se[k], tail_aware=k == K) for k, v in self.iwae.items()},
        }
        if self.jackknife is not None:
            summary["jackknife"] = {"order": 1, **stats(self.jackknife, self.jackknife_se, tail_aware=True)}
        if self.k_hat is not None:
            k = self.k_hat[torch.isfinite(self.k_hat)]
            worst = torch.argsort(self.k_hat.nan_to_num(-math.inf), descending=True)[:5]
            summary["pareto_k"] = {
                "median": _nan_to_none(k.median().item()) if k.numel() else None,
                "max": _nan_to_none(k.max().item()) if k.numel() else None,
                "share_above_0.5": (self.k_hat > K_HAT_INFINITE_VARIANCE).double().mean().item(),
                "share_above_0.7": (self.k_hat > K_HAT_UNRELIABLE).double().mean().item(),
                "images_above_0.7": int((self.k_hat > K_HAT_UNRELIABLE).sum()),
                "worst": [[int(i), _nan_to_none(self.k_hat[i].item())] for i in worst],
            }
        return summary


def _nan_to_none(v: float) -> float | None:
    """JSON has no NaN or infinity: None for either (k-hat is -inf for a tail without spread)."""
    return v if math.isfinite(v) else None


def sweep_for(num_particles: int, ks: Sequence[int] | None = None) -> list[int]:
    """The IWAE-k values reported for K particles: those with at least two disjoint groups,
    and K itself (its error is ``diagnostics.log_mean_exp_se``)."""
    ks = DEFAULT_SWEEP if ks is None else ks
    return sorted({k for k in ks if 1 <= k <= num_particles // 2} | {num_particles})


@torch.no_grad()
def estimate_bounds(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    num_particles: int,
    *,
    ks: Sequence[int] | None = None,
    batch_size: int = 100,
    max_rows: int = 2_000,
    progress: Callable[[int], None] | None = None,
    seed: int | None = None,
    index: torch.Tensor | None = None,
    compile: bool = False,
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> BoundEstimates:
    """ELBO, the IWAE-k sweep and log p(x) for every row of ``data``.

    Work proceeds ``batch_size`` datapoints at a time, with particles in chunks so that at
    most ``max_rows`` (datapoint, particle) pairs go through the networks at once. Every
    number is accumulated as the chunks stream (``diagnostics.WeightStream``, the IWAE-k
    groups as running logsumexps), so memory does not grow with K: no chunk's weights are
    kept once it is summarised. ``progress`` is called with the number of datapoints done.
    Beside the bounds: per datapoint the Pareto k-hat of the weights, the tail-aware error
    of IWAE-K, and the order-1 jackknife estimate, all from the same K draws (the IWAE-k
    numbers do not depend on them).

    The draws are keyed (``keyed``): draw k of row i depends only on (``seed``, ``index[i]``,
    k), so each row's estimates are the same whatever ``batch_size``, ``max_rows``, the
    rows beside it or the process that scores it. ``index`` names the rows (default
    0..N-1; evaluation passes their rows in the split); ``seed`` None takes one from
    torch's global generator.

    With ``compile`` the chunk's computation is traced once per shape and run as a graph
    (``compiled.Compiled``: the same weights to the bit, checked against eager code on the
    second chunk of each shape); it needs ``model`` to be the family's (``vae.model``),
    and falls back to eager code otherwise, or where the trace fails, saying why to
    ``log``. Enumerated sites are summed out inside the traced chunk as in eager code.
    """
    if num_particles < 1:
        raise ValueError(f"the number of importance samples must be at least 1, got {num_particles}")
    if data.shape[0] == 0:
        raise ValueError("there are no datapoints to estimate bounds for")
    ks = sweep_for(num_particles, ks)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    index = (torch.arange(data.shape[0]) if index is None else torch.as_tensor(index)).to(data.device)
    if index.shape != data.shape[:1]:
        raise ValueError(f"index has {index.shape[0]} keys for {data.shape[0]} datapoints")
    batch_size = max(1, min(batch_size, max_rows))
    chunk = max(1, max_rows // batch_size)
    parts: dict[str, list[torch.Tensor]] = {}
    dtype = torch.get_default_dtype()  # then that of the log weights

    chunk_weights = _chunk_weights(model, guide, seed, compile, log, kwargs)

    def keep(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.to("cpu", dtype))

    for start in range(0, data.shape[0], batch_size):
        x = data[start : start + batch_size]
        like = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        weights = WeightStream(num_particles, x.shape[0], x.device)
        groups = [_IWAEGroups(k, like) for k in ks if k < num_particles]
        lik_sum = like.clone()
        for k0 in range(0, num_particles, chunk):
            # argument and support checks on the first chunk only: they are costly, and the
            # later chunks run the same code on the same kinds of values
            with pyro.validation_enabled(start == 0 and k0 == 0):
                w, lik = chunk_weights(x, index[start : start + batch_size], k0, min(chunk, num_particles - k0))
            weights.update(w)  # in float64, knowing the rounding of w's own dtype
            dtype, w = w.dtype, w.double()
            for g in groups:
                g.update(w)
            lik_sum += lik.double().sum(0)
        keep("elbo", weights.log_w.mean)
        keep("elbo_se", weights.log_w.std() / math.sqrt(num_particles))
        keep("log_lik", lik_sum / num_particles)
        log_px = weights.log_mean_exp()
        keep("log_px", log_px)
        k_hat = weights.pareto_k()
        log_px_se = weights.log_mean_exp_se(k_hat) if num_particles > 1 else weights.delta_method_se()
        keep("k_hat", k_hat)
        keep("log_px_se", log_px_se)
        keep("log_px_se_delta", weights.delta_method_se())
        keep("jackknife", weights.jackknife())
        for g in groups:
            mean, se = g.result()
            keep(f"iwae{g.k}", mean)
            keep(f"iwae_se{g.k}", se)
        keep(f"iwae{num_particles}", log_px)
        keep(f"iwae_se{num_particles}", log_px_se)
        if progress is not None:
            progress(x.shape[0])

    cat = {name: torch.cat(v) for name, v in parts.items()}
    return BoundEstimates(
        num_particles=num_particles,
        elbo=cat["elbo"],
        elbo_se=cat["elbo_se"],
        log_lik=cat["log_lik"],
        log_px=cat["log_px"],
        log_px_se=cat["log_px_se"],
        iwae={k: cat[f"iwae{k}"] for k in ks},
        iwae_se={k: cat[f"iwae_se{k}"] for k in ks},
        k_hat=cat["k_hat"],
        log_px_se_delta=cat["log_px_se_delta"],
        jackknife=cat["jackknife"],
        jackknife_se=cat["log_px_se"],
    )
