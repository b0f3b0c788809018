"""The Bayesian decoder: local reparameterization against weight sampling (moments, the
gradient's expectation and variance), the weights' KL against Monte Carlo, the KL's scale
per step, what the evaluator estimates with global latents, and the refusals."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae import build_model, estimate_bounds, make_objective
from pyro_vae.bayesian import BayesianLinear, BayesianMLP, _linear

from helpers import assert_clean_error, invoke


def noisy_layer(n_in=5, n_out=4, seed=0):
    torch.manual_seed(seed)
    layer = BayesianLinear(n_in, n_out)
    with torch.no_grad():
        layer.raw_scale.uniform_(-2.0, 0.0)
        layer.bias_raw_scale.uniform_(-2.0, 0.0)
    return layer


def test_local_pre_activations_have_the_moments_of_weight_sampled_ones():
    layer, n = noisy_layer(), 40_000
    a = torch.randn(3, 5)
    with torch.no_grad():
        local = layer.local(a.expand(n, 3, 5))  # (n, 3, 4)
        w = layer.loc + layer.scale * torch.randn(n, 1, 4, 5)
        b = layer.bias_loc + layer.bias_scale * torch.randn(n, 1, 4)
        sampled = _linear(a.expand(n, 3, 5), w, b)
    for draws in (local, sampled):
        other = sampled if draws is local else local
        mean_se = (draws.var(0) / n).sqrt()
        assert torch.all((draws.mean(0) - other.mean(0)).abs() < 5 * math.sqrt(2) * mean_se)
        var_se = draws.var(0) * math.sqrt(2 / (n - 1))
        assert torch.all((draws.var(0) - other.var(0)).abs() < 5 * math.sqrt(2) * var_se)
    # and the closed form they both estimate
    var = a.pow(2) @ layer.scale.pow(2).T + layer.bias_scale.pow(2)
    assert torch.allclose(local.var(0), var.detach(), rtol=0.05)


def test_the_weight_kl_is_the_monte_carlo_kl():
    torch.manual_seed(1)
    net = BayesianMLP([3, 6, 4], "tanh", prior_scale=0.5, sampling="shared", name="net")
    with torch.no_grad():
        for layer in net.layers:
            layer.raw_scale.uniform_(-3.0, 0.0)
            layer.loc.mul_(3.0)
    with pyro.plate("draws", 20_000):  # the weight sites batched over independent draws
        q = poutine.trace(net.sample_weights).get_trace(10, posterior=True)
        p = poutine.trace(poutine.replay(net.sample_weights, trace=q)).get_trace(10, posterior=False)
    log_ratio = [s["fn"].log_prob(s["value"]) - p.nodes[name]["fn"].log_prob(s["value"])
                 for name, s in q.nodes.items() if s["type"] == "sample"]
    mc = sum(log_ratio).detach()
    assert mc.shape == (20_000,)
    assert abs(mc.mean().item() - net.kl().item()) < 5 * mc.std().item() / math.sqrt(len(mc))


def bayesian_vae(sampling="local", data_size=1000, seed=0, noise=True):
    torch.manual_seed(seed)
    model = build_model("vae", 20, {"z_dim": 2, "hidden": (8,), "bayesian": "decoder", "weight_sampling": sampling})
    model.decoder.net.data_size.fill_(data_size)
    if noise:
        with torch.no_grad():
            for layer in model.decoder.net.layers:
                layer.raw_scale.fill_(-1.0)  # posterior scales of 0.31
                layer.loc.mul_(2.0)
    return model


def images(n, seed=2):
    return (torch.rand(n, 20, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def test_the_weights_kl_counts_batch_over_n_per_step():
    model, x = bayesian_vae(data_size=500), images(25)
    trace = poutine.trace(model.guide).get_trace(x)
    sites = [s for name, s in trace.nodes.items() if name.startswith("decoder.")]
    assert len(sites) == 4 and all(s["scale"] == pytest.approx(25 / 500) for s in sites)
    # meanfield: minus the loss is the batch's ELBO with the closed-form weight KL at batch / N
    pyro.set_rng_seed(0)
    with_kl = make_objective("meanfield").loss(model.model, model.guide, x)
    model.decoder.net.data_size.fill_(10**12)  # the weights' KL scaled to nothing
    pyro.set_rng_seed(0)
    without = make_objective("meanfield").loss(model.model, model.guide, x)
    assert with_kl - without == pytest.approx(25 / 500 * model.decoder.net.kl().item(), rel=1e-3)


def gradients(sampling, x, repeats):
    model = bayesian_vae(sampling)
    model.train()
    objective = make_objective("meanfield")
    params = [model.decoder.net.layers[0].loc, model.decoder.net.layers[-1].loc]
    draws = [[], []]
    for _ in range(repeats):
        grads = torch.autograd.grad(model.training_loss(objective, (x,), 1.0), params)
        for i, g in enumerate(grads):
            draws[i].append(g.flatten())
    return [torch.stack(d) for d in draws]


def test_the_three_estimators_have_one_expectation_and_local_the_smaller_variance():
    x, repeats = images(32), 200
    pyro.set_rng_seed(0)
    results = {s: gradients(s, x, repeats) for s in ("shared", "local", "independent")}
    for layer in range(2):
        mean = {s: r[layer].mean(0) for s, r in results.items()}
        se = {s: r[layer].std(0) / math.sqrt(repeats) for s, r in results.items()}
        for a, b in (("shared", "local"), ("shared", "independent"), ("local", "independent")):
            z = (mean[a] - mean[b]) / (se[a].pow(2) + se[b].pow(2)).sqrt()
            assert z.abs().max() < 4.5, (layer, a, b, z.abs().max())
        variance = {s: r[layer].var(0).sum().item() for s, r in results.items()}
        assert variance["local"] < variance["shared"], (layer, variance)


def test_the_evaluator_draws_the_weights_inside_each_weight_without_their_density_ratio():
    x = images(7)
    # posterior scales near 0: the predictive likelihood is the point decoder's at the means
    bayes = bayesian_vae(noise=False)
    with torch.no_grad():
        for layer in bayes.decoder.net.layers:
            layer.raw_scale.fill_(-30.0)
            layer.bias_raw_scale.fill_(-30.0)
    point = build_model("vae", 20, {"z_dim": 2, "hidden": (8,)})
    point.encoder.load_state_dict(bayes.encoder.state_dict())
    with torch.no_grad():
        for linear, layer in zip([point.decoder.net[0], point.decoder.net[2]], bayes.decoder.net.layers):
            linear.weight.copy_(layer.loc)
            linear.bias.copy_(layer.bias_loc)
    bayes.eval(), point.eval()
    a = estimate_bounds(bayes.model, bayes.guide, x, 50, seed=1)
    b = estimate_bounds(point.model, point.guide, x, 50, seed=1)
    assert torch.allclose(a.log_px, b.log_px, atol=1e-4) and torch.allclose(a.elbo, b.elbo, atol=1e-4)
    # noisy weights: one draw per particle, the same for every datapoint, so each image's
    # estimate is the same in any batch
    noisy = bayesian_vae().eval()
    whole = estimate_bounds(noisy.model, noisy.guide, x, 40, seed=3, batch_size=7)
    parts = estimate_bounds(noisy.model, noisy.guide, x, 40, seed=3, batch_size=3, max_rows=30)
    assert torch.allclose(whole.log_px, parts.log_px, atol=1e-5)
    assert torch.all(whole.log_px >= whole.elbo)


@pytest.mark.parametrize("args,fragment", [
    (["--bayesian", "decoder", "--weight-prior", "0"], "--weight-prior"),
    (["--bayesian", "decoder", "--weight-prior", "-1"], "--weight-prior"),
    (["--bayesian", "decoder", "--decoder", "conv"], "--bayesian"),
    (["--bayesian", "encoder"], "--bayesian"),
    (["--bayesian", "decoder", "--objective", "iwae"], "--bayesian"),
    (["--bayesian", "decoder", "--objective", "rws"], "--bayesian"),
    (["--bayesian", "decoder", "--weight-sampling", "flipout"], "--weight-sampling"),
])
def test_bad_bayesian_options_are_refused_in_one_line(tiny_npy, tmp_path, args, fragment):
    run = tmp_path / "run"
    assert_clean_error(invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", run, "-q", *args), fragment)
    assert not run.exists()


@pytest.mark.parametrize("family", ["gmvae", "iwae"])
def test_families_without_a_bayesian_decoder_refuse_it(tiny_npy, tmp_path, family):
    run = tmp_path / "run"
    assert_clean_error(invoke("fit", family, "--dataset", tiny_npy, "--run-dir", run, "-q", "--bayesian", "decoder"),
                       "--bayesian")
    assert not run.exists()


def test_fit_a_bayesian_decoder_and_evaluate(tiny_npy, tmp_path):
    run = tmp_path / "run"
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--bayesian", "decoder", "--weight-sampling", "local",
                    "--z-dim", 2, "--hidden", 16, "--epochs", 2, "--batch-size", 20, "--eval-size", 50,
                    "--device", "cpu", "-q", "--figures", "none", "--run-dir", run)
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", run, "--iw", 20, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    from pyro_vae import load_run

    assert int(load_run(run).model.decoder.net.data_size) == 180  # the training split of the 200 images
