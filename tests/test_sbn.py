"""The sigmoid belief network and the wake-sleep objectives, checked on an SBN of 3 binary
units, whose log p(x) is exact by summing its 8 states: the evaluator converges to it, the
wake gradients are the self-normalised formulas for the same draws with weights per
datapoint, and RWS steps raise the exact log-likelihood. Plus the refusals."""

import itertools
import math

import pyro
import pytest
import torch
from torch.nn import functional as F

from pyro_vae import CompiledLoss, build_model, estimate_bounds, make_objective
from pyro_vae.bounds import importance_traces
from pyro_vae.errors import ConfigError

from helpers import assert_clean_error, invoke

D = 6
STATES = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))  # (8, 3)


def bernoulli_log(value, logits):
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


def log_joint(m, x, h):
    """log p(x, h) of a one-layer SBN by hand: h (..., 3), x (B, D)."""
    return bernoulli_log(h, m.top_logits.expand_as(h)) + bernoulli_log(x.expand(*h.shape[:-1], D), m.decoder(h))


def log_guide(m, x, h):
    return bernoulli_log(h, m.recognition[0](x).expand_as(h))


def exact_log_px(m, x):
    """log p(x) per row by enumerating the 8 states of h."""
    h = STATES.unsqueeze(1).expand(8, x.shape[0], 3)
    return torch.logsumexp(log_joint(m, x, h), 0)


def sbn3(seed=0):
    torch.manual_seed(seed)
    m = build_model("sbn", D, {"layers": (3,)})
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 1.0)
    return m


def images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, D, generator=g) < 0.4).float()


def test_the_evaluator_converges_to_the_exact_log_likelihood():
    m, x = sbn3(), images(5)
    est = estimate_bounds(m.model, m.guide, x, 4000, seed=3)
    exact = exact_log_px(m, x).detach()
    se = est.log_px_se_delta
    # IWAE-K sits below log p(x) by about var(w) / (2 K mean(w)^2), a few s.e. here at most
    assert torch.all((est.log_px - exact).abs() < 5 * se + 1e-3), (est.log_px, exact, se)
    assert torch.all(est.elbo < exact)


def test_wake_gradients_are_the_self_normalised_formulas_with_weights_per_datapoint():
    m, x = sbn3(), images(2)
    assert not torch.equal(x[0], x[1])
    k = 4
    objective = make_objective("rws", k, insomnia=1.0)
    torch.manual_seed(5)
    loss = objective.differentiable_loss(m.model, m.guide, x)
    grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    torch.manual_seed(5)  # the same draws
    _, _, trace = importance_traces(m.model, m.guide, x, k, stop_draws=True)
    h = trace.nodes["h1"]["value"]  # (k, 2, 3)
    log_p, log_q = log_joint(m, x, h), log_guide(m, x, h)
    weights = torch.softmax((log_p - log_q).detach(), 0)  # each datapoint's own column
    assert torch.allclose(weights.sum(0), torch.ones(2))
    # Pyro's ReweightedWakeSleep normalises the batch's summed log weights: other weights
    batch_weights = torch.softmax((log_p - log_q).detach().sum(1), 0)
    assert not torch.allclose(weights, batch_weights.unsqueeze(1).expand_as(weights), atol=1e-3)
    explicit = torch.autograd.grad(-(weights * (log_p + log_q)).sum(), list(m.parameters()), allow_unused=True)
    for (name, _), got, want in zip(m.named_parameters(), grads, explicit):
        if want is None:  # the baselines: no part of wake-sleep
            assert got is None, name
            continue
        assert torch.allclose(got, want, atol=1e-5), name
    bound = torch.logsumexp(log_p - log_q, 0) - math.log(k)
    assert loss.item() == pytest.approx(-bound.sum().item(), abs=1e-4)


def test_the_sleep_phase_trains_the_guide_on_the_models_draws():
    m, x = sbn3(), images(3)
    sleep = make_objective("rws", 2, insomnia=0.0)
    loss = sleep.differentiable_loss(m.model, m.guide, x)
    loss.backward()
    # the guide's gradient is the sleep phase's alone: one draw (x', h') of the model per row
    assert m.recognition[0].weight.grad.abs().sum() > 0
    assert sleep.sleep(m.model, m.guide, x).shape == (3,)


