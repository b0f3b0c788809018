"""Annealed importance sampling (AIS, Neal 2001) of log p(x) per image, and bidirectional
Monte Carlo (BDMC, Grosse et al. 2015) to bound how far AIS is from it.

For each image x, C chains move the continuous latents z through T + 1 distributions on
the geometric path from a start density g(z) to p(x, z):

    f_t(z) = g(z)^(1 - b_t) p(x, z)^(b_t),   0 = b_0 < b_1 < ... < b_T = 1,

    z_0 ~ g,   log w = sum_{t=1..T} (b_t - b_{t-1}) [log p(x, z_{t-1}) - log g(z_{t-1})],
    z_t = HMC_t(z_{t-1}),   a transition that leaves f_t invariant (t < T).

E[w] = p(x) for every T, so the log of the mean of the C chains' weights is a stochastic
lower bound on log p(x) (E log mean w <= log p(x)) that tightens as T grows; T = 1 is
importance sampling with C draws from g: with the guide as g, a guide that enumerates
nothing and the evaluator's keys, its value is IWAE-C (to rounding). (A guide that
enumerates a label y gives AIS a draw of y ~ q(y | x) and the mixture q(z | x) as g, where
the evaluator sums over y for every draw: two unbiased estimates, not the same one.) The start g is the guide q(z | x) (``start="guide"``), or
the model's own prior over its latents given x (``start="prior"``: the latent sites in
program order, each given the values before it; for a flow guide, whose density cannot be
evaluated at an arbitrary z, the only choice).

Discrete latents that the family enumerates (the GMVAE's component, the SSVAE's label)
are summed out exactly inside every density: log p(x, z) is the evaluator's log weight
(``bounds.importance_traces``) of a guide whose continuous sites are pinned to z by point
masses, so the model side runs the same code as every other bound of the project; log
q(z | x) sums the guide's enumerated sites the same way. HMC moves only the continuous z.

The schedule is sigmoidal (Grosse et al. 2015): b_t ~ sigmoid(4 (2 t / T - 1)), rescaled
to run from 0 to 1. The log weight's increments are largest where the target changes most
per unit of b, near both ends of a path from a guide (the first steps leave the guide,
the last ones sharpen to the posterior), and the sigmoid puts more of the T distributions
there than a linear schedule, while tending to the linear one in the middle.

HMC: one momentum refresh and ``leapfrog`` leapfrog steps per transition, identity mass,
a Metropolis test on the Hamiltonian. The step size is tuned without touching the
estimator's validity: beside the C chains of each image run a few pilot chains (their own
keys, started from g) in the same tensors, and only they adapt it, per image and per
temperature, from their acceptance probability (multiplicatively, towards 0.65, the
optimum for HMC of Beskos et al. 2013), and each transition uses it times a keyed
uniform factor in [0.7, 1.3], so that no fixed trajectory length resonates with the
target (a trajectory of half its period maps z to its mirror image). The step size of transition t is a function of
the pilot chains' path up to t - 1, which is independent of the C chains, so conditional
on it every chain runs a fixed sequence of f_t-invariant kernels and its weight is exactly
unbiased; the pilots' own weights are discarded. Adapting from the scored chains' own
acceptance would make each kernel depend on the chain's past and bias the weights.

Memory does not grow with T: a chain keeps its state, two log-densities and their
gradients, and each weight accumulates as it goes. Chains are processed ``max_rows``
(image, chain) pairs at a time (the pilots rerun with each chunk, with the same keys, so
every chunk sees the same step sizes). Every draw is keyed (``keyed``) by (seed, the
image's row in the split, chain, step): an image's estimate is the same whatever the
batch, the chunks, the rows beside it.

BDMC: on images simulated from the model (z ~ p(z), x ~ p(x | z)) the z that made x is an
exact posterior draw. Reverse AIS from it, through the same kernels in the reverse order,
has weights whose mean is unbiased for 1 / p(x): minus its log mean is a stochastic upper
bound on log p(x). The gap between the two bounds bounds, in expectation, the error of
forward AIS at that T on those images. Its limits: it holds for data drawn from the model,
and says how good AIS is on real images only as far as they resemble the model's samples;
each bound is stochastic (tight in expectation, not for every draw). The reverse run takes
the step sizes that the forward run's pilots chose on the same image (T numbers per image
are kept for it), so that its kernels, too, do not depend on the chains it scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .bounds import _site_log_prob, importance_traces
from .diagnostics import WeightStream
from .errors import ConfigError, Flag
from .keyed import DrawKeys, KeyedNoise, fold, keyed_normal
from .pair import own_parameters

STARTS = ("guide", "prior")
SIGMOID_SHARPNESS = 4.0
TARGET_ACCEPT = 0.65
ADAPT_RATE = 0.3  # log step size moves by ADAPT_RATE * (acceptance - target) per transition
INITIAL_STEP = 0.05
STEP_RANGE = (1e-4, 2.0)
PILOT_CHAINS = 4
JITTER = 0.3  # each transition's step size is the tuned one times a keyed uniform in [1 - JITTER, 1 + JITTER]
_PILOT, _SIMULATE = 0x50494C4F54, 0x53494D  # words folded into the seed for their key streams


def schedule(steps: int) -> torch.Tensor:
    """b_0 = 0 < ... < b_T = 1 on the sigmoidal schedule (float64, length T + 1)."""
    s = torch.sigmoid(SIGMOID_SHARPNESS * (2 * torch.arange(steps + 1, dtype=torch.float64) / steps - 1))
    return (s - s[0]) / (s[-1] - s[0])


def _check_counts(**counts: int) -> None:
    names = {"steps": "--ais", "chains": "--chains", "leapfrog": "--leapfrog", "num": "--bdmc"}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError("{flag} must be a whole number of at least 1",
                              flag=Flag(name, value, cli=f"{names[name]} {value}"))


class _Pin(Messenger):
    """Give the named latent sites these values; with ``delta`` their distribution becomes
    a point mass there, so that a guide run under it contributes log q = 0 for them."""

    def __init__(self, values: dict[str, torch.Tensor], delta: bool):
        super().__init__()
        self.values, self.delta = values, delta

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] in self.values and not msg["is_observed"]:
            value = self.values[msg["name"]]
            msg["value"] = value
            if self.delta:
                msg["fn"] = dist.Delta(value, event_dim=len(msg["fn"].event_shape))


def _pinned(fn: Callable, values: dict[str, torch.Tensor], delta: bool) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        with _Pin(values, delta):
            return fn(*args, **kwargs)
    return run


def _uniform(keys: DrawKeys, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Keyed uniforms in (0, 1) of shape (chains, batch, ...)."""
    eps = keyed_normal(keys, name, torch.Size(shape), 0, 1, torch.float64, keys.index.device)
    return 0.5 * (1 + torch.erf(eps / math.sqrt(2)))


