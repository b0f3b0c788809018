"""The networks: the output distribution and the convolutional encoder and decoder."""

import pyro.distributions as dist
import pytest
import torch
from torch.nn import functional as F

from pyro_vae.errors import ConfigError
from pyro_vae.nets import BernoulliImage, ConvDecoder, ConvEncoder, MLPEncoder, cat_last


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


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (1, 5, 7), (3, 64, 64)])
def test_conv_nets_keep_leading_dims(shape):
    torch.manual_seed(0)
    d = shape[0] * shape[1] * shape[2]
    enc = ConvEncoder(shape, d, (16, 24), "relu", cond_dim=10)
    dec = ConvDecoder(6, shape, d, 2, (12,), "elu")
    x = torch.rand(2, 3, 4, d)
    y = torch.eye(10)[torch.arange(3)].reshape(1, 3, 1, 10)  # broadcast over particles and batch
    assert enc.out_dim == 24 and enc(x, y.expand(2, 3, 4, 10)).shape == (2, 3, 4, 24)
    assert enc(x[0, 0], y[0, 0].expand(4, 10)).shape == (4, 24)
    assert enc(x[:, :1].expand(2, 3, 4, d), y).shape == (2, 3, 4, 24)
    assert dec(torch.randn(2, 3, 4, 6)).shape == (2, 3, 4, 2 * d)
    assert dec(torch.randn(5, 1, 4, 6)).shape == (5, 1, 4, 2 * d)


def test_conv_nets_give_each_item_its_own_output():
    """Flattening and restoring the leading dims keeps every item in its place."""
    torch.manual_seed(0)
    enc = ConvEncoder((1, 8, 8), 64, (16,), "tanh", cond_dim=3)
    dec = ConvDecoder(16, (1, 8, 8), 64, 2, (16,), "tanh")
    x, c = torch.rand(2, 5, 64), torch.rand(2, 5, 3)
    h = enc(x, c)
    assert torch.allclose(h[1, 2], enc(x[1, 2:3], c[1, 2:3])[0], atol=1e-6)
    assert torch.allclose(dec(h)[1, 2], dec(h[1, 2:3])[0], atol=1e-6)


def test_conv_decoder_output_is_parameter_major():
    torch.manual_seed(0)
    shape, p = (3, 5, 7), 2
    d = 3 * 5 * 7
    dec = ConvDecoder(4, shape, d, p, (8,), "relu")
    with torch.no_grad():
        dec.out.weight.zero_()
    bias = torch.cat([torch.full((d,), 1.0), torch.full((d,), -2.0)])
    dec.init_output_bias(bias)
    out = dec(torch.randn(6, 4))
    assert torch.equal(out, bias.expand(6, -1))
    assert (out.view(6, p, d)[:, 0] == 1).all() and (out.view(6, p, d)[:, 1] == -2).all()
    # Channel p*C + c of the last convolution is parameter p of image channel c.
    with torch.no_grad():
        dec.out.weight[:, 1 * 3 + 2] = 1.0  # parameter 1, colour channel 2
    changed = (dec(torch.randn(6, 4)).view(6, p, 3, 5, 7) != bias.view(p, 3, 5, 7)).any(0)
    assert changed[1, 2].any() and not changed[0].any() and not changed[1, :2].any()


def test_conv_nets_refuse_shapes_they_cannot_take():
    with pytest.raises(ConfigError, match="encoder='mlp'"):
        ConvEncoder(None, 784, (200,), "relu")
    with pytest.raises(ConfigError, match="at least 4"):
        ConvEncoder((1, 3, 8), 24, (200,), "relu")
    with pytest.raises(ConfigError, match="at least 4"):
        ConvDecoder(5, (1, 8, 2), 16, 1, (200,), "relu")
    with pytest.raises(ConfigError, match="decoder='mlp'"):
        ConvDecoder(5, None, 16, 1, (200,), "relu")
    with pytest.raises(ConfigError, match="784 values"):
        ConvDecoder(5, (1, 28, 28), 783, 1, (200,), "relu")
    with pytest.raises(ConfigError, match="hidden width") as refused:
        ConvEncoder((1, 28, 28), 784, (), "relu")
    assert "one --hidden width" in refused.value.cli_message()


def test_conv_gradients_reach_every_parameter():
    torch.manual_seed(0)
    enc = ConvEncoder((3, 9, 6), 162, (8,), "softplus", cond_dim=2)
    dec = ConvDecoder(8, (3, 9, 6), 162, 3, (8,), "gelu")
    dec(enc(torch.rand(4, 162), torch.rand(4, 2))).square().sum().backward()
    for net in (enc, dec):
        for name, param in net.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert enc.device == dec.device == torch.device("cpu")


@pytest.fixture
def one_thread():
    """Tiny tensors train faster on one thread, and far faster when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_conv_autoencoder_fits_toy_images(one_thread):
    """A tiny conv autoencoder learns 16 images of 8x8 bars (one row or one column on): its
    reconstruction loss ends far below 0.377 nats per pixel, the loss of the mean image,
    so the code tells the images apart."""
    torch.manual_seed(0)
    bars = torch.zeros(16, 1, 8, 8)
    for i in range(8):
        bars[i, 0, i, :] = 1
        bars[8 + i, 0, :, i] = 1
    x = bars.reshape(16, 64)
    enc = ConvEncoder((1, 8, 8), 64, (32,), "relu")
    dec = ConvDecoder(32, (1, 8, 8), 64, 1, (32,), "relu")
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)

    def loss() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(dec(enc(x)), x)

    for _ in range(150):
        opt.zero_grad()
        step = loss()
        step.backward()
        opt.step()
    assert loss().item() < 0.1


def test_a_conditioned_mlp_encoder_is_its_layers_on_the_concatenation():
    """The first layer's x part is computed once for all enumerated labels: the same
    function as the plain stack on [x, cond], broadcast over the labels' dimension."""
    torch.manual_seed(0)
    body = MLPEncoder(None, 6, (5, 4), "elu", cond_dim=3)
    x, cond = torch.randn(7, 6), torch.eye(3).unsqueeze(1)  # three labels, each for every row
    out = body(x, cond)
    plain = torch.nn.Sequential(*body)(cat_last(x, cond))
    assert out.shape == (3, 7, 4) and torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(body(x, cond[0].expand(7, 3)), plain[0], atol=1e-6)
