"""DRAW: the filterbank against the paper's formulas, the pair against a hand computation
from its networks, the evaluator against an explicit logsumexp, and the command line."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae import build_model, estimate_bounds
from pyro_vae.bounds import importance_traces
from pyro_vae.errors import ConfigError
from pyro_vae.keyed import DrawKeys
from pyro_vae.models.draw import Attention, filterbank

from helpers import assert_clean_error, invoke, make_binary_images

TINY = {"steps": 2, "hidden": 6, "z_dim": 3, "read_size": 2, "write_size": 3}


def direct_filterbank(centre, stride, variance, n, size):
    """F[i, a] = exp(-(a - mu_i)^2 / (2 sigma^2)) / Z_i, mu_i = g + (i - n/2 - 1/2) delta,
    one entry at a time (one image, positions 1..size)."""
    F = torch.zeros(n, size, dtype=torch.float64)
    for i in range(1, n + 1):
        mu = centre + (i - n / 2 - 0.5) * stride
        for a in range(1, size + 1):
            F[i - 1, a - 1] = math.exp(-((a - mu) ** 2) / (2 * variance))
        F[i - 1] /= F[i - 1].sum()
    return F


def set_window(att: Attention, gx=0.0, gy=0.0, log_var=0.0, log_stride=0.0, log_gamma=0.0):
    """Make the attention's placement constant: these five pre-activations whatever h."""
    with torch.no_grad():
        att.place.weight.zero_()
        att.place.bias.copy_(torch.tensor([gx, gy, log_var, log_stride, log_gamma]))


@pytest.mark.parametrize("n,size,centre,stride,variance", [(2, 8, 4.5, 3.0, 1.0), (5, 28, 10.2, 1.7, 0.6),
                                                           (1, 7, 3.0, 2.0, 2.5), (4, 9, -2.0, 0.5, 4.0)])
def test_the_filterbank_is_the_papers_formula(n, size, centre, stride, variance):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    F = filterbank(t(centre), t(stride), t(variance), n, size)
    torch.testing.assert_close(F, direct_filterbank(centre, stride, variance, n, size), rtol=1e-12, atol=1e-12)


def test_the_window_maps_the_linear_outputs_as_the_paper_says():
    att = Attention(4, n=3, image_shape=(1, 9, 12))  # H = 9, W = 12
    set_window(att, gx=0.2, gy=-0.4, log_var=math.log(0.7), log_stride=math.log(1.5), log_gamma=math.log(2.0))
    w = att.window(torch.randn(5, 4))
    assert torch.allclose(w.gx, torch.tensor((12 + 1) / 2 * 1.2)) and torch.allclose(w.gy, torch.tensor(10 / 2 * 0.6))
    assert torch.allclose(w.stride, torch.tensor((12 - 1) / (3 - 1) * 1.5))
    assert torch.allclose(w.variance, torch.tensor(0.7)) and torch.allclose(w.gamma, torch.tensor(2.0))
    # F_Y runs over the H rows, F_X over the W columns
    fy, fx = att.filters(w)
    assert fy.shape == (5, 3, 9) and fx.shape == (5, 3, 12)