class _KeyedAncestral(KeyedNoise):
    """``KeyedNoise`` that also draws discrete sites (by the inverse CDF of a keyed
    uniform), so that a program runs forward with every draw keyed."""

    def _pyro_sample(self, msg: dict) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg) \
                or not fn.has_enumerate_support:
            return super()._pyro_sample(msg)
        support = fn.enumerate_support(expand=False)
        mass = fn.log_prob(support).exp().cumsum(0)  # (values, *batch)
        nb = len(fn.batch_shape)
        u = _uniform(self.keys, msg["name"], tuple(fn.batch_shape[nb + self.particle_dim:]))
        u = u.reshape(fn.batch_shape[nb + self.particle_dim:]).to(mass.dtype)
        which = (mass < u).sum(0).clamp(max=support.shape[0] - 1)
        msg["value"] = support.reshape(-1)[which]


@dataclass
class _State:
    z: torch.Tensor  # (chains, batch, D)
    log_g: torch.Tensor  # (chains, batch)
    log_p: torch.Tensor
    grad_g: torch.Tensor
    grad_p: torch.Tensor

    def where(self, take: torch.Tensor, other: _State) -> _State:
        """``other`` where ``take`` (chains, batch), else self."""
        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            t = take.reshape(take.shape + (1,) * (a.dim() - 2))
            return torch.where(t, b, a)
        return _State(*(pick(getattr(self, f), getattr(other, f)) for f in ("z", "log_g", "log_p", "grad_g", "grad_p")))

    def log_f(self, beta: float) -> torch.Tensor:
        return (1 - beta) * self.log_g + beta * self.log_p

    def grad(self, beta: float) -> torch.Tensor:
        return (1 - beta) * self.grad_g + beta * self.grad_p


