"""Per-datapoint importance-sampled bounds on log p(x) for any model/guide pair.

For each datapoint x and K draws z_k ~ q(z | x),

    log w_k = log p(x, z_k) - log q(z_k | x)
    ELBO    = mean_k log w_k
    IWAE-k  = E[ logsumexp of k weights - log k ]        (Burda et al. 2016)
    log p(x) ~ logsumexp_{k<=K} log w_k - log K           (the IWAE-K bound, K large)

Pyro's ``Importance`` and ``vectorized_importance_weights`` give one weight per particle
for the whole batch; here the particles are a plate of their own and nothing is summed
over the data plate, so every weight belongs to one datapoint. Sites marked for parallel
enumeration are summed out exactly inside each weight: their log-densities broadcast
along extra left dimensions, and a logsumexp over those dimensions marginalises them
before any average over K. A site enumerated in the guide contributes its model prior and no guide density, which
makes w_k = sum_y p(x, y, z_k^y) / q(z_k^y | x, y), still unbiased for p(x).

Every latent must live inside the model's data plate (no global latent variables).
"""

from __future__ import annotations

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
    """
    log_w, log_lik, _ = importance_traces(model, guide, x, num_particles, *args,
                                          max_plate_nesting=max_plate_nesting, **kwargs)
    return log_w, log_lik


def importance_traces(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int,
    *args: Any,
    max_plate_nesting: int = 1,
    stop_guide_params: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, poutine.Trace]:
    """``log_weights`` and the guide's trace. With ``stop_guide_params`` the guide's
    log-densities are computed with their distribution parameters detached, so that the
    guide's parameters reach the weights only through the reparameterized draws (the
    form that doubly reparameterized gradients need)."""
    batch = x.shape[0]
    particle_dim = -1 - max_plate_nesting
    first_enum_dim = particle_dim - 1

    with pyro.plate("_iw_particles", num_particles, dim=particle_dim):
        guide_trace = poutine.trace(
            poutine.enum(guide, first_available_dim=first_enum_dim)
        ).get_trace(x, *args, **kwargs)
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
        if site["type"] != "sample" or site_is_subsample(site):
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
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            if "_enumerate_dim" not in site["infer"]:
                if stop_guide_params:
                    site = {**site, "fn": _detached(site["fn"])}
                log_joint = log_joint - _site_log_prob(site)

    # sum out enumerated variables: every dimension left of (particles, data)
    shape = torch.broadcast_shapes(log_joint.shape, torch.as_tensor(log_lik).shape,
                                   (num_particles, batch))
    log_joint = log_joint.expand(shape).reshape(-1, num_particles, batch)
    log_lik = torch.as_tensor(log_lik, device=log_joint.device).expand(shape).reshape(log_joint.shape)
    if log_joint.shape[0] == 1:
        return log_joint[0], log_lik[0], guide_trace
    posterior = torch.softmax(log_joint, dim=0)
    return torch.logsumexp(log_joint, dim=0), (posterior * log_lik).sum(0), guide_trace


def _iwae_groups(log_w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IWAE-k per datapoint from disjoint groups of k weights: mean and its standard error."""
    m = log_w.shape[0] // k
    groups = log_w[: m * k].view(m, k, -1)
    est = torch.logsumexp(groups, dim=1) - math.log(k)
    se = est.std(0) / math.sqrt(m) if m > 1 else torch.full_like(est[0], float("nan"))
    return est.mean(0), se


def _log_mean_exp_se(log_w: torch.Tensor) -> torch.Tensor:
    """Delta-method standard error of log(mean_k w_k): sd(w) / (sqrt(K) mean(w))."""
    w = torch.exp(log_w - log_w.max(0, keepdim=True).values)
    if w.shape[0] < 2:
        return torch.full_like(w[0], float("nan"))
    return w.std(0) / (math.sqrt(w.shape[0]) * w.mean(0))


@dataclass
class BoundEstimates:
    """Per-datapoint bound estimates in nats (higher is better), one entry per datapoint."""

    num_particles: int
    elbo: torch.Tensor
    elbo_se: torch.Tensor
    log_lik: torch.Tensor  # E_q[log p(x | z)], the reconstruction term
    log_px: torch.Tensor  # IWAE bound at K = num_particles
    log_px_se: torch.Tensor
    iwae: dict[int, torch.Tensor] = field(default_factory=dict)
    iwae_se: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def kl(self) -> torch.Tensor:
        """The ELBO's KL term, KL(q(z|x) || p(z)) (with enumerated variables inside)."""
        return self.log_lik - self.elbo

    def summary(self) -> dict[str, Any]:
        """Dataset means with two standard errors each: ``mc_se`` (the Monte Carlo error of
        this estimate, for these images) and ``data_se`` (spread over images / sqrt(N))."""
        n = self.elbo.numel()

        def stats(values: torch.Tensor, se: torch.Tensor | None = None) -> dict[str, float]:
            out = {"mean": values.mean().item()}
            out["mc_se"] = None if se is None else _nan_to_none(se.pow(2).sum().sqrt().item() / n)
            out["data_se"] = _nan_to_none(values.std().item() / math.sqrt(n)) if n > 1 else None
            return out

        return {
            "num_images": n,
            "num_particles": self.num_particles,
            "elbo": stats(self.elbo, self.elbo_se),
            "reconstruction": stats(self.log_lik),
            "kl": stats(self.kl),
            "log_px": stats(self.log_px, self.log_px_se),
            "iwae": {str(k): stats(v, self.iwae_se[k]) for k, v in self.iwae.items()},
        }


def _nan_to_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def sweep_for(num_particles: int, ks: Sequence[int] | None = None) -> list[int]:
    """The IWAE-k values reported for K particles: those with at least two disjoint groups,
    and K itself (its error comes from the delta method)."""
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
    **kwargs: Any,
) -> BoundEstimates:
    """ELBO, the IWAE-k sweep and log p(x) for every row of ``data``.

    Work proceeds ``batch_size`` datapoints at a time, with particles in chunks so that at
    most ``max_rows`` (datapoint, particle) pairs go through the networks at once: memory
    is bounded whatever K is. ``progress`` is called with the number of datapoints done.
    """
    if num_particles < 1:
        raise ValueError(f"the number of importance samples must be at least 1, got {num_particles}")
    ks = sweep_for(num_particles, ks)
    batch_size = max(1, min(batch_size, max_rows))
    chunk = max(1, max_rows // batch_size)
    parts: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.cpu())

    for start in range(0, data.shape[0], batch_size):
        x = data[start : start + batch_size]
        lw, ll = [], []
        for k0 in range(0, num_particles, chunk):
            # argument and support checks on the first chunk only: they cost ~20% of the time
            with pyro.validation_enabled(start == 0 and k0 == 0):
                w, lik = log_weights(model, guide, x, min(chunk, num_particles - k0), **kwargs)
            lw.append(w)
            ll.append(lik)
        log_w = torch.cat(lw)
        keep("elbo", log_w.mean(0))
        keep("elbo_se", log_w.std(0) / math.sqrt(num_particles) if num_particles > 1
             else torch.full_like(log_w[0], float("nan")))
        keep("log_lik", torch.cat(ll).mean(0))
        keep("log_px", torch.logsumexp(log_w, 0) - math.log(num_particles))
        log_px_se = _log_mean_exp_se(log_w)
        keep("log_px_se", log_px_se)
        for k in ks:
            mean, se = _iwae_groups(log_w, k)
            if k == num_particles:
                se = log_px_se
            keep(f"iwae{k}", mean)
            keep(f"iwae_se{k}", se)
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
    )
