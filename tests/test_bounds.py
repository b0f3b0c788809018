"""Statistical checks of the importance-sampled bounds against models with exact answers.

Tolerances are 3 to 4 Monte Carlo standard errors, computed from the same draws; seeds
are fixed so a pass is reproducible.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_vae import VAE, VAEConfig, estimate_bounds, log_weights
from pyro_vae.exact import linear_gaussian
from pyro_vae.keyed import DrawKeys
from pyro_vae.bounds import sweep_for
from pyro_vae.diagnostics import delta_method_se, jackknife, log_mean_exp_se, pareto_k

D, d = 5, 2


@pytest.fixture
def ppca():
    """Linear-Gaussian model with a deliberately imperfect diagonal Gaussian guide."""
    lg = linear_gaussian(seed=1, width=1.3, shrink=0.8)  # wrong on purpose: the bounds must be strictly ordered
    model, guide, W, mu, s = lg.model, lg.guide, lg.W, lg.mu, lg.s
    A_guide, sd_guide = lg.guide_matrix, lg.guide_sd
    x = lg.marginal.sample((20,))
    log_px = lg.marginal.log_prob(x)
    # the ELBO of a Gaussian guide is analytic here
    m = (x - mu) @ A_guide.T
    S = sd_guide**2
    resid = x - m @ W.T - mu
    exp_lik = (-0.5 * D * math.log(2 * math.pi * s**2)
               - (resid.pow(2).sum(1) + (W.pow(2) * S).sum()) / (2 * s**2))
    exp_prior = -0.5 * d * math.log(2 * math.pi) - 0.5 * (m.pow(2).sum(1) + S.sum())
    entropy = sd_guide.log().sum() + 0.5 * d * (1 + math.log(2 * math.pi))
    return model, guide, x, log_px, exp_lik + exp_prior + entropy, exp_lik


def test_log_px_matches_exact_within_mc_error(ppca):
    model, guide, x, log_px, _, _ = ppca
    est = estimate_bounds(model, guide, x, 2000, batch_size=7, max_rows=3000)
    s = est.summary()
    assert abs(s["log_px"]["mean"] - log_px.mean().item()) < 3 * s["log_px"]["mc_se"]
    # per datapoint too, allowing for the expected 0.3% of 3-sigma misses over 20 points
    z = (est.log_px - log_px) / est.log_px_se
    assert (z.abs() < 3.5).all(), z


def test_elbo_and_reconstruction_match_analytic(ppca):
    model, guide, x, _, elbo, exp_lik = ppca
    est = estimate_bounds(model, guide, x, 4000, max_rows=10_000)
    s = est.summary()
    assert abs(s["elbo"]["mean"] - elbo.mean().item()) < 3 * s["elbo"]["mc_se"]
    lw, lik = log_weights(model, guide, x, 4000)
    se = lik.std(0).pow(2).sum().sqrt() / math.sqrt(4000) / x.shape[0]
    assert abs(lik.mean().item() - exp_lik.mean().item()) < 3 * se


def test_bounds_are_ordered(ppca):
    model, guide, x, log_px, elbo, _ = ppca
    est = estimate_bounds(model, guide, x, 5000, ks=(1, 5, 50), max_rows=20_000)
    s = est.summary()
    chain = [s["iwae"]["1"], s["iwae"]["5"], s["iwae"]["50"]]
    for lo, hi in zip(chain[:-1], chain[1:]):
        gap_se = math.hypot(lo["mc_se"], hi["mc_se"])
        assert hi["mean"] - lo["mean"] > 3 * gap_se
    # IWAE-50 is still below the truth, and the guide's imperfection is visible
    assert s["iwae"]["50"]["mean"] < log_px.mean().item() + 3 * s["iwae"]["50"]["mc_se"]
    assert log_px.mean().item() - elbo.mean().item() > 0.05


def test_chunking_does_not_change_estimates(ppca):
    model, guide, x, *_ = ppca
    pyro.set_rng_seed(3)
    a = estimate_bounds(model, guide, x, 64, batch_size=20, max_rows=10_000)
    pyro.set_rng_seed(3)
    b = estimate_bounds(model, guide, x, 64, batch_size=20, max_rows=20 * 64)
    torch.testing.assert_close(a.log_px, b.log_px)  # equal to float32 rounding
    c = estimate_bounds(model, guide, x, 64, batch_size=3, max_rows=7)  # tiny chunks run
    assert c.log_px.shape == (20,)


def test_analytic_kl_equals_monte_carlo_kl():
    """The mean-field ELBO's closed-form KL (what TraceMeanField_ELBO uses) agrees with
    the Monte Carlo KL of the same VAE, and its loss with reconstruction minus KL."""
    vae = VAE(16, VAEConfig(z_dim=3, hidden=(8,)))
    x = torch.bernoulli(torch.full((6, 16), 0.3))
    K = 4000
    lw, lik = log_weights(vae.model, vae.guide, x, K)
    kl_particles = lik - lw  # log q(z|x) - log p(z) per draw
    kl_mc, kl_se = kl_particles.mean(0), kl_particles.std(0) / math.sqrt(K)
    loc, scale = vae.encoder(x)
    kl_exact = torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).sum(-1)
    assert ((kl_mc - kl_exact).abs() < 3.5 * kl_se).all(), (kl_mc, kl_exact, kl_se)

    meanfield = -TraceMeanField_ELBO(num_particles=K, vectorize_particles=True,
                                     max_plate_nesting=1).loss(vae.model, vae.guide, x)
    rec, rec_se = lik.mean(0).sum(), lik.std(0).pow(2).sum().sqrt() / math.sqrt(K)
    expected = (rec - kl_exact.sum()).item()
    # both sides average K independent reconstruction draws
    assert abs(meanfield - expected) < 3 * math.sqrt(2) * rec_se.item()


def test_kl_weight_does_not_enter_the_bounds():
    vae = VAE(16, VAEConfig(z_dim=3, hidden=(8,)))
    x = torch.bernoulli(torch.full((4, 16), 0.5))
    pyro.set_rng_seed(5)
    a, _ = log_weights(vae.model, vae.guide, x, 10)
    pyro.set_rng_seed(5)
    b, _ = log_weights(vae.model, vae.guide, x, 10, kl_weight=0.1)
    assert torch.allclose(a, b)


# A mixture model whose discrete component must be summed out exactly.
PI = torch.tensor([0.2, 0.5, 0.3])
MU = torch.tensor([-3.0, 0.0, 2.5])
SX = 0.5


def mixture_model(x):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PI), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(MU[y], 1.0))
        pyro.sample("x", dist.Normal(z, SX), obs=x)


def mixture_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.8 * x, 0.7))


def mixture_log_px(x):
    comp = dist.Normal(MU, math.sqrt(1 + SX**2)).log_prob(x.unsqueeze(-1))
    return torch.logsumexp(comp + PI.log(), -1)


def test_model_enumeration_is_summed_exactly_inside_each_weight():
    x = torch.tensor([-2.5, 0.3, 1.9, 4.0])
    K = 7
    pyro.set_rng_seed(11)
    lw, _ = log_weights(mixture_model, mixture_guide, x, K)
    pyro.set_rng_seed(11)
    z = dist.Normal(0.8 * x.repeat(K), 0.7).sample()  # the same draws the guide made
    xr = x.repeat(K)
    joint = (PI.log() + dist.Normal(MU, 1.0).log_prob(z.unsqueeze(-1))
             + dist.Normal(z, SX).log_prob(xr).unsqueeze(-1))
    explicit = torch.logsumexp(joint, -1) - dist.Normal(0.8 * xr, 0.7).log_prob(z)
    assert torch.allclose(lw, explicit.view(K, 4), atol=1e-5)


def test_enumerated_model_log_px_is_exact_within_mc_error():
    x = torch.tensor([-2.5, 0.3, 1.9, 4.0])
    est = estimate_bounds(mixture_model, mixture_guide, x, 20_000, max_rows=40_000)
    z = (est.log_px - mixture_log_px(x)) / est.log_px_se
    assert (z.abs() < 3.5).all(), z


def test_guide_enumeration_gives_unbiased_log_px():
    """y enumerated in the guide with z | y drawn per value: w = sum_y p(x,y,z^y)/q(z^y|x,y)."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            logits = -0.5 * (x.unsqueeze(-1) - MU) ** 2
            y = pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
            pyro.sample("z", dist.Normal(0.7 * x + 0.3 * MU[y], 0.8))

    x = torch.tensor([-2.5, 0.3, 1.9, 4.0])
    est = estimate_bounds(mixture_model, guide, x, 20_000, max_rows=40_000)
    z = (est.log_px - mixture_log_px(x)) / est.log_px_se
    assert (z.abs() < 3.5).all(), z
    assert (est.elbo < mixture_log_px(x)).all()