class _Target:
    """The densities of the path for one batch of images: g and p(x, .) at any z (given
    as a flat (chains, batch, D) tensor, split into the latent sites), with gradients."""

    def __init__(self, model: Callable, guide: Callable, x: torch.Tensor, start: str,
                 max_plate_nesting: int, kwargs: dict[str, Any]):
        self.model, self.guide, self.x, self.start = model, guide, x, start
        self.mpn, self.kwargs = max_plate_nesting, kwargs
        self.sites: list[tuple[str, tuple[int, ...]]] | None = None  # continuous latents: (name, shape past (C, B))

    def draw_start(self, keys: DrawKeys, chains: int) -> torch.Tensor:
        """``chains`` keyed draws from g per image, flat (chains, batch, D)."""
        program = self.guide if self.start == "guide" else self.model
        particle_dim = -1 - self.mpn
        try:
            with own_parameters(), torch.no_grad(), _KeyedAncestral(keys, particle_dim), \
                    pyro.plate("_iw_particles", chains, dim=particle_dim):
                trace = poutine.trace(program).get_trace(self.x, **self.kwargs)
        except ValueError as e:
            if self.start != "guide" or "keyed draws" not in str(e):
                raise
            raise ConfigError(f"AIS cannot start from this guide ({e}); pass {{start}}",
                              start=Flag("start", "prior", cli="--ais-start prior")) from None
        sites, values = [], []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if site["fn"].has_enumerate_support:
                if self.start == "guide" and site["infer"].get("enumerate") != "parallel":
                    raise ConfigError(f"the guide's discrete site {name!r} is not enumerated: AIS needs "
                                      "discrete latents summed out")
                continue
            v = site["value"]
            if v.shape[:2] != (chains, self.x.shape[0]):
                raise ConfigError(f"site {name!r} is not inside the data plate; AIS needs every latent in it")
            sites.append((name, tuple(v.shape[2:])))
            values.append(v.reshape(chains, self.x.shape[0], -1))
        if not sites:
            raise ConfigError("{steps} needs a continuous latent variable to anneal, and this model's latents "
                              "are all discrete (its log p(x) is an exact sum)", steps=Flag("steps", cli="--ais"))
        self.sites = sites
        return torch.cat(values, -1).to(torch.get_default_dtype())

    def split(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.sites is not None
        out, i = {}, 0
        for name, shape in self.sites:
            n = math.prod(shape)
            out[name] = z[..., i : i + n].reshape(*z.shape[:2], *shape)
            i += n
        return out

    def _log_joint(self, model: Callable, values: dict[str, torch.Tensor], chains: int) -> torch.Tensor:
        log_w, _, _ = importance_traces(model, _pinned(self.guide, values, delta=True), self.x, chains,
                                        max_plate_nesting=self.mpn, **self.kwargs)
        return log_w

    def _log_guide(self, values: dict[str, torch.Tensor], chains: int) -> torch.Tensor:
        """log q(z | x) at the given z, enumerated guide sites summed out."""
        particle_dim = -1 - self.mpn
        guide = poutine.enum(_pinned(self.guide, values, delta=False), first_available_dim=particle_dim - 1)
        with pyro.plate("_iw_particles", chains, dim=particle_dim):
            trace = poutine.trace(guide).get_trace(self.x, **self.kwargs)
        total: Any = 0.0
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
                try:
                    total = total + _site_log_prob(site)
                except (NotImplementedError, KeyError):  # planar and radial: no inverse, no cached value
                    raise ConfigError(f"the guide's site {name!r} has no density at an arbitrary z (a flow without "
                                      "an inverse), which AIS from the guide needs: pass {{start}}",
                                      start=Flag("start", "prior", cli="--ais-start prior")) from None
        batch = self.x.shape[0]
        shape = torch.broadcast_shapes(total.shape, (chains, batch))
        return torch.logsumexp(total.expand(shape).reshape(-1, chains, batch), 0)

    def state(self, z: torch.Tensor) -> _State:
        chains = z.shape[0]
        # unvalidated: the start's draw checked the arguments, and these are the same kinds of values
        with own_parameters(), torch.enable_grad(), pyro.validation_enabled(False):
            z = z.detach().requires_grad_()
            values = self.split(z)
            log_p = self._log_joint(self.model, values, chains)
            grad_p, = torch.autograd.grad(log_p.sum(), z)
            if self.start == "guide":
                log_g = self._log_guide(values, chains)
            else:
                hidden = poutine.block(self.model, hide_fn=lambda m: m["type"] == "sample" and m["is_observed"])
                log_g = self._log_joint(hidden, values, chains)
            grad_g, = torch.autograd.grad(log_g.sum(), z)
        return _State(z.detach(), log_g.detach(), log_p.detach(), grad_g, grad_p)


def _hmc(target: _Target, s: _State, beta: float, step: torch.Tensor, leapfrog: int,
         momentum: torch.Tensor, u: torch.Tensor) -> tuple[_State, torch.Tensor, torch.Tensor]:
    """One HMC transition at temperature ``beta`` for every chain: the new state, the
    acceptance probability and whether each chain moved. ``step`` is (batch,)."""
    e = step.to(s.z.dtype).view(1, -1, 1)
    r = momentum
    h0 = -s.log_f(beta) + 0.5 * r.pow(2).sum(-1)
    r = r + 0.5 * e * s.grad(beta)
    cur = s
    for i in range(leapfrog):
        cur = target.state(cur.z + e * r)
        r = r + (e if i < leapfrog - 1 else 0.5 * e) * cur.grad(beta)
    h1 = -cur.log_f(beta) + 0.5 * r.pow(2).sum(-1)
    accept_prob = torch.exp((h0 - h1).clamp(max=0)).nan_to_num(0.0)
    moved = u.reshape(accept_prob.shape) < accept_prob
    return s.where(moved, cur), accept_prob, moved


@dataclass
class _ChainsRun:
    log_w: torch.Tensor  # (chains, batch), the scored chains only
    accepted: torch.Tensor  # (batch,) moves accepted, summed over scored chains and transitions
    steps_used: torch.Tensor | None  # (T + 1, batch) step size of each transition (BDMC's reverse run)
    final_step: torch.Tensor  # (batch,)


def _run_chains(target: _Target, betas: torch.Tensor, leapfrog: int, keys: DrawKeys, chains: int,
                pilot: DrawKeys | None, pilots: int, record: bool, reverse_from: torch.Tensor | None = None,
                steps: torch.Tensor | None = None) -> _ChainsRun:
    """Forward AIS (from g, with pilot chains adapting the step size), or with
    ``reverse_from`` reverse AIS from those states through the given ``steps``."""
    T, batch = len(betas) - 1, target.x.shape[0]
    b = betas.tolist()
    if reverse_from is None:
        z = target.draw_start(keys, chains)
        if pilot is not None and pilots and T > 1:
            z = torch.cat([target.draw_start(pilot, pilots), z])
        else:
            pilots = 0
    else:
        z, pilots = reverse_from, 0
    s = target.state(z)
    step = torch.full((batch,), INITIAL_STEP, dtype=torch.float64, device=z.device)
    used = torch.full((T + 1, batch), math.nan, dtype=torch.float64) if record else None
    log_w = torch.zeros(chains, batch, dtype=torch.float64, device=z.device)
    accepted = torch.zeros(batch, dtype=torch.float64, device=z.device)
    tag = "ais" if reverse_from is None else "ais-reverse"
    order = range(1, T + 1) if reverse_from is None else range(T, 0, -1)
    for t in order:
        gap = (s.log_p - s.log_g)[pilots:].double()
        log_w += (b[t] - b[t - 1]) * gap if reverse_from is None else (b[t - 1] - b[t]) * gap
        nxt = t if reverse_from is None else t - 1  # the temperature of the transition that follows
        if not 0 < nxt < T:
            continue
        if steps is not None:
            step = steps[nxt].to(z.device)
        shape = (s.z.shape[0] - pilots, batch, s.z.shape[-1])
        momentum = keyed_normal(keys, f"{tag}-momentum-{nxt}", torch.Size(shape), 0, 1, s.z.dtype, z.device)
        u = _uniform(keys, f"{tag}-accept-{nxt}", shape[:2])
        if pilots:
            assert pilot is not None
            p_shape = (pilots, batch, shape[-1])
            momentum = torch.cat([keyed_normal(pilot, f"{tag}-momentum-{nxt}", torch.Size(p_shape), 0, 1,
                                               s.z.dtype, z.device), momentum])
            u = torch.cat([_uniform(pilot, f"{tag}-accept-{nxt}", p_shape[:2]), u])
        if steps is None:  # jittered, against trajectories that resonate with the target's period
            jitter_keys = pilot if pilot is not None else keys
            jitter = 1 + JITTER * (2 * _uniform(DrawKeys(fold(jitter_keys.seed, 1), jitter_keys.index, 0),
                                                f"{tag}-jitter-{nxt}", (1, batch))[0] - 1)
            used_step = step * jitter.to(step.device)
        else:
            used_step = step
        if used is not None:
            used[nxt] = used_step.cpu()
        s, prob, moved = _hmc(target, s, b[nxt], used_step, leapfrog, momentum, u)
        accepted += moved[pilots:].double().sum(0)
        if pilots:
            step = (step * torch.exp(ADAPT_RATE * (prob[:pilots].double().mean(0) - TARGET_ACCEPT))).clamp(*STEP_RANGE)
    return _ChainsRun(log_w, accepted, used, step)


@dataclass
class AISEstimates:
    """Per-image AIS results in nats (one entry per image): ``log_px`` the log of the mean
    of the chains' weights (a stochastic lower bound on log p(x)), ``log_px_se`` its
    delta-method Monte Carlo error, ``log_w_sd`` the spread of the chains' log weights,
    ``acceptance`` the share of HMC moves accepted, ``step_size`` the pilots' final one."""

    steps: int
    chains: int
    leapfrog: int
    start: str
    log_px: torch.Tensor
    log_px_se: torch.Tensor
    log_w_sd: torch.Tensor
    acceptance: torch.Tensor
    step_size: torch.Tensor
    step_schedule: torch.Tensor | None = field(default=None, repr=False)  # (T + 1, N), when recorded

    @property
    def gradient_evaluations(self) -> int:
        """Evaluations of log p(x, z) and its gradient per image (scored chains)."""
        return self.chains * (1 + (self.steps - 1) * self.leapfrog)

    def summary(self) -> dict[str, Any]:
        n = self.log_px.numel()
        se = self.log_px_se
        return {"steps": self.steps, "chains": self.chains, "leapfrog": self.leapfrog, "start": self.start,
                "pilot_chains": PILOT_CHAINS if self.steps > 1 else 0, "schedule": "sigmoidal",
                "gradient_evaluations_per_image": self.gradient_evaluations,
                "log_px": {"mean": self.log_px.mean().item(),
                           "mc_se": _finite(se.pow(2).sum().sqrt().item() / n),
                           "data_se": _finite(self.log_px.std().item() / math.sqrt(n)) if n > 1 else None},
                "log_w_sd": self.log_w_sd.mean().item(), "acceptance": self.acceptance.mean().item(),
                "step_size": {"median": self.step_size.median().item(), "min": self.step_size.min().item(),
                              "max": self.step_size.max().item()}}


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _check(steps: int, chains: int, leapfrog: int, start: str) -> None:
    _check_counts(steps=steps, chains=chains, leapfrog=leapfrog)
    if start not in STARTS:
        raise ConfigError("{start} must be one of " + ", ".join(STARTS), start=Flag("start", start, cli=f"--ais-start {start}"))


def ais(model: Callable, guide: Callable, data: torch.Tensor, steps: int, *, chains: int = 16,
        leapfrog: int = 10, start: str = "guide", seed: int = 0, index: torch.Tensor | None = None,
        batch_size: int = 100, max_rows: int = 2_000, max_plate_nesting: int = 1, record_steps: bool = False,
        progress: Callable[[int], None] | None = None, **kwargs: Any) -> AISEstimates:
    """AIS estimates of log p(x) for every row of ``data`` with ``steps`` (T) distributions,
    ``chains`` chains per image and ``leapfrog`` leapfrog steps per HMC transition (see the
    module docstring). ``index`` keys the rows (default 0..N-1), as in ``bounds``; at most
    ``max_rows`` (image, chain) pairs, pilots included, go through the networks at once.
    ``record_steps`` keeps each image's step size at every transition (for BDMC)."""
    _check(steps, chains, leapfrog, start)
    if data.shape[0] == 0:
        raise ConfigError("there are no images to run AIS on")
    index = (torch.arange(data.shape[0]) if index is None else torch.as_tensor(index)).to(data.device)
    betas = schedule(steps)
    pilots = PILOT_CHAINS if steps > 1 else 0
    batch_size = max(1, min(batch_size, max_rows // (pilots + 1)))
    per_chunk = max(1, max_rows // batch_size - pilots)
    parts: dict[str, list[torch.Tensor]] = {}
    for b0 in range(0, data.shape[0], batch_size):
        x, idx = data[b0 : b0 + batch_size], index[b0 : b0 + batch_size]
        target = _Target(model, guide, x, start, max_plate_nesting, kwargs)
        weights = WeightStream(chains, x.shape[0], x.device)
        accepted = torch.zeros(x.shape[0], dtype=torch.float64)
        run = None
        for k0 in range(0, chains, per_chunk):
            n = min(per_chunk, chains - k0)
            with pyro.validation_enabled(b0 == 0 and k0 == 0):
                run = _run_chains(target, betas, leapfrog, DrawKeys(seed, idx, k0), n,
                                  DrawKeys(fold(seed, _PILOT), idx, 0), pilots, record_steps and k0 == 0)
            weights.update(run.log_w)
            accepted += run.accepted.cpu()
            if k0 == 0 and run.steps_used is not None:
                parts.setdefault("step_schedule", []).append(run.steps_used)
        assert run is not None
        keep = lambda name, v: parts.setdefault(name, []).append(v.detach().to("cpu", torch.float64))  # noqa: E731
        keep("log_px", weights.log_mean_exp())
        keep("log_px_se", weights.delta_method_se())
        keep("log_w_sd", weights.log_w.std() if chains > 1 else torch.zeros(x.shape[0]))
        keep("acceptance", accepted / (chains * max(steps - 1, 1)))
        keep("step_size", run.final_step)
        if progress is not None:
            progress(x.shape[0])
    schedule_ = torch.cat(parts.pop("step_schedule"), 1) if "step_schedule" in parts else None
    return AISEstimates(steps, chains, leapfrog, start, **{k: torch.cat(v) for k, v in parts.items()},
                        step_schedule=schedule_)


def simulate(model: Callable, like: torch.Tensor, num: int, seed: int = 0, max_plate_nesting: int = 1,
             **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``num`` images drawn from the model, z ~ p(z) and x ~ p(x | z), with the latent
    values that made them (each site (num, ...)): for BDMC, an exact posterior draw per
    image. ``like`` is any image of the model's data (its shape and type). Latent sites
    after the observed one (an auxiliary a ~ p(a | x, z)) are drawn given the new x."""
    _check_counts(num=num)
    dummy = like[:1].expand(num, *like.shape[1:]).clone()
    keys = DrawKeys(fold(seed, _SIMULATE), torch.arange(num, device=like.device), 0)
    particle_dim = -1 - max_plate_nesting
    with own_parameters(), torch.no_grad(), pyro.validation_enabled(False):
        with _KeyedAncestral(keys, particle_dim), pyro.plate("_iw_particles", 1, dim=particle_dim):
            first = poutine.trace(model).get_trace(dummy, **kwargs)
        before: dict[str, torch.Tensor] = {}
        x = None
        for name, site in first.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(fold(seed, _SIMULATE, 1))
                    x = site["fn"].sample().reshape(num, *like.shape[1:]).to(like.dtype)
                break
            before[name] = site["value"]
        if x is None:
            raise ConfigError("the model has no observed site to simulate")
        with _Pin(before, delta=False), _KeyedAncestral(keys, particle_dim), \
                pyro.plate("_iw_particles", 1, dim=particle_dim):
            second = poutine.trace(model).get_trace(x, **kwargs)
    latents = {name: site["value"][0] for name, site in second.nodes.items()
               if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)}
    return x, latents


@dataclass
class BDMCEstimates:
    """Per simulated image: the forward AIS lower bound and the reverse AIS upper bound on
    log p(x) (nats), and their gap; ``forward`` holds the forward run's other numbers."""

    forward: AISEstimates
    upper: torch.Tensor
    reverse_acceptance: torch.Tensor

    @property
    def lower(self) -> torch.Tensor:
        return self.forward.log_px

    @property
    def gap(self) -> torch.Tensor:
        return self.upper - self.lower

    def summary(self) -> dict[str, Any]:
        n = self.upper.numel()
        stats = lambda v: {"mean": v.mean().item(),  # noqa: E731
                           "data_se": _finite(v.std().item() / math.sqrt(n)) if n > 1 else None}
        f = self.forward
        return {"images": n, "steps": f.steps, "chains": f.chains, "leapfrog": f.leapfrog, "start": f.start,
                "lower": stats(self.lower), "upper": stats(self.upper),
                "gap": {**stats(self.gap), "max": self.gap.max().item()},
                "acceptance": f.acceptance.mean().item(), "reverse_acceptance": self.reverse_acceptance.mean().item()}


def bdmc(model: Callable, guide: Callable, like: torch.Tensor, num: int, steps: int, *, chains: int = 16,
         leapfrog: int = 10, start: str = "guide", seed: int = 0, batch_size: int = 100, max_rows: int = 2_000,
         max_plate_nesting: int = 1, progress: Callable[[int], None] | None = None,
         data: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None, **kwargs: Any) -> BDMCEstimates:
    """BDMC on ``num`` images simulated from the model (``simulate``; or the pair ``data``
    = (x, latents) given): forward AIS from g and reverse AIS from the latents that made
    each image, both with T = ``steps``. Returns both bounds per image."""
    _check(steps, chains, leapfrog, start)
    x, latents = simulate(model, like, num, seed, max_plate_nesting, **kwargs) if data is None else data
    forward = ais(model, guide, x, steps, chains=chains, leapfrog=leapfrog, start=start, seed=seed,
                  batch_size=batch_size, max_rows=max_rows, max_plate_nesting=max_plate_nesting,
                  record_steps=True, progress=progress, **kwargs)
    betas = schedule(steps)
    batch_size = max(1, min(batch_size, max_rows))
    per_chunk = max(1, max_rows // batch_size)
    uppers, accepts = [], []
    index = torch.arange(x.shape[0], device=x.device)
    for b0 in range(0, x.shape[0], batch_size):
        xb, idx = x[b0 : b0 + batch_size], index[b0 : b0 + batch_size]
        target = _Target(model, guide, xb, start, max_plate_nesting, kwargs)
        target.draw_start(DrawKeys(seed, idx, 0), 1)  # the latent sites' layout
        exact = torch.cat([latents[name][b0 : b0 + batch_size].reshape(xb.shape[0], -1)
                           for name, _ in target.sites or []], -1).to(torch.get_default_dtype())
        sched = forward.step_schedule[:, b0 : b0 + batch_size] if forward.step_schedule is not None else None
        weights = WeightStream(chains, xb.shape[0], xb.device)
        accepted = torch.zeros(xb.shape[0], dtype=torch.float64)
        for k0 in range(0, chains, per_chunk):
            n = min(per_chunk, chains - k0)
            run = _run_chains(target, betas, leapfrog, DrawKeys(seed, idx, k0), n, None, 0, False,
                              reverse_from=exact.expand(n, *exact.shape).clone(), steps=sched)
            weights.update(run.log_w)
            accepted += run.accepted.cpu()
        uppers.append(-weights.log_mean_exp().cpu())
        accepts.append(accepted / (chains * max(steps - 1, 1)))
    return BDMCEstimates(forward, torch.cat(uppers), torch.cat(accepts))
