"""The diagnostics on draws whose answers are known: generalized Pareto tails of given
shape, brute-force leave-one-out sums, and the jackknife's algebra.

Statistical checks use fixed seeds, and tolerances from the number of replicate columns:
k-hat's spread over columns gives the standard error of its mean.
"""

import math

import pytest
import torch
from pyro.ops.stats import fit_generalized_pareto

from pyro_vae.diagnostics import (delta_method_se, gpd_fit, jackknife, leave_one_out_logsumexp,
                                  log_mean_exp_se, pareto_k, psis, tail_length)


def gpd_log_weights(k: float, K: int, columns: int, seed: int) -> torch.Tensor:
    """log w for w = 1 + Y, Y ~ GPD(shape k, scale 1): every upper tail of w is GPD with shape k."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(K, columns, generator=g, dtype=torch.float64)
    y = torch.expm1(-k * torch.log(u)) / k  # inverse CDF at 1 - u
    return torch.log1p(y)


def test_gpd_fit_matches_pyros_single_column_fit():
    """Our batched fit, without the prior, is Pyro's Zhang-Stephens fit (which includes the
    prior on k) column by column."""
    lw = gpd_log_weights(0.5, 400, 3, seed=0)
    x = torch.sort(torch.exp(lw) - 1, dim=0).values.T  # (3, 400) exceedances over 1
    k, sigma = gpd_fit(x)
    for i in range(3):
        k_ref, sigma_ref = fit_generalized_pareto(x[i])
        assert k[i].item() == pytest.approx(k_ref, abs=1e-9)
        assert sigma[i].item() == pytest.approx(sigma_ref, rel=1e-6)
    k_raw, _ = gpd_fit(x, prior=False)
    n = x.shape[1]
    assert torch.allclose(k, (n * k_raw + 5) / (n + 10))


@pytest.mark.parametrize("shape", [0.3, 0.6, 0.9])
def test_k_hat_recovers_known_pareto_shapes(shape):
    K, columns = 2000, 300
    M = tail_length(K)
    k_hat = pareto_k(gpd_log_weights(shape, K, columns, seed=int(10 * shape)))
    # the prior pulls k towards 1/2 as if by 10 more points: undo it to see the fit's own bias
    n = M
    k_fit = (k_hat * (n + 10) - 5) / n
    se = k_fit.std() / math.sqrt(columns)
    assert abs(k_fit.mean().item() - shape) < 4 * se.item() + 0.02, (k_fit.mean(), se)
    # one column's k-hat is within its sampling error: the asymptotic sd (1 + k) / sqrt(M)
    assert k_fit.std().item() == pytest.approx((1 + shape) / math.sqrt(M), rel=0.3)
    # and with the prior, as reported, the median still sits near the truth
    assert abs(k_hat.median().item() - shape) < 0.06


def test_psis_smooths_only_the_tail_and_not_above_the_largest_weight():
    lw = gpd_log_weights(0.6, 1000, 4, seed=1)
    smoothed, k = psis(lw)
    M = tail_length(1000)
    order = torch.argsort(lw, dim=0)
    body = order[: 1000 - M]
    assert torch.equal(torch.gather(smoothed, 0, body), torch.gather(lw, 0, body))
    assert (smoothed.max(0).values <= lw.max(0).values + 1e-12).all()
    # the smoothed tail keeps the order of the raw one
    tail = order[1000 - M:]
    assert (torch.gather(smoothed, 0, tail).diff(dim=0) >= 0).all()
    assert torch.equal(k, pareto_k(lw))
    assert torch.isnan(pareto_k(torch.randn(10, 2))).all()  # too few draws for a tail


def test_leave_one_out_logsumexp_is_exact_even_when_one_weight_dominates():
    g = torch.Generator().manual_seed(2)
    lw = torch.randn(50, 3, generator=g, dtype=torch.float64)
    lw[7, 1] = 80.0  # holds all but e^-75 of the column's mass
    lw[3, 2] = lw[9, 2] = 40.0  # two equal dominant weights
    loo = leave_one_out_logsumexp(lw)
    brute = torch.stack([torch.logsumexp(torch.cat([lw[:i], lw[i + 1:]]), 0) for i in range(50)])
    assert torch.allclose(loo, brute, rtol=0, atol=1e-10)


def test_jackknife_order_one_is_the_textbook_formula():
    g = torch.Generator().manual_seed(3)
    lw = torch.randn(30, 4, generator=g, dtype=torch.float64) * 2
    K = 30
    L = torch.logsumexp(lw, 0) - math.log(K)
    loo = torch.stack([torch.logsumexp(torch.cat([lw[:i], lw[i + 1:]]), 0) for i in range(K)]) - math.log(K - 1)
    assert torch.allclose(jackknife(lw, 1), K * L - (K - 1) * loo.mean(0))
    # a constant weight has no bias to remove
    flat = torch.full((20, 2), -3.0, dtype=torch.float64)
    assert torch.allclose(jackknife(flat, 1), flat[0]) and torch.allclose(jackknife(flat, 2), flat[0])


def test_jackknife_removes_the_bias_of_log_mean_exp():
    """Log-normal weights (log w ~ N(-s^2/2, s^2), so log E w = 0): IWAE-K's bias is
    about -(e^{s^2} - 1) / (2K); order 1 removes most of it, order 2 (grouped) more."""
    g = torch.Generator().manual_seed(4)
    K, columns, s = 100, 4000, 1.5
    lw = torch.randn(K, columns, generator=g, dtype=torch.float64) * s - s**2 / 2
    iwae = torch.logsumexp(lw, 0) - math.log(K)
    se = iwae.std().item() / math.sqrt(columns)
    assert iwae.mean().item() < -5 * se  # biased, measurably
    for order in (1, 2):
        jk = jackknife(lw, order)
        assert abs(jk.mean().item()) < abs(iwae.mean().item()) / 3
        assert abs(jk.mean().item()) < 4 * jk.std().item() / math.sqrt(columns)


def test_tail_aware_se_is_the_delta_method_on_light_tails_and_larger_on_heavy_ones():
    g = torch.Generator().manual_seed(5)
    light = torch.randn(2000, 50, generator=g, dtype=torch.float64) * 0.3
    assert torch.allclose(log_mean_exp_se(light), delta_method_se(light), rtol=0.15)
    heavy = gpd_log_weights(0.45, 2000, 50, seed=6)
    assert (log_mean_exp_se(heavy) / delta_method_se(heavy)).median() > 1.1
    none = log_mean_exp_se(gpd_log_weights(1.5, 2000, 50, seed=7))  # no mean: no error
    assert torch.isnan(none).float().mean() > 0.9


def exact_guide_pair():
    """The linear-Gaussian model with its exact posterior (full covariance) as the guide:
    every importance weight is p(x), but for rounding."""
    import pyro
    import pyro.distributions as dist
    from pyro_vae.exact import linear_gaussian

    lg = linear_gaussian(seed=1)
    tril = torch.linalg.cholesky(lg.posterior_cov)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal((x - lg.mu) @ lg.guide_matrix.T, scale_tril=tril))

    return lg, guide


def test_an_exact_guide_raises_no_alarm_and_has_no_monte_carlo_error():
    from pyro_vae import estimate_bounds

    lg, guide = exact_guide_pair()
    torch.manual_seed(0)
    x = lg.marginal.sample((200,))
    est = estimate_bounds(lg.model, guide, x, 1000)
    assert torch.allclose(est.log_px, lg.marginal.log_prob(x), atol=1e-4)
    assert not est.unreliable.any()
    assert (est.k_hat == -math.inf).all()
    assert (est.log_px_se == 0).all() and (est.log_px_se_delta == 0).all()
    summary = est.summary()
    assert summary["pareto_k"]["images_above_0.7"] == 0 and summary["log_px"]["mc_se"] == 0.0
    assert summary["log_px"]["mc_se_withheld"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_equal_but_for_rounding_are_one_weight_and_a_real_spread_is_not(dtype):
    from pyro_vae.diagnostics import WeightStream

    g = torch.Generator().manual_seed(0)
    base = -torch.linspace(3.0, 90.0, 6, dtype=torch.float64)  # six datapoints of different size
    eps = torch.finfo(dtype).eps
    noise = (torch.rand(1000, 6, generator=g, dtype=torch.float64) - 0.5) * 8 * eps * base.abs()
    flat = (base + noise).to(dtype)
    assert (pareto_k(flat) == -math.inf).all()
    assert (log_mean_exp_se(flat) == 0).all() and (delta_method_se(flat) == 0).all()
    stream = WeightStream(1000, 6)
    for chunk in flat.split(300):
        stream.update(chunk)
    assert (stream.pareto_k() == -math.inf).all() and (stream.log_mean_exp_se() == 0).all()
    # a spread a thousand times the rounding is a tail: it gets a shape and an error
    spread = (base + 1000 * noise).to(dtype)
    assert torch.isfinite(pareto_k(spread)).all() and (log_mean_exp_se(spread) > 0).all()
    # and heavy-tailed weights keep their alarm
    assert (pareto_k(gpd_log_weights(0.9, 1000, 6, seed=2)) > 0.7).float().mean() > 0.5
