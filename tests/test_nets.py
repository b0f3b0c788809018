"""The networks' output distribution."""

import pyro.distributions as dist
import torch

from pyro_vae.nets import BernoulliImage


def test_bernoulli_image_is_independent_bernoulli_pixels():
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 4, 784)).requires_grad_()
    for x in (torch.bernoulli(torch.full((4, 784), 0.3)), torch.bernoulli(torch.full((5, 4, 784), 0.6))):
        ours, ref = BernoulliImage(logits), dist.Bernoulli(logits=logits).to_event(1)
        assert ours.batch_shape == ref.batch_shape == (5, 4) and ours.event_shape == (784,)
        lp, lp_ref = ours.log_prob(x), ref.log_prob(x)
        assert lp.shape == (5, 4) and torch.allclose(lp, lp_ref, rtol=1e-5)
        (g,) = torch.autograd.grad(lp.sum(), logits)
        (g_ref,) = torch.autograd.grad(lp_ref.sum(), logits)
        assert torch.allclose(g, g_ref, atol=1e-6)
    expanded = BernoulliImage(logits[0]).expand((3, 4))
    assert expanded.batch_shape == (3, 4) and expanded.sample().shape == (3, 4, 784)
    assert torch.allclose(BernoulliImage(logits).mean, torch.sigmoid(logits))
