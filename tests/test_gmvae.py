"""The GMVAE: enumerated component against explicit sums, the one-component case against
the VAE, the evaluator and the IWAE objective against direct mixture computations, and the
component posterior against numerical integration."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO

from pyro_vae.keyed import DrawKeys, keyed_normal
from pyro_vae import GMVAE, GMVAEConfig, VAE, VAEConfig, estimate_bounds, make_objective
from pyro_vae.metrics import cluster_accuracy

X_DIM = 12


@pytest.fixture
def gmvae():
    torch.manual_seed(3)
    model = GMVAE(X_DIM, GMVAEConfig(z_dim=3, hidden=(8,), components=4, learn_weights=True, init_spread=1.5))
    with torch.no_grad():  # unequal weights and scales, so that every term matters
        model.mixture.logits.copy_(torch.randn(4))
        model.mixture.raw_scale.add_(0.5 * torch.randn(4, 3))
    x = torch.bernoulli(torch.full((6, X_DIM), 0.4))
    return model, x


def explicit_log_weights(model, x, z):
    """log p(x | z) + logsumexp_y [log pi_y + log N(z; mu_y, sigma_y)] - log q(z | x), by hand."""
    loc, scale = model.encoder(x)
    mix = model.mixture
    log_pz_y = (-0.5 * ((z.unsqueeze(-2) - mix.loc) / mix.scale) ** 2 - mix.scale.log()
                - 0.5 * math.log(2 * math.pi)).sum(-1)  # (..., B, C)
    log_pz = torch.logsumexp(torch.log_softmax(mix.logits, -1) + log_pz_y, -1)
    log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    logits = model.decoder(z)
    log_lik = (x * torch.nn.functional.logsigmoid(logits) + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    return log_lik, log_pz, log_q


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_enumerated_elbo_equals_an_explicit_logsumexp_over_components(gmvae, kl_weight):
    model, x = gmvae
    pyro.set_rng_seed(11)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x, kl_weight=kl_weight)
    pyro.set_rng_seed(11)  # the guide runs first: the same draws of z
    z = poutine.trace(model.guide).get_trace(x).nodes["z"]["value"]
    log_lik, log_pz, log_q = explicit_log_weights(model, x, z)
    expected = -(log_lik + kl_weight * (log_pz - log_q)).sum().item()
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_one_unit_normal_component_gives_the_vae_bound():
    torch.manual_seed(0)
    vae = VAE(X_DIM, VAEConfig(z_dim=3, hidden=(8,)))
    gm = GMVAE(X_DIM, GMVAEConfig(z_dim=3, hidden=(8,), components=1, init_spread=0.0))
    gm.load_state_dict(vae.state_dict(), strict=False)
    with torch.no_grad():  # scale exactly 1 despite the 1e-4 floor
        gm.mixture.raw_scale.fill_(math.log(math.expm1(1 - 1e-4)))
    assert torch.allclose(gm.mixture.scale, torch.ones(1, 3)) and (gm.mixture.loc == 0).all()
    x = torch.bernoulli(torch.full((5, X_DIM), 0.3))
    pyro.set_rng_seed(4)
    vae_loss = Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    gm_loss = TraceEnum_ELBO(max_plate_nesting=1).loss(gm.model, gm.guide, x)
    assert gm_loss == pytest.approx(vae_loss, rel=1e-5)
    pyro.set_rng_seed(5)
    a = estimate_bounds(vae.model, vae.guide, x, 64, max_rows=10_000)
    pyro.set_rng_seed(5)
    b = estimate_bounds(gm.model, gm.guide, x, 64, max_rows=10_000)
    assert torch.allclose(a.log_px, b.log_px, atol=1e-5) and torch.allclose(a.elbo, b.elbo, atol=1e-5)


def test_evaluator_log_px_equals_a_direct_mixture_logsumexp(gmvae):
    model, x = gmvae
    K = 300
    est = estimate_bounds(model.model, model.guide, x, K, batch_size=len(x), max_rows=K * len(x), seed=7)
    # the same draws: z = loc + scale * eps with the keyed eps of shape (K, B, z_dim)
    loc, scale = model.encoder(x)
    eps = keyed_normal(DrawKeys(7, torch.arange(len(x))), "z", torch.Size((K, *loc.shape)), 0, 1,
                       loc.dtype, loc.device)
    z = loc + scale * eps
    with torch.no_grad():
        log_lik, log_pz, log_q = explicit_log_weights(model, x, z)
    log_w = log_lik + log_pz - log_q
    assert torch.allclose(est.log_px, torch.logsumexp(log_w, 0) - math.log(K), atol=1e-4)
    assert torch.allclose(est.elbo, log_w.mean(0), atol=1e-4)
    assert torch.allclose(est.log_lik, log_lik.mean(0), atol=1e-4)


def test_iwae_objective_is_the_same_bound_for_the_enumerated_and_the_marginal_prior(gmvae):
    model, x = gmvae
    iwae = make_objective("iwae", 10)
    pyro.set_rng_seed(2)
    enumerated = iwae.loss(model.model, model.guide, x)
    pyro.set_rng_seed(2)
    marginal = iwae.loss(model.marginal_model, model.guide, x)
    assert enumerated == pytest.approx(marginal, rel=1e-5)
    # and the TraceEnum ELBO equals the Monte Carlo ELBO of the marginal form, draw for draw
    pyro.set_rng_seed(3)
    a = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x)
    pyro.set_rng_seed(3)
    b = Trace_ELBO(max_plate_nesting=1).loss(model.marginal_model, model.guide, x)
    assert a == pytest.approx(b, rel=1e-5)


def test_iwae_objective_matches_pyro_renyi_alpha_zero_on_the_marginal_form(gmvae):
    """Our per-datapoint logsumexp against RenyiELBO(alpha=0) (pyro#3104), same draws."""
    model, x = gmvae
    pyro.set_rng_seed(9)
    ours = make_objective("iwae", 7).loss(model.marginal_model, model.guide, x)
    pyro.set_rng_seed(9)
    renyi = RenyiELBO(alpha=0, num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    theirs = renyi.loss(model.marginal_model, model.guide, x)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_iwae_objective_gradient_reaches_every_parameter(gmvae):
    model, x = gmvae
    loss = make_objective("iwae", 5).differentiable_loss(model.model, model.guide, x)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_component_posterior_matches_numerical_integration():
    """z of one dimension: p(y | x) proportional to pi_y * integral N(z; mu_y, s_y) p(x | z) dz on a fine grid."""
    torch.manual_seed(1)
    model = GMVAE(X_DIM, GMVAEConfig(z_dim=1, hidden=(8,), components=3, learn_weights=True, init_spread=2.0))
    with torch.no_grad():
        model.mixture.logits.copy_(torch.tensor([0.5, -0.3, 0.0]))
        model.decoder.net[-1].weight.mul_(4.0)  # a decoder that depends strongly on z
    x = torch.bernoulli(torch.full((4, X_DIM), 0.5))
    grid = torch.linspace(-12, 12, 24001).unsqueeze(-1)  # (G, 1)
    with torch.no_grad():
        logits = model.decoder(grid)
        log_lik = dist.Bernoulli(logits=logits.unsqueeze(1)).log_prob(x).sum(-1)  # (G, B)
        log_joint = model.mixture.log_joint(grid)  # (G, C)
        scores = torch.logsumexp(log_lik.unsqueeze(-1) + log_joint.unsqueeze(1), 0)  # (B, C)
    exact = torch.softmax(scores, -1)
    # 20 independent estimates: their spread gives the Monte Carlo standard error
    pyro.set_rng_seed(0)
    draws = torch.stack([model.component_posterior(x, num_samples=2000) for _ in range(20)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(20)
    assert torch.allclose(draws.sum(-1), torch.ones(20, 4), atol=1e-5)
    assert ((mean - exact).abs() < 4 * se + 1e-3).all(), (mean, exact, se)


def test_cluster_accuracy_maps_each_cluster_to_its_majority_label():
    assignment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    labels = torch.tensor([3, 3, 5, 4, 4, 3, 1, 3])
    assert cluster_accuracy(assignment, labels) == pytest.approx(6 / 8)
    assert cluster_accuracy(torch.zeros(4, dtype=torch.long), torch.tensor([1, 1, 2, 1])) == 0.75


def test_samples_and_assignments_have_the_right_shapes(gmvae):
    model, x = gmvae
    assert model.sample(7).shape == (7, X_DIM)
    assert model.sample_components(torch.tensor([0, 2]), 5).shape == (10, X_DIM)
    posterior = model.component_posterior(x, num_samples=10)
    assert posterior.shape == (6, 4) and torch.allclose(posterior.sum(-1), torch.ones(6))
    assert model.assign(x, batch_size=4).shape == (6,)


@pytest.mark.parametrize("config,match,flag", [({"components": 0}, "^components must be at least 1", "--components"),
                                               ({"init_spread": -1.0}, "^init_spread must be non-negative",
                                                "--init-spread")])
def test_bad_mixture_configs_are_refused(config, match, flag):
    from pyro_vae.errors import ConfigError
    with pytest.raises(ConfigError, match=match) as refused:
        GMVAE(X_DIM, GMVAEConfig(**config))
    assert refused.value.cli_message().startswith(flag)


def test_component_normal_is_the_gathered_diagonal_normal():
    from pyro_vae.models.gmvae import ComponentNormal

    torch.manual_seed(0)
    C, D = 7, 3
    loc = (2 * torch.randn(C, D)).requires_grad_()
    scale = (0.1 + torch.rand(C, D)).requires_grad_()
    cases = [
        (torch.arange(C).view(C, 1, 1), torch.randn(4, 5, D), None),  # enumerated: (C, 1, 1) against (K, B, D)
        (torch.arange(C).view(C, 1), torch.randn(5, D), (C, 5)),  # as the data plate expands it in training
        (torch.randint(C, (5,)), torch.randn(5, D), None),  # sampled: one component per image
    ]
    for y, z, shape in cases:
        z.requires_grad_()
        ours, ref = ComponentNormal(loc, scale, y), dist.Normal(loc[y], scale[y]).to_event(1)
        if shape:
            ours, ref = ours.expand(shape), ref.expand(shape)
        ours, ref = ours.log_prob(z), ref.log_prob(z)
        assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-4)
        grads = torch.autograd.grad(ours.sum(), (loc, scale, z))
        ref_grads = torch.autograd.grad(ref.sum(), (loc, scale, z))
        assert all(torch.allclose(a, b, atol=1e-3, rtol=1e-4) for a, b in zip(grads, ref_grads))
    # far from the origin with small scales (|m/s| = 500), where an expanded square in float32 cancels
    loc_far, scale_far = torch.full((1, 10), 5.0), torch.full((1, 10), 0.01)
    z_far = loc_far + 0.01 * torch.randn(6, 10)
    exact = dist.Normal(loc_far.double(), scale_far.double()).log_prob(z_far.double()).sum(-1)
    ours = ComponentNormal(loc_far, scale_far, torch.zeros(6, dtype=torch.long)).log_prob(z_far)
    assert torch.allclose(ours.double(), exact, atol=1e-4)
    assert ComponentNormal(loc, scale, torch.arange(C).view(C, 1)).expand((C, 5)).sample().shape == (C, 5, D)
