"""AIS and BDMC (pyro_vae.ais) against exact answers: the linear-Gaussian pair, whose
log p(x) and posterior are known, and a GMVAE with a 1-D z, whose log p(x) is a sum over
components of an integral done by quadrature."""

import gc
import json
import math
import weakref

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pyro_vae import ais as A
from pyro_vae.bounds import estimate_bounds
from pyro_vae.errors import ConfigError
from pyro_vae.exact import linear_gaussian
from pyro_vae.keyed import DrawKeys, keyed_normal
from pyro_vae.models.gmvae import GMVAE, GMVAEConfig
from pyro_vae.pair import own_parameters

from helpers import FAST, assert_clean_error, invoke


@pytest.fixture
def poor_guide():
    """The linear-Gaussian pair with a guide too narrow and shrunk towards the prior's
    mean: importance sampling from it is far from log p(x), so annealing has work to do."""
    return linear_gaussian(seed=1, width=0.5, shrink=0.7)


def _images(pair, n, seed=0):
    torch.manual_seed(seed)
    return pair.marginal.sample((n,))


def test_weights_are_unbiased_for_px(poor_guide):
    x = _images(poor_guide, 3)
    true = poor_guide.marginal.log_prob(x)
    est = A.ais(poor_guide.model, poor_guide.guide, x, 20, chains=3000, leapfrog=3, seed=4)
    ratio = torch.exp(est.log_px - true)  # the mean over chains of w / p(x), per image
    se = ratio * est.log_px_se  # its standard error (delta method)
    assert (est.acceptance > 0.3).all() and (est.acceptance < 1).all()
    assert ((ratio - 1).abs() < 4 * se).all(), (ratio, se)
    assert (se < 0.05).all()  # the check has teeth: errors of a few per cent are seen


def test_log_mean_converges_to_log_px_as_T_grows(poor_guide):
    x = _images(poor_guide, 2)
    true = poor_guide.marginal.log_prob(x)
    errors, spreads = [], []
    for T in (1, 10, 100, 500):
        est = A.ais(poor_guide.model, poor_guide.guide, x, T, chains=50, leapfrog=3, seed=3)
        errors.append((est.log_px - true).abs().max().item())
        spreads.append(est.log_w_sd.mean().item())
    assert errors[0] > 0.3 and errors[-1] < 0.05, errors
    assert spreads[1:] == sorted(spreads[1:], reverse=True), spreads  # the chains' weights agree more as T grows
    assert spreads[-1] < 0.25 * spreads[0]


def test_one_distribution_is_the_evaluators_iwae(poor_guide):
    """T = 1 is importance sampling with C draws from the guide, keyed as the evaluator's."""
    x = _images(poor_guide, 4)
    est = A.ais(poor_guide.model, poor_guide.guide, x, 1, chains=30, seed=7, index=torch.arange(10, 14))
    bounds = estimate_bounds(poor_guide.model, poor_guide.guide, x, 30, seed=7, index=torch.arange(10, 14))
    assert torch.allclose(est.log_px, bounds.log_px.double(), atol=1e-5)


def test_estimates_do_not_depend_on_chunks_or_neighbours(poor_guide):
    x = _images(poor_guide, 4)
    whole = A.ais(poor_guide.model, poor_guide.guide, x, 8, chains=6, leapfrog=2, seed=1)
    chunked = A.ais(poor_guide.model, poor_guide.guide, x, 8, chains=6, leapfrog=2, seed=1, batch_size=3, max_rows=10)
    alone = A.ais(poor_guide.model, poor_guide.guide, x[2:3], 8, chains=6, leapfrog=2, seed=1, index=torch.tensor([2]))
    assert torch.allclose(whole.log_px, chunked.log_px, atol=1e-5)
    assert torch.allclose(whole.log_px[2:3], alone.log_px, atol=1e-5)


@pytest.mark.parametrize("start", ["guide", "prior"])
def test_bdmc_bounds_sandwich_log_px(poor_guide, start):
    torch.manual_seed(0)
    like = poor_guide.marginal.sample((1,))
    x, latents = A.simulate(poor_guide.model, like, 40, seed=2)
    assert x.shape == (40, 5) and latents["z"].shape == (40, 2)
    true = poor_guide.marginal.log_prob(x).mean().item()
    gaps = []
    for T in (2, 10, 50):
        est = A.bdmc(poor_guide.model, poor_guide.guide, like, 40, T, chains=4, leapfrog=3, start=start,
                     data=(x, latents))
        lower, upper = est.lower.mean().item(), est.upper.mean().item()
        assert lower < true < upper, (T, lower, true, upper)
        gaps.append(est.gap.mean().item())
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.3 * gaps[0], gaps