def test_a_few_hundred_rws_steps_raise_the_exact_log_likelihood():
    truth = sbn3(seed=7)
    with torch.no_grad():
        truth.decoder.weight.mul_(3.0)
        data = truth.sample(64, draw=True)
    m = sbn3(seed=8)
    before = exact_log_px(m, data).mean().item()
    objective = make_objective("rws", 5)
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    pyro.set_rng_seed(0)
    for _ in range(300):
        opt.zero_grad()
        objective.differentiable_loss(m.model, m.guide, data).backward()
        opt.step()
    after = exact_log_px(m, data).mean().item()
    assert after > before + 1.0, (before, after)
    assert after < exact_log_px(truth, data).mean().item() + 1.0  # a likelihood, not an overfit far beyond


def test_wake_sleep_refuses_a_model_without_parameters():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            h = pyro.sample("h", pyro.distributions.Bernoulli(0.5 * torch.ones(x.shape[0], 2)).to_event(1))
            pyro.sample("x", pyro.distributions.Bernoulli(0.2 + 0.6 * h[..., :1].expand(*h.shape[:-1], D)).to_event(1),
                        obs=x)

    w = torch.zeros(D, 2, requires_grad=True)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("h", pyro.distributions.Bernoulli(logits=x @ w).to_event(1))

    with pytest.raises(ConfigError, match="model's parameters"):
        make_objective("wake-sleep").differentiable_loss(model, guide, images(3))


@pytest.mark.parametrize("args,fragment", [
    (["--objective", "rws", "--particles", "1"], "--particles"),
    (["--objective", "wake-sleep", "--particles", "3"], "--particles"),
    (["--objective", "tracegraph", "--insomnia", "0.5"], "--insomnia"),
    (["--objective", "rws", "--insomnia", "1.5"], "--insomnia"),
    (["--objective", "rws", "--beta", "0.5"], "--beta"),
    (["--layers", "4,4,4,4"], "--layers"),
    (["--objective", "meanfield"], "--objective"),
])
def test_bad_sbn_options_are_refused_in_one_line(tiny_npy, tmp_path, args, fragment):
    run = tmp_path / "run"
    assert_clean_error(invoke("fit", "sbn", "--dataset", tiny_npy, "--run-dir", run, "-q", *args), fragment)
    assert not run.exists()


@pytest.mark.parametrize("layers", ["4,0", "0", "-2", "4,x", ""])
def test_a_layer_of_no_units_is_refused(tiny_npy, tmp_path, layers):
    run = tmp_path / "run"
    assert_clean_error(invoke("fit", "sbn", "--dataset", tiny_npy, "--run-dir", run, "--layers", layers), "--layers")
    assert not run.exists()


@pytest.mark.parametrize("objective", ["rws", "wake-sleep", "tracegraph"])
def test_fit_sbn_and_evaluate(tiny_npy, tmp_path, objective):
    run = tmp_path / objective
    result = invoke("fit", "sbn", "--dataset", tiny_npy, "--layers", "8,4", "--objective", objective,
                    "--epochs", 2, "--batch-size", 50, "--eval-size", 50, "--device", "cpu", "-q",
                    "--figures", "none", "--run-dir", run)
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", run, "--iw", 20, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "log p(x), IWAE-20" in result.output


def test_the_compiled_rws_step_is_the_eager_one():
    m, x = sbn3(), images(8)
    objective = make_objective("rws", 3)
    compiled = CompiledLoss(m, objective, 1.0)
    for _ in range(3):
        state = torch.get_rng_state()
        eager = m.training_loss(objective, (x,), 1.0)
        eager_grads = torch.autograd.grad(eager, list(m.parameters()), allow_unused=True)
        torch.set_rng_state(state)
        traced = compiled((x,), 1.0)
        traced_grads = torch.autograd.grad(traced, list(m.parameters()), allow_unused=True)
        assert torch.equal(eager.detach(), traced.detach())
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(eager_grads, traced_grads))
    assert compiled.compiled.enabled and compiled.compiled.graph_calls == 3
