"""Flow guides: the transforms' log-determinants and constraints, log q as the objectives
see it, the evaluator against exact answers, what a flow buys on a correlated posterior,
every family with every flow, the objectives they refuse, and the diagonal guide unchanged."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.nn import functional as F

from pyro_vae import MODELS, VAE, VAEConfig, build_model, estimate_bounds, make_objective
from pyro_vae.errors import ConfigError
from pyro_vae.guides import GUIDES, make_flow
from pyro_vae.nets import GaussianEncoder, make_decoder, make_encoder
from pyro_vae.objectives import OBJECTIVES, objective_spec

from helpers import FAMILY, NET_FAMILIES, SHAPE, assert_clean_error, invoke, toy_images, train_briefly

FLOWS = [g for g in GUIDES if g != "diagonal"]


def randomized(flow, seed=0, spread=0.5):
    """The flow with every parameter drawn at random: far from the identity it starts at."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * spread)
    return flow


@pytest.mark.parametrize("guide", FLOWS)
def test_log_det_equals_the_autograd_jacobian(guide):
    torch.manual_seed(0)
    flow = randomized(make_flow(guide, 4, 3, 2).double())
    h, x = torch.randn(5, 4, dtype=torch.double), torch.randn(5, 3, dtype=torch.double)
    for layer in flow.layers:
        t = layer.condition(h)
        y = t(x)
        log_det = t.log_abs_det_jacobian(x, y)
        assert log_det.shape == (5,)
        for i in range(5):
            one = layer.condition(h[i : i + 1])
            jac = torch.autograd.functional.jacobian(lambda v: one(v.unsqueeze(0)).squeeze(0), x[i])
            assert log_det[i].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-9)
        x = y.detach()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_planar_keeps_w_dot_u_hat_at_least_minus_one(scale):
    gen = torch.Generator().manual_seed(1)
    u, w = (torch.randn(1000, 5, generator=gen, dtype=torch.double) * scale for _ in range(2))
    u = torch.where(torch.arange(1000).unsqueeze(-1) % 2 == 0, u, -w * 3)  # w.u strongly negative
    u_hat = ConditionedPlanar(None).u_hat(u, w)
    # -1 exactly where w.u is very negative, up to the rounding of a dot product of size scale^2
    assert ((u_hat * w).sum(-1) >= -1 - 1e-12 * max(1.0, scale**2)).all()


@pytest.mark.parametrize("guide", ["planar", "radial", "sylvester"])
@pytest.mark.parametrize("raw", [-10.0, 10.0])
def test_extreme_raw_parameters_keep_each_transform_invertible(guide, raw):
    """All raw parameters (the amortizing layers' biases) at +-10, weights at 0: the
    constraints (planar w.u_hat >= -1, radial beta >= -alpha, Sylvester R~_ii R_ii >= -1)
    keep the Jacobian's determinant positive, so the log-determinant is finite, and equal
    to the autograd Jacobian's."""
    flow = make_flow(guide, 2, 3, 1).double()
    with torch.no_grad():
        for name, p in flow.named_parameters():
            p.fill_(raw if name.endswith("bias") else 0.0)
    gen = torch.Generator().manual_seed(2)
    h, x = torch.randn(50, 2, generator=gen, dtype=torch.double), torch.randn(50, 3, generator=gen, dtype=torch.double)
    t = flow.layers[0].condition(h)
    log_det = t.log_abs_det_jacobian(x, t(x))
    assert torch.isfinite(log_det).all()
    one = flow.layers[0].condition(h[:1])
    jac = torch.autograd.functional.jacobian(lambda v: one(v.unsqueeze(0)).squeeze(0), x[0])
    sign, value = torch.linalg.slogdet(jac)
    assert sign > 0 and value.item() == pytest.approx(log_det[0].item(), abs=1e-8)