def test_site_outside_data_plate_is_refused():
    def model(x):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(g, 1.0), obs=x)

    def guide(x):
        pyro.sample("g", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="not inside the data plate"):
        log_weights(model, guide, torch.zeros(3), 2)


# --- error bars: heavy tails, the tail-aware Monte Carlo error, the jackknife --------------

@pytest.fixture
def narrow_ppca():
    """The linear-Gaussian model with the exact posterior mean and a guide 0.75 times as
    wide as the posterior's marginals: the weights' tail is Pareto with shape k = the
    largest eigenvalue of I - S^1/2 Sigma^-1 S^1/2 (S the guide's, Sigma the posterior's
    covariance), here 0.50, so their variance is only just finite."""
    lg = linear_gaussian(seed=1, width=0.75)
    return lg.model, lg.guide, lg.marginal, lg.k


def test_tail_aware_se_covers_the_truth_where_the_delta_method_does_not(narrow_ppca):
    """3000 independent estimates (20 points, 150 repeats each), K = 1000: over those with
    k-hat <= 0.7 (the others have no error to report), the share of truths inside +-2 new
    standard errors is 95% within 3 binomial standard errors; the delta method's is below
    that band. +-1 new standard error covers at least its nominal 68%."""
    model, guide, marginal, k_true = narrow_ppca
    x = marginal.sample((20,)).repeat(150, 1)
    est = estimate_bounds(model, guide, x, 1000, batch_size=1000, max_rows=250_000)
    truth = marginal.log_prob(x)
    assert abs(est.k_hat.mean().item() - k_true) < 0.1  # the tail is as heavy as designed
    ok = ~est.unreliable
    n = ok.sum().item()
    assert n > 0.9 * len(x)
    band = 3 * math.sqrt(0.95 * 0.05 / n)
    cover = {f"{name}{m}": ((est.log_px - truth).abs() < m * se)[ok].double().mean().item()
             for name, se in (("new", est.log_px_se), ("delta", est.log_px_se_delta)) for m in (1, 2)}
    assert abs(cover["new2"] - 0.95) < band, cover
    assert cover["delta2"] < 0.95 - band, cover
    assert cover["new1"] > 0.683 - 3 * math.sqrt(0.683 * 0.317 / n), cover
    assert cover["delta1"] < cover["new1"], cover