def test_simulated_latents_are_posterior_draws(poor_guide):
    """The z that made each simulated x is a draw from p(z | x): the residuals z - E[z | x]
    have the posterior's covariance."""
    pair = poor_guide
    like = pair.marginal.sample((1,))
    x, latents = A.simulate(pair.model, like, 4000, seed=5)
    gain = pair.posterior_cov @ pair.W.T / pair.s**2
    resid = latents["z"] - (x - pair.mu) @ gain.T
    assert resid.mean(0).abs().max() < 4 * pair.posterior_cov.diagonal().max().sqrt() / math.sqrt(4000)
    assert torch.allclose(torch.cov(resid.T), pair.posterior_cov, atol=0.03)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_hmc_leaves_a_gaussian_target_invariant(poor_guide, beta):
    """At temperature beta the target q^(1 - beta) p(x, .)^beta of the linear-Gaussian pair
    is Gaussian; chains started from it stay in it, by their first two moments, through
    transitions whose step size is far from small."""
    pair = poor_guide
    x = pair.marginal.sample((1,))
    post_prec = torch.linalg.inv(pair.posterior_cov)
    post_mean = pair.posterior_cov @ pair.W.T @ (x[0] - pair.mu) / pair.s**2
    q_prec = torch.diag(pair.guide_sd.pow(-2))
    q_mean = pair.guide_matrix @ (x[0] - pair.mu)
    prec = (1 - beta) * q_prec + beta * post_prec
    cov = torch.linalg.inv(prec)
    mean = cov @ ((1 - beta) * q_prec @ q_mean + beta * post_prec @ post_mean)
    sd = cov.diagonal().sqrt()
    n = 4000
    target = A._Target(pair.model, pair.guide, x, "guide", 1, {})
    target.draw_start(DrawKeys(0, torch.arange(1), 0), 1)
    state = target.state(dist.MultivariateNormal(mean, cov).sample((n,)).unsqueeze(1))
    keys, accepted = DrawKeys(1, torch.arange(1), 0), []
    for t in range(10):
        momentum = keyed_normal(keys, f"m{t}", torch.Size((n, 1, 2)), 0, 1, torch.float32, "cpu")
        state, _, moved = A._hmc(target, state, beta, 0.6 * sd.min().reshape(1), 3, momentum,
                                 A._uniform(keys, f"u{t}", (n, 1)))
        accepted.append(moved.float().mean().item())
    z = state.z[:, 0].double()
    assert 0.3 < np.mean(accepted) < 0.97
    assert ((z.mean(0) - mean.double()).abs() < 4 * sd.double() / math.sqrt(n)).all()
    emp = torch.cov(z.T)
    # the standard error of a covariance entry is about sqrt((s_ii s_jj + s_ij^2) / n)
    se = ((cov.diagonal().unsqueeze(0) * cov.diagonal().unsqueeze(1) + cov.pow(2)) / n).sqrt().double()
    assert ((emp - cov.double()).abs() < 5 * se).all(), (emp, cov)


def _gmvae_1d():
    torch.manual_seed(3)
    model = GMVAE(6, GMVAEConfig(z_dim=1, hidden=(8,), components=3, init_spread=1.5, learn_weights=True))
    with torch.no_grad():
        model.mixture.logits.copy_(torch.tensor([0.3, -0.4, 0.1]))
    x = torch.bernoulli(torch.full((3, 6), 0.5), generator=torch.Generator().manual_seed(1))
    return model, x


def test_enumerated_component_is_summed_inside_the_target():
    model, x = _gmvae_1d()
    target = A._Target(model.model, model.guide, x, "guide", 1, {})
    target.draw_start(DrawKeys(0, torch.arange(3), 0), 5)
    z = torch.randn(5, 3, 1)
    state = target.state(z)
    with torch.no_grad():
        explicit = torch.logsumexp(model.mixture.log_joint(z), -1) + model.decode(z).log_prob(x)
    assert torch.allclose(state.log_p, explicit, atol=1e-5)
    with torch.no_grad():
        loc, scale = model.encode(x)
        assert torch.allclose(state.log_g, dist.Normal(loc, scale).to_event(1).log_prob(z), atol=1e-5)