def test_radial_and_sylvester_raw_parameters_map_into_their_constraints():
    raw = torch.tensor([-1e3, -30.0, 0.0, 30.0, 1e3], dtype=torch.double)
    alpha = F.softplus(raw)
    beta = -alpha + F.softplus(raw.flip(0))
    assert (beta >= -alpha).all()
    assert (torch.tanh(raw) * torch.tanh(raw.flip(0)) >= -1).all()


@pytest.mark.parametrize("guide", FLOWS)
def test_flows_start_at_or_near_the_identity(guide):
    torch.manual_seed(0)
    flow = make_flow(guide, 6, 4, 3)
    h, x = torch.randn(8, 6), torch.randn(8, 4)
    y = flow.push(x, h)
    if guide == "iaf":  # stable IAF: z' = s z + (1 - s) m with s = sigmoid(2 + ...)
        assert (y - x).abs().max() < 3
    else:  # planar's u_hat = 0 up to rounding
        assert torch.allclose(y, x, atol=1e-6)


@pytest.mark.parametrize("guide", FLOWS)
def test_guide_log_q_is_the_change_of_variables(guide):
    """The guide site's log-density (what every objective and the evaluator use) equals
    log N(z_0; mu, sigma) - sum_k log |det J_k(z_{k-1})| with each Jacobian from autograd,
    for the same base draw z_0."""
    torch.manual_seed(0)
    model = VAE(6, VAEConfig(z_dim=3, hidden=(5,), guide=guide, flow_length=3))
    randomized(model.flow, seed=3, spread=0.3)
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    pyro.set_rng_seed(7)
    site = poutine.trace(model.guide).get_trace(x).nodes["z"]
    log_q = site["fn"].log_prob(site["value"])
    loc, scale, h = model.encoder.with_features(x)
    pyro.set_rng_seed(7)
    z = dist.Normal(loc, scale).to_event(1).rsample()
    expected = dist.Normal(loc, scale).to_event(1).log_prob(z)
    for layer in model.flow.layers:
        for i in range(4):
            one = layer.condition(h[i : i + 1])
            jac = torch.autograd.functional.jacobian(lambda v: one(v.unsqueeze(0)).squeeze(0), z[i])
            expected[i] = expected[i] - torch.linalg.slogdet(jac)[1]
        z = layer.condition(h)(z)
    assert torch.allclose(site["value"], z, atol=1e-5)
    assert torch.allclose(log_q, expected, atol=1e-4), (log_q, expected)