def test_jackknife_has_less_bias_than_iwae_at_the_same_k(ppca):
    """10,000 estimates at K = 20 with the fixture's imperfect guide: IWAE-20 is measurably
    below log p(x) (its bias is about 4.5 standard errors of a mean of 4000 estimates, too
    close to the 5 asked for: hence 10,000); the jackknife estimate from the same draws is
    much closer. The copies of an image get independent draws, as their keys differ."""
    model, guide, x, log_px, _, _ = ppca
    est = estimate_bounds(model, guide, x.repeat(500, 1), 20, batch_size=10_000, max_rows=200_000, seed=0)
    truth = log_px.repeat(500)
    iwae, jk = est.log_px - truth, est.jackknife - truth
    se_iwae, se_jk = iwae.std().item() / math.sqrt(len(iwae)), jk.std().item() / math.sqrt(len(jk))
    assert iwae.mean().item() < -5 * se_iwae
    assert abs(jk.mean().item()) < abs(iwae.mean().item()) / 3
    assert abs(jk.mean().item()) < 4 * se_jk


def test_diagnostics_leave_the_iwae_numbers_as_they_were(ppca):
    """The IWAE-k sweep, log p(x) and the old delta-method error are the formulas they were
    before the diagnostics came in, for the same draws (to float32 rounding: the sums now
    run over the chunks as they stream)."""
    model, guide, x, *_ = ppca
    est = estimate_bounds(model, guide, x, 200, batch_size=20, max_rows=10_000, seed=7)
    lw, _ = log_weights(model, guide, x, 200, keys=DrawKeys(7, torch.arange(len(x))))
    for k, v in est.iwae.items():
        m = 200 // k
        expected = (torch.logsumexp(lw[: m * k].view(m, k, -1), 1) - math.log(k)).mean(0)
        torch.testing.assert_close(v, expected, msg=str(k))
    torch.testing.assert_close(est.log_px, torch.logsumexp(lw, 0) - math.log(200))
    w = torch.exp(lw - lw.max(0, keepdim=True).values)
    torch.testing.assert_close(est.log_px_se_delta, w.std(0) / (math.sqrt(200) * w.mean(0)))
    assert est.k_hat.shape == est.jackknife.shape == (20,)