@pytest.mark.parametrize("start", ["guide", "prior"])
def test_gmvae_ais_matches_quadrature(start):
    """log p(x) = log int sum_y p(y) p(z | y) p(x | z) dz on a fine grid of the 1-D z."""
    model, x = _gmvae_1d()
    grid = torch.linspace(-12, 12, 48001, dtype=torch.float64).reshape(-1, 1, 1)
    with torch.no_grad(), own_parameters():
        joint = (torch.logsumexp(model.mixture.log_joint(grid.float()).double(), -1)
                 + model.decode(grid.float()).log_prob(x).double())
    exact = torch.logsumexp(joint, 0) + math.log(24 / 48000)
    est = A.ais(model.model, model.guide, x, 300, chains=40, leapfrog=4, seed=2, start=start)
    assert (est.log_px - exact).abs().max() < 0.03, (est.log_px, exact)


class _PeakLiveBytes(TorchDispatchMode):
    """The most bytes held at once by the tensors that torch's operators return (new
    memory only: not the results of in-place operators, nor views)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.ops = 0

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if self.ops % 500 == 0:  # Pyro's traces hold reference cycles: count only what is reachable
            gc.collect()
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view() and not any(t is a for a in inputs):
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def test_memory_does_not_grow_with_T(poor_guide):
    x = _images(poor_guide, 8)
    peaks = []
    for T in (4, 24):
        with _PeakLiveBytes() as meter:
            A.ais(poor_guide.model, poor_guide.guide, x, T, chains=64, leapfrog=2, seed=0)
        peaks.append(meter.peak)
    assert peaks[0] > 64 * 8 * 2 * 4  # it sees the chains' states
    assert peaks[1] < 1.15 * peaks[0], peaks


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=-3), dict(chains=0), dict(leapfrog=1.5),
                                 dict(start="posterior")])
def test_bad_counts_are_refused(poor_guide, bad):
    args = {"steps": 5, **bad}
    steps = args.pop("steps")
    with pytest.raises(ConfigError) as err:
        A.ais(poor_guide.model, poor_guide.guide, poor_guide.marginal.sample((2,)), steps, **args)
    assert next(iter(bad)) in str(err.value)


def test_all_discrete_latents_are_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Bernoulli(torch.full((x.shape[0],), 0.3)), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(y.unsqueeze(-1).expand(*y.shape, 2), 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    with pytest.raises(ConfigError, match="continuous latent"):
        A.ais(model, guide, torch.zeros(3, 2), 5, start="prior")


@pytest.fixture
def trained(tiny_npy, tmp_path):
    run = tmp_path / "run"
    assert invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", run, *FAST).exit_code == 0
    return run


def test_cli_ais_and_bdmc(trained):
    result = invoke("evaluate", trained, "--iw", 10, "--split", "valid", "--limit", 6, "--ais", 5, "--chains", 3,
                    "--leapfrog", 2, "--bdmc", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = trained / "eval-valid-iw10-n6-ais5-bdmc4.json"
    summary = json.loads(out.read_text())
    assert summary["ais"]["steps"] == 5 and summary["ais"]["chains"] == 3 and summary["ais"]["start"] == "guide"
    assert 0 <= summary["ais"]["acceptance"] <= 1
    assert summary["bdmc"]["images"] == 4 and summary["bdmc"]["steps"] == 5
    arrays = np.load(out.with_suffix(".npz"))
    assert arrays["ais_log_px"].shape == (6,) and arrays["bdmc_upper"].shape == (4,)
    assert "AIS-5" in result.output and "BDMC" in result.output


def test_cli_bad_ais_input_writes_nothing(trained, tiny_npy, tmp_path):
    for args in (["--ais", 0], ["--ais", -2], ["--ais", 2.5], ["--ais", 3, "--chains", 0],
                 ["--ais", 3, "--leapfrog", "x"], ["--bdmc", 0]):
        result = invoke("evaluate", trained, "--iw", 4, "--split", "valid", *args, "--device", "cpu")
        assert result.exit_code == 2 and str(args[-2]) in result.output, result.output
    result = invoke("evaluate", trained, "--iw", 4, "--split", "valid", "--chains", 4, "--device", "cpu")
    assert_clean_error(result, "--chains", "--ais")
    flow = tmp_path / "flow"
    assert invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", flow, "--guide", "planar",
                  "--flow-length", 2, *FAST).exit_code == 0
    result = invoke("evaluate", flow, "--iw", 4, "--split", "valid", "--limit", 3, "--ais", 3, "--chains", 2, "--device", "cpu")
    assert_clean_error(result, "--ais-start prior")
    assert not list(flow.glob("eval-*")) and not list(trained.glob("eval-*"))
    result = invoke("evaluate", flow, "--iw", 4, "--split", "valid", "--limit", 3, "--ais", 3, "--chains", 2, "--ais-start", "prior",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