def test_log_px_of_a_2d_model_with_a_flow_guide_matches_a_grid_integral():
    """A 2-D VAE with a planar guide, briefly fitted to five binary vectors; log p(x) by
    importance sampling against the sum of p(z) p(x | z) over a fine grid."""
    torch.manual_seed(0)
    model = VAE(8, VAEConfig(z_dim=2, hidden=(), guide="planar", flow_length=4))
    x = torch.bernoulli(torch.full((5, 8), 0.4), generator=torch.Generator().manual_seed(0))
    objective = make_objective("trace", 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        loss = objective.differentiable_loss(model.model, model.guide, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    edges = torch.linspace(-7, 7, 701)
    mids = (edges[1:] + edges[:-1]) / 2
    zy, zx = torch.meshgrid(mids, mids, indexing="ij")
    z = torch.stack([zx.reshape(-1), zy.reshape(-1)], 1)
    with torch.no_grad():
        log_joint = model.prior(len(z)).log_prob(z).unsqueeze(-1) + model.decode(z.unsqueeze(1)).log_prob(x)
        exact = torch.logsumexp(log_joint, 0) + 2 * math.log(edges[1] - edges[0])
        est = estimate_bounds(model.model, model.guide, x, 4000)
    assert (est.k_hat < 0.7).all(), est.k_hat
    z_scores = (est.log_px - exact) / est.log_px_se
    # the mean over the images within 3 s.e.; each image within 3.5 (a family-wise false
    # alarm below 0.3% over the five)
    mean_z = (est.log_px - exact).sum() / est.log_px_se.pow(2).sum().sqrt()
    assert abs(mean_z) < 3, mean_z
    assert (z_scores.abs() < 3.5).all(), (est.log_px, exact, z_scores)
    assert (est.elbo < exact).all()


class AmortizedGuide(torch.nn.Module):
    """A guide for the linear-Gaussian model: the base Gaussian linear in x, the flow
    conditioned on x itself."""

    def __init__(self, D, d, guide, length):
        super().__init__()
        self.loc, self.scale = torch.nn.Linear(D, d), torch.nn.Linear(D, d)
        self.flow = make_flow(guide, D, d, length)

    def __call__(self, x):
        base = dist.Normal(self.loc(x), F.softplus(self.scale(x)) + 1e-4).to_event(1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.flow.distribution(base, x))


@pytest.mark.parametrize("guide,length", [("iaf", 2), ("planar", 8), ("sylvester", 2)])
def test_a_flow_closes_most_of_the_diagonal_gap_on_a_correlated_posterior(guide, length):
    """Linear-Gaussian model whose posterior over z has correlation about -0.9: the best
    diagonal Gaussian stays 0.5 (sum log Lambda_ii - log det Lambda) nats below log p(x)
    (Lambda the posterior precision); briefly trained, a flow closes most of that gap,
    a diagonal guide trained the same way does not."""
    torch.manual_seed(0)
    D, d, s = 5, 2, 0.5
    a = torch.randn(D, generator=torch.Generator().manual_seed(4))
    W = torch.stack([a, a + 0.3 * torch.randn(D, generator=torch.Generator().manual_seed(5))], 1)
    precision = torch.eye(d) + W.T @ W / s**2
    best_diagonal_gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()
    assert best_diagonal_gap > 1.0

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, s).to_event(1), obs=x)

    marginal = dist.MultivariateNormal(torch.zeros(D), W @ W.T + s**2 * torch.eye(D))
    x = marginal.sample((64,))
    gaps = {}
    for name, n in (("diagonal", 1), (guide, length)):
        pyro.set_rng_seed(0)
        q = AmortizedGuide(D, d, name, n)
        optimizer = torch.optim.Adam(q.parameters(), lr=2e-2)
        elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
        for _ in range(300):
            loss = elbo.differentiable_loss(model, q, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            est = estimate_bounds(model, q, x, 500)
        gaps[name] = (marginal.log_prob(x) - est.elbo).mean().item()
    assert gaps["diagonal"] > 0.9 * best_diagonal_gap, gaps
    assert gaps[guide] < 0.3 * best_diagonal_gap, gaps


FAMILY_GUIDES = [(family, guide) for family in NET_FAMILIES for guide in FLOWS]  # text: diagonal only


@pytest.mark.parametrize("family,guide", FAMILY_GUIDES)
def test_every_family_with_a_continuous_z_trains_with_every_flow(family, guide):
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    x, y = toy_images(40, binary=True)
    config = {"z_dim": 3, "hidden": (24,), **FAMILY.get(family, {}), "guide": guide, "flow_length": 2}
    model = build_model(family, SHAPE, config)
    cls = MODELS[family]
    objective = make_objective(objective_spec(cls.default_objective).for_guide(guide), cls.default_particles)
    before, after = train_briefly(model, objective, x, y)
    assert after > before
    est = estimate_bounds(model.model, model.guide, x[:6], 20)
    assert torch.isfinite(est.log_px).all() and (est.log_px >= est.elbo - 1e-4).all()
    q = model.posterior(x[:3])
    assert q.batch_shape == (3,) and q.event_shape == (3,)
    assert model.reconstruct(x[:3]).shape == (3, x.shape[1])


def test_meanfield_with_a_flow_would_silently_be_trace():
    """Why meanfield refuses flows: Pyro's TraceMeanField_ELBO falls back to the Monte
    Carlo KL without a word, giving Trace_ELBO's number draw for draw."""
    model = VAE(6, VAEConfig(z_dim=2, hidden=(4,), guide="planar", flow_length=2))
    x = torch.bernoulli(torch.full((3, 6), 0.5))
    values = []
    for cls in (TraceMeanField_ELBO, Trace_ELBO):
        pyro.set_rng_seed(3)
        values.append(cls(max_plate_nesting=1).loss(model.model, model.guide, x))
    assert values[0] == pytest.approx(values[1], rel=1e-6)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_takes_a_flow_or_says_why_not_and_what_instead(name):
    spec = objective_spec(name)
    spec.check_guide("diagonal")
    if name in ("meanfield", "dreg", "rws", "wake-sleep"):
        with pytest.raises(ConfigError, match=f"objective='{name}' cannot train guide='planar'.*use objective=") as e:
            spec.check_guide("planar")
        assert e.value.cli_message().startswith(f"--objective {name} cannot train --guide planar")
        assert spec.for_guide("planar") == {"meanfield": "trace", "dreg": "iwae", "rws": "iwae",
                                            "wake-sleep": "trace"}[name]
    else:
        spec.check_guide("planar")
        assert spec.for_guide("planar") == name


def test_the_diagonal_guide_adds_no_parameter_and_no_random_draw():
    """guide=diagonal builds today's VAE: the same state_dict keys, and the RNG left where
    the encoder and decoder alone leave it (so every initial weight is as before)."""
    torch.manual_seed(0)
    model = VAE(784, VAEConfig())
    after_model = torch.get_rng_state()
    assert list(model.state_dict()) == [
        "encoder.body.0.weight", "encoder.body.0.bias", "encoder.body.2.weight", "encoder.body.2.bias",
        "encoder.loc.weight", "encoder.loc.bias", "encoder.scale.weight", "encoder.scale.bias",
        "decoder.net.0.weight", "decoder.net.0.bias", "decoder.net.2.weight", "decoder.net.2.bias",
        "decoder.net.4.weight", "decoder.net.4.bias"]
    torch.manual_seed(0)
    encoder = GaussianEncoder(make_encoder("mlp", (1, 28, 28), 784, (200, 200), "tanh"), 50)
    decoder = make_decoder("mlp", 50, (1, 28, 28), 784, 1, (200, 200), "tanh")
    assert torch.equal(after_model, torch.get_rng_state())
    for key, value in {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                       **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}.items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("args,fragments", [
    (["--flow-length", "0", "--guide", "planar"], ["--flow-length must be at least 1, got 0"]),
    (["--flow-length", "-3"], ["--flow-length must be at least 1, got -3"]),
    (["--guide", "nice"], ["--guide", "planar", "sylvester"]),
    (["--guide", "planar", "--objective", "meanfield"], ["no analytic KL", "--objective trace"]),
    (["--guide", "radial", "--objective", "dreg"], ["inverse", "--objective iwae"]),
])
def test_bad_flow_options_end_in_one_line_and_write_nothing(args, fragments, tiny_npy, tmp_path):
    result = invoke("fit", "vae", "--dataset", tiny_npy, *args, "--epochs", "1", "--device", "cpu",
                    "--run-dir", tmp_path / "run", "-q")
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_cli_fits_a_flow_on_trace_and_refuses_its_run_loaded_with_another_guide(tiny_npy, tmp_path):
    run = tmp_path / "run"
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--guide", "planar", "--flow-length", "3",
                    "--z-dim", "2", "--hidden", "16", "--epochs", "1", "--batch-size", "20", "--eval-size", "40",
                    "--device", "cpu", "--run-dir", run, "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["objective"] == "trace" and config["model_config"]["guide"] == "planar"
    assert (run / "figures" / "posteriors.png").stat().st_size > 0
    result = invoke("evaluate", run, "--iw", 10, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config["model_config"]["guide"] = "radial"
    (run / "config.json").write_text(json.dumps(config))
    assert_clean_error(invoke("evaluate", run, "--iw", 10, "--device", "cpu"), "does not match")