def concatenating_bounds(model, guide, x, K, chunk, seed):
    """The evaluator as it was before it streamed: every chunk's weights of the batch kept,
    then each number computed from all K at once. The reference for the streaming one."""
    lw, ll = [], []
    for k0 in range(0, K, chunk):
        with pyro.validation_enabled(k0 == 0):
            w, lik = log_weights(model, guide, x, min(chunk, K - k0), keys=DrawKeys(seed, torch.arange(len(x)), k0))
        lw.append(w)
        ll.append(lik)
    lw = torch.cat(lw)
    k_hat = pareto_k(lw)
    out = {"elbo": lw.mean(0), "elbo_se": lw.std(0) / math.sqrt(K), "log_lik": torch.cat(ll).mean(0),
           "log_px": torch.logsumexp(lw, 0) - math.log(K), "k_hat": k_hat,
           "log_px_se": log_mean_exp_se(lw, k_hat), "log_px_se_delta": delta_method_se(lw),
           "jackknife": jackknife(lw, 1)}
    for k in sweep_for(K):
        m = K // k
        groups = torch.logsumexp(lw[: m * k].view(m, k, -1), 1) - math.log(k)
        out[f"iwae{k}"] = groups.mean(0)
        out[f"iwae_se{k}"] = groups.std(0) / math.sqrt(m) if k < K else out["log_px_se"]
    return out


@pytest.mark.parametrize("K,max_rows", [(200, 10_000), (200, 7 * 20), (1000, 13 * 20), (30, 20)])
def test_the_streaming_evaluator_equals_the_concatenating_one_per_image(narrow_ppca, K, max_rows):
    """For the same draws, every per-image number equals the one computed from all K
    weights at once, whatever the chunks (here of K, 7, 13 and 1 draws: the IWAE-k groups
    and the groups of the tail-aware error straddle them), to float32 rounding."""
    model, guide, marginal, _ = narrow_ppca
    x = marginal.sample((20,))
    est = estimate_bounds(model, guide, x, K, batch_size=20, max_rows=max_rows, seed=11)
    ref = concatenating_bounds(model, guide, x, K, max_rows // 20, seed=11)
    got = {"elbo": est.elbo, "elbo_se": est.elbo_se, "log_lik": est.log_lik, "log_px": est.log_px,
           "k_hat": est.k_hat, "log_px_se": est.log_px_se, "log_px_se_delta": est.log_px_se_delta,
           "jackknife": est.jackknife,
           **{f"iwae{k}": v for k, v in est.iwae.items()}, **{f"iwae_se{k}": v for k, v in est.iwae_se.items()}}
    assert set(got) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value.to(got[name].dtype), rtol=1e-5, atol=1e-5,
                                   equal_nan=True, msg=name)


MEMORY_PROBE = """
import resource, sys, torch
from pyro_vae import VAE, VAEConfig, estimate_bounds
torch.set_num_threads(1)  # tiny tensors: threads would only wait on each other
torch.manual_seed(0)
vae = VAE(16, VAEConfig(z_dim=2, hidden=(8,)))
x = torch.bernoulli(torch.full((3, 16), 0.5))
estimate_bounds(vae.model, vae.guide, x, int(sys.argv[1]), batch_size=3, max_rows=30_000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_evaluation_memory_does_not_grow_with_k(tmp_path):
    """Peak resident memory at K = 10^6 is within 100 MB of that at K = 10^3, on the same
    three images (each in a fresh process)."""
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    peak = {}
    for K in (1_000, 1_000_000):
        out = subprocess.run([sys.executable, str(probe), str(K)], capture_output=True, text=True, env=env,
                             check=True)
        peak[K] = int(out.stdout.split()[-1])
    assert peak[1_000_000] - peak[1_000] < 100, peak


def test_summary_withholds_untrusted_errors(narrow_ppca):
    model, guide, marginal, _ = narrow_ppca
    x = marginal.sample((50,))
    s = estimate_bounds(model, guide, x, 200).summary()
    pk = s["pareto_k"]
    assert 0 <= pk["share_above_0.7"] <= pk["share_above_0.5"] <= 1
    assert pk["images_above_0.7"] == round(50 * pk["share_above_0.7"])
    for key in ("log_px", "jackknife"):
        st = s[key]
        assert (st["mc_se"] is None) == (st["mc_se_withheld"] > 0)
        assert st["mc_se_delta"] > 0
    assert s["iwae"]["200"]["mc_se"] == s["log_px"]["mc_se"]
    assert pk["images_above_0.7"] > 0 and s["log_px"]["mc_se_trusted_images"] > 0  # at K = 200 some tails look heavy