def test_a_read_of_a_single_lit_pixel_and_of_a_constant_image():
    torch.manual_seed(0)
    att = Attention(4, n=3, image_shape=(2, 7, 6))
    set_window(att, gx=0.1, gy=-0.2, log_var=math.log(1.3), log_stride=math.log(0.8), log_gamma=math.log(1.7))
    w = att.window(torch.zeros(1, 4))
    fy = direct_filterbank(w.gy.item(), w.stride.item(), w.variance.item(), 3, 7)
    fx = direct_filterbank(w.gx.item(), w.stride.item(), w.variance.item(), 3, 6)
    lit = torch.zeros(1, 2, 7, 6)
    lit[0, 1, 4, 2] = 1.0  # channel 1, row 5, column 3 (1-based)
    read = att.read(lit, w).double()
    expected = 1.7 * torch.outer(fy[:, 4], fx[:, 2])  # gamma F_Y[i, 5] F_X[j, 3]
    torch.testing.assert_close(read[0, 1], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(read[0, 0], torch.zeros(3, 3))
    # each filter sums to one: a constant image reads as gamma times the constant everywhere
    constant = torch.full((1, 2, 7, 6), 0.3)
    torch.testing.assert_close(att.read(constant, w), torch.full((1, 2, 3, 3), 1.7 * 0.3))


@pytest.mark.parametrize("channels", [1, 3])
def test_no_attention_reads_what_a_filterbank_over_the_whole_image_reads(channels):
    """A grid of N = H = W filters of stride 1 centred on the image, with a vanishing
    variance and gamma 1, is the identity: the filterbank read is then the 'none' read."""
    shape = (channels, 6, 6)
    torch.manual_seed(1)
    x = torch.rand(4, math.prod(shape))
    error = torch.rand(4, math.prod(shape)) - 0.5
    h = torch.randn(4, 5)
    whole = build_model("draw", shape, {**TINY, "hidden": 5, "attention": "filterbank", "read_size": 6})
    set_window(whole.reader, log_var=math.log(1e-3))
    none = build_model("draw", shape, {**TINY, "hidden": 5, "attention": "none"})
    torch.testing.assert_close(whole.read(x, error, h), none.read(x, error, h), rtol=0, atol=1e-6)
    assert torch.equal(none.read(x, error, h), torch.cat([x, error], -1))


def lstm_by_hand(cell, x, h, c):
    W, b, U = cell.input.weight, cell.input.bias, cell.recurrent.weight
    pre = x @ W.T + b + h @ U.T
    n = h.shape[-1]
    i, f, g, o = (pre[..., k * n : (k + 1) * n] for k in range(4))
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def window_by_hand(att, h):
    _, H, W = att.image_shape
    out = h @ att.place.weight.T + att.place.bias
    n = att.n
    gx = (W + 1) / 2 * (out[..., 0] + 1)
    gy = (H + 1) / 2 * (out[..., 1] + 1)
    var, stride = out[..., 2].exp(), (max(H, W) - 1) / max(n - 1, 1) * out[..., 3].exp()
    fx = torch.stack([direct_filterbank(gx[b].item(), stride[b].item(), var[b].item(), n, W) for b in range(len(h))])
    fy = torch.stack([direct_filterbank(gy[b].item(), stride[b].item(), var[b].item(), n, H) for b in range(len(h))])
    return fy.float(), fx.float(), out[..., 4].exp()


def write_by_hand(model, h):
    if model.config.attention == "none":
        return h @ model.patch.weight.T + model.patch.bias
    C, H, W = model.image_shape
    n = model.config.write_size
    fy, fx, gamma = window_by_hand(model.writer, h)
    patch = (h @ model.patch.weight.T + model.patch.bias).view(len(h), C, n, n)
    return torch.stack([torch.stack([fy[b].T @ patch[b, k] @ fx[b] / gamma[b] for k in range(C)])
                        for b in range(len(h))]).reshape(len(h), -1)


def read_by_hand(model, x, error, h):
    if model.config.attention == "none":
        return torch.cat([x, error], -1)
    C, H, W = model.image_shape
    fy, fx, gamma = window_by_hand(model.reader, h)
    out = []
    for b in range(len(x)):
        images = torch.cat([x[b].view(C, H, W), error[b].view(C, H, W)])
        out.append(torch.stack([gamma[b] * fy[b] @ im @ fx[b].T for im in images]).reshape(-1))
    return torch.stack(out)


def by_hand(model, x, zs):
    """log p(x, z_1..z_T) and log q(z_1..z_T | x) for one set of codes (B, z_dim) per step,
    from the networks' weights, written out."""
    B, H = x.shape[0], model.config.hidden
    h, c = torch.zeros(B, H), torch.zeros(B, H)
    he, ce = torch.zeros(B, H), torch.zeros(B, H)
    canvas = model.canvas0.expand(B, -1)
    log_p = log_q = 0.0
    for z in zs:
        error = x - torch.sigmoid(canvas)
        he, ce = lstm_by_hand(model.encoder, torch.cat([read_by_hand(model, x, error, h), h], -1), he, ce)
        loc = he @ model.q_loc.weight.T + model.q_loc.bias
        scale = torch.nn.functional.softplus(he @ model.q_scale.weight.T + model.q_scale.bias) + 1e-6
        log_q = log_q + (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_p = log_p + (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        h, c = lstm_by_hand(model.decoder, z, h, c)
        canvas = canvas + write_by_hand(model, h)
    p = torch.sigmoid(canvas)
    return log_p + (x * p.log() + (1 - x) * (1 - p).log()).sum(-1), log_q


def tiny(attention, shape=(1, 6, 5), **extra):
    torch.manual_seed(3)
    model = build_model("draw", shape, {**TINY, "attention": attention, **extra})
    with torch.no_grad():
        model.canvas0.normal_()
    return model


def tiny_batch(shape=(1, 6, 5), n=4, seed=0):
    return torch.bernoulli(torch.full((n, math.prod(shape)), 0.4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["filterbank", "none"])
def test_the_log_joint_of_a_two_step_model_is_the_hand_computation(attention):
    model, x = tiny(attention), tiny_batch()
    zs = [torch.randn(4, 3), torch.randn(4, 3)]
    trace = poutine.trace(poutine.condition(model.model, data={"z_1": zs[0], "z_2": zs[1]})).get_trace(x)
    trace.compute_log_prob()
    joint = sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")
    guide = poutine.trace(poutine.condition(model.guide, data={"z_1": zs[0], "z_2": zs[1]})).get_trace(x)
    guide.compute_log_prob()
    q = sum(site["log_prob"] for site in guide.nodes.values() if site["type"] == "sample")
    hand_p, hand_q = by_hand(model, x, zs)
    torch.testing.assert_close(joint, hand_p, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(q, hand_q, rtol=1e-5, atol=1e-4)
    assert [name for name in trace.nodes if name.startswith("z")] == ["z_1", "z_2"]


@pytest.mark.parametrize("attention", ["filterbank", "none"])
def test_the_evaluator_is_the_explicit_logsumexp_of_the_hand_weights(attention):
    model, x = tiny(attention), tiny_batch(n=3)
    K, seed = 6, 5
    est = estimate_bounds(model.model, model.guide, x, K, seed=seed, batch_size=3, max_rows=100)
    # the evaluator's own keyed draws (one chunk: particles 0..K-1 of rows 0..2)
    with torch.no_grad():
        _, _, guide_trace = importance_traces(model.model, model.guide, x, K, keys=DrawKeys(seed, torch.arange(3), 0))
        zs = [guide_trace.nodes[f"z_{t}"]["value"] for t in (1, 2)]  # (K, B, z_dim) each
        lw = torch.stack([torch.sub(*by_hand(model, x, [z[k] for z in zs])) for k in range(K)])
    torch.testing.assert_close(est.log_px, (torch.logsumexp(lw.double(), 0) - math.log(K)).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(est.elbo, lw.mean(0), rtol=1e-5, atol=1e-4)


def test_the_model_recomputes_the_decoder_states_it_does_not_read_the_guides():
    """The guide returns the decoder states it went through; altering them in place (which
    would reach any copy the model kept or shared) leaves the model's log-density as it was."""
    model, x = tiny("filterbank"), tiny_batch()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    states = guide_trace.nodes["_RETURN"]["value"]

    def log_joint():
        trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
        return trace.log_prob_sum().item()

    before = log_joint()
    with torch.no_grad():
        for s in states:
            for v in s:
                v.add_(torch.randn_like(v) * 3)
    assert log_joint() == before
    # and the guide's cached canvas is not what the model scores x under
    trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    assert not torch.allclose(trace.nodes["x"]["fn"].log_prob(x),
                              model.likelihood.distribution(states[-1].canvas).log_prob(x))


def test_each_step_has_the_analytic_kl_with_meanfield():
    """TraceMeanField_ELBO finds the registered Normal-Normal KL at every z_t: its loss is
    then -(E log p(x | c_T) - sum_t KL_t) for the one draw, not the Monte Carlo estimate."""
    from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

    model, x = tiny("none"), tiny_batch()
    pyro.set_rng_seed(2)
    meanfield = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(model.model, model.guide, x)
    pyro.set_rng_seed(2)
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    kl = sum(torch.distributions.kl_divergence(guide_trace.nodes[f"z_{t}"]["fn"], model_trace.nodes[f"z_{t}"]["fn"])
             for t in (1, 2))
    expected = -(model_trace.nodes["x"]["fn"].log_prob(x) - kl).sum()
    torch.testing.assert_close(meanfield, expected)
    pyro.set_rng_seed(2)
    assert Trace_ELBO(max_plate_nesting=1).differentiable_loss(model.model, model.guide, x) != meanfield


@pytest.mark.parametrize("likelihood", ["gaussian", "discretized-logistic", "continuous-bernoulli"])
def test_colour_images_and_grey_level_likelihoods_give_finite_ordered_bounds(likelihood):
    shape = (3, 6, 6)
    model = tiny("filterbank", shape, likelihood=likelihood, logistic_mixtures=2)
    x = (torch.rand(5, math.prod(shape)) * 255).round() / 255
    est = estimate_bounds(model.model, model.guide, x, 8, seed=0)
    assert torch.isfinite(est.log_px).all() and (est.log_px >= est.elbo - 1e-4).all()
    assert model.sample(2).shape == (2, 108) and model.reconstruct(x[:2]).shape == (2, 108)
    # the read-outs concatenate the T per-step codes
    loc, scale = model.encode(x[:2])
    assert loc.shape == scale.shape == (2, 2 * 3) and model.posterior(x[:2]).event_shape == (6,)
    assert model.decode(loc).batch_shape == (2,)


@pytest.mark.parametrize("config,fragment", [
    ({"read_size": 7}, "read_size must be at most the image's smaller side, 6"),
    ({"write_size": 9}, "write_size must be at most"),
    ({"read_size": 0}, "read_size must be at least 1"),
    ({"write_size": 0}, "write_size must be at least 1"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"hidden": 0}, "hidden must be at least 1"),
    ({"attention": "spatial"}, "choose one of filterbank, none"),
    ({"encoder": "conv"}, "unknown DRAWConfig option"),
    ({"guide": "planar"}, "unknown DRAWConfig option"),
])
def test_impossible_settings_are_refused_naming_the_option(config, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_model("draw", (1, 6, 8), config)


def test_flat_vectors_are_refused_saying_what_draw_needs():
    with pytest.raises(ConfigError, match=r"draw needs images \(C, H, W\)"):
        build_model("draw", 20, {})


@pytest.fixture
def tiny_images(tmp_path):
    path = tmp_path / "tiny.npy"
    np.save(path, make_binary_images(120))  # (N, 8, 8)
    return path


def fast(epochs=2):
    return ["--steps", "2", "--hidden", "8", "--z-dim", "2", "--epochs", str(epochs), "--batch-size", "40",
            "--eval-size", "40", "--device", "cpu", "-q"]


@pytest.mark.parametrize("args,fragment", [
    (["--read-size", "9"], "--read-size must be at most the image's smaller side, 8"),
    (["--write-size", "0"], "--write-size must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--encoder", "conv"], "--encoder"),
    (["--guide", "planar"], "--guide"),
    (["--classes", "3"], "--classes"),
    (["--flat"], "draw needs images"),
])
def test_the_command_line_refuses_bad_input_in_one_line_writing_nothing(args, fragment, tiny_images, tmp_path):
    data = tiny_images
    if args == ["--flat"]:
        data, args = tmp_path / "flat.npy", []
        np.save(data, make_binary_images(50).reshape(50, -1)[:, :60])  # 60 values: no square image
    result = invoke("fit", "draw", "--dataset", data, *fast(), *args, "--run-dir", tmp_path / "run")
    assert_clean_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_fit_evaluate_and_figures_from_the_command_line_and_an_exact_resume(tiny_images, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    result = invoke("fit", "draw", "--dataset", tiny_images, *fast(), "--run-dir", full)
    assert result.exit_code == 0, result.output
    for name in ("canvas-samples.png", "canvas-reconstructions.png", "interpolation.png", "reconstructions.png"):
        assert (full / "figures" / name).exists(), name
    result = invoke("evaluate", full, "--iw", 10, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((full / "eval-valid-iw10.json").read_text())
    assert summary["log_px"]["mean"] >= summary["elbo"]["mean"]
    # one epoch, then resumed to two: the uninterrupted run's history and weights
    assert invoke("fit", "draw", "--dataset", tiny_images, *fast(1), "--run-dir", part).exit_code == 0
    result = invoke("fit", "draw", "--run-dir", part, "--resume", "--epochs", 2, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if "seconds" not in k}  # noqa: E731
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(part) == strip(full)
    a = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ais_moves_every_step_s_latent_and_at_one_distribution_is_the_evaluators_iwae():
    """AIS takes the T sites as one state; with one distribution it is importance sampling
    from the guide with the evaluator's keys, and longer runs stay finite."""
    from pyro_vae.ais import ais

    model, x = tiny("filterbank"), tiny_batch(n=3)
    est = ais(model.model, model.guide, x, 1, chains=12, seed=7)
    bounds = estimate_bounds(model.model, model.guide, x, 12, seed=7)
    torch.testing.assert_close(est.log_px, bounds.log_px.double(), atol=1e-5, rtol=0)
    longer = ais(model.model, model.guide, x, 4, chains=3, leapfrog=2, seed=7)
    assert torch.isfinite(longer.log_px).all() and (longer.acceptance > 0).all()
