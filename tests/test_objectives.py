"""The importance-weighted objectives against Pyro's RenyiELBO and the power-mean order."""

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from pyro_vae import VAE, VAEConfig, make_objective
from pyro_vae.errors import ConfigError


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return VAE(12, VAEConfig(z_dim=3, hidden=(8,))), torch.bernoulli(torch.full((6, 12), 0.4))


@pytest.mark.parametrize("name,alpha", [("iwae", 0.0), ("renyi", 0.5), ("renyi", 0.9)])
def test_renyi_objectives_equal_pyro_renyi_elbo_draw_for_draw(vae, name, alpha):
    """pyro#3104: RenyiELBO's particle weights are per datapoint when every site is in the data plate."""
    model, x = vae
    pyro.set_rng_seed(4)
    ours = make_objective(name, 8, alpha).loss(model.model, model.guide, x)
    pyro.set_rng_seed(4)
    theirs = RenyiELBO(alpha=alpha, num_particles=8, vectorize_particles=True, max_plate_nesting=1).loss(
        model.model, model.guide, x)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_for_the_same_draws_iwae_renyi_and_elbo_are_ordered(vae):
    """The power mean of the weights grows with its order 1 - alpha: L_0 >= L_0.5 >= ELBO."""
    model, x = vae
    values = []
    for name, alpha in [("iwae", 0.0), ("renyi", 0.5)]:
        pyro.set_rng_seed(1)
        values.append(-make_objective(name, 16, alpha).loss(model.model, model.guide, x))
    pyro.set_rng_seed(1)
    elbo = -Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1).loss(model.model, model.guide, x)
    assert values[0] > values[1] > elbo


def test_renyi_alpha_must_lie_below_one():
    with pytest.raises(ConfigError, match="--alpha"):
        make_objective("renyi", 4, 1.0)
