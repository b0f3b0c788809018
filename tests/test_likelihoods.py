"""The likelihoods: each log-density against a direct computation, shapes, support checks."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.nn import functional as F

from pyro_vae.errors import ConfigError, DataError
from pyro_vae.likelihoods import (
    LIKELIHOODS,
    BernoulliImage,
    DiscretizedLogisticImage,
    LikelihoodConfig,
    cb_log_norm,
    cb_mean,
    make_likelihood,
)
from pyro_vae.nets import BernoulliImage as NetsBernoulliImage

NAMES = ("bernoulli", "continuous-bernoulli", "gaussian", "discretized-logistic")


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def example_data(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values in each likelihood's support."""
    if name == "bernoulli":
        return torch.bernoulli(torch.full(shape, 0.4), generator=gen)
    if name == "discretized-logistic":
        k = torch.randint(0, 256, shape, generator=gen)
        k.view(-1)[:2] = torch.tensor([0, 255])  # both edge bins
        return k / 255
    return torch.rand(shape, generator=gen)


def test_registry_and_config_errors():
    assert tuple(LIKELIHOODS) == NAMES
    with pytest.raises(ConfigError) as e:
        make_likelihood("poisson", 4, LikelihoodConfig())
    assert "poisson" in str(e.value) and all(n in str(e.value) for n in NAMES)
    with pytest.raises(ConfigError, match="gaussian_scale"):
        make_likelihood("gaussian", 4, LikelihoodConfig(gaussian_scale="channel"))
    with pytest.raises(ConfigError, match="logistic_mixtures"):
        make_likelihood("discretized-logistic", 4, LikelihoodConfig(logistic_mixtures=0))
    assert make_likelihood("discretized-logistic", 4, LikelihoodConfig(logistic_mixtures=3)).params_per_value == 9
    for name in ("bernoulli", "continuous-bernoulli", "gaussian"):
        assert make_likelihood(name, 4).params_per_value == 1


def test_bernoulli_is_the_old_decoder_bit_for_bit():
    assert NetsBernoulliImage is BernoulliImage
    lik = make_likelihood("bernoulli", 784, LikelihoodConfig())
    assert not list(lik.parameters()) and not list(lik.buffers()) and lik.discrete
    gen = torch.Generator().manual_seed(0)
    pixel_mean = torch.rand(784, generator=gen) ** 3
    pixel_mean[:5] = torch.tensor([0.0, 1.0, 1e-4, 1 - 1e-4, 0.5])
    p = pixel_mean.clamp(1e-3, 1 - 1e-3)  # the arithmetic of earlier versions, for identical weights
    assert torch.equal(lik.init_bias(pixel_mean), torch.log(p) - torch.log1p(-p))

    logits = 4 * torch.randn(3, 784, generator=gen)
    x = example_data("bernoulli", (3, 784), gen)
    ref = -F.binary_cross_entropy(torch.sigmoid(logits.double()), x.double(), reduction="none").sum(-1)
    assert torch.allclose(lik.distribution(logits).log_prob(x).double(), ref, rtol=1e-5)
    assert torch.equal(lik.mean(logits), torch.sigmoid(logits))


def cb_direct(lam: float, x: float) -> float:
    """The continuous Bernoulli density's log, written from the paper's formula."""
    c = 2.0 if lam == 0.5 else 2 * math.atanh(1 - 2 * lam) / (1 - 2 * lam)
    return x * math.log(lam) + (1 - x) * math.log1p(-lam) + math.log(c)


CB_LAMBDAS = (0.5, 0.5 + 1e-4, 0.5 - 1e-4, 1e-6, 1 - 1e-6, 0.02, 0.3, 0.8, 0.97)


def test_continuous_bernoulli_is_normalized_and_matches_the_formula():
    lik = make_likelihood("continuous-bernoulli", len(CB_LAMBDAS))
    assert not lik.discrete
    logits = torch.tensor([logit(p) for p in CB_LAMBDAS], dtype=torch.float64)
    d = lik.distribution(logits)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    # one pixel at a time: the event is all pixels, so score each against a grid along it
    for i, lam in enumerate(CB_LAMBDAS):
        one = lik.distribution(logits[i : i + 1])
        density = one.log_prob(grid[:, None]).exp()
        assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6), lam
        mean = torch.trapezoid(grid * density, grid).item()
        assert one.mean.item() == pytest.approx(mean, abs=1e-6), lam
        for x in (0.0, 0.13, 0.5, 1.0):
            assert one.log_prob(torch.tensor([x], dtype=torch.float64)).item() == pytest.approx(
                cb_direct(lam, x), abs=1e-8), (lam, x)
    # and the sum over pixels is torch's own continuous Bernoulli away from its cut region
    x = torch.rand(len(CB_LAMBDAS), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    moderate = slice(3, None)
    ref = torch.distributions.ContinuousBernoulli(logits=logits[moderate]).log_prob(x[moderate]).sum()
    ours = lik.distribution(logits[moderate]).log_prob(x[moderate])
    assert ours.shape == () and ours.item() == pytest.approx(ref.item(), abs=1e-6)
    assert d.log_prob(x).shape == () and d.event_shape == (len(CB_LAMBDAS),)


def test_continuous_bernoulli_is_accurate_in_float32_and_its_bias_hits_the_mean():
    eta = torch.linspace(-40, 40, 20001, dtype=torch.float64)
    assert (cb_log_norm(eta.float()).double() - cb_log_norm(eta)).abs().max() < 1e-6
    assert (cb_mean(eta.float()).double() - cb_mean(eta)).abs().max() < 1e-6
    lik = make_likelihood("continuous-bernoulli", 6)
    pixel_mean = torch.tensor([0.0, 0.005, 0.3, 0.5, 0.7, 1.0])
    bias = lik.init_bias(pixel_mean)
    assert bias.shape == (6,) and bias.dtype == torch.float32 and bias.abs().max() < 101
    assert torch.allclose(lik.mean(bias), pixel_mean.clamp(0.01, 0.99), atol=1e-5)


def test_continuous_bernoulli_draws_have_its_mean():
    torch.manual_seed(0)
    logits = torch.tensor([-200.0, -6.0, -1e-5, 0.3, 8.0, 90.0])
    draws = make_likelihood("continuous-bernoulli", 6).distribution(logits).sample((20000,))
    assert draws.shape == (20000, 6) and draws.min() >= 0 and draws.max() <= 1
    assert torch.allclose(draws.mean(0), cb_mean(logits), atol=0.01)


@pytest.mark.parametrize("scale", ["pixel", "image"])
def test_gaussian_is_the_closed_form(scale):
    lik = make_likelihood("gaussian", 5, LikelihoodConfig(gaussian_scale=scale))
    assert not lik.discrete
    assert lik.raw_scale.shape == ((5,) if scale == "pixel" else ())
    assert torch.allclose(lik.scale, torch.tensor(0.1))
    with torch.no_grad():
        lik.raw_scale.copy_(torch.linspace(-2, 1, 5) if scale == "pixel" else torch.tensor(-0.5))
    gen = torch.Generator().manual_seed(2)
    loc, x = torch.randn(4, 5, generator=gen), torch.rand(4, 5, generator=gen)
    sigma = (F.softplus(lik.raw_scale.detach().double()) + 1e-3).expand(5)
    ref = torch.zeros(4, dtype=torch.float64)
    for b in range(4):
        for d in range(5):
            z = (x[b, d].item() - loc[b, d].item()) / sigma[d].item()
            ref[b] += -0.5 * z * z - math.log(sigma[d].item()) - 0.5 * math.log(2 * math.pi)
    lp = lik.distribution(loc).log_prob(x)
    assert torch.allclose(lp.double(), ref, rtol=1e-5)
    (g,) = torch.autograd.grad(lp.sum(), lik.raw_scale)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    pixel_mean = torch.rand(5, generator=gen)
    assert torch.equal(lik.init_bias(pixel_mean), pixel_mean)
    assert torch.equal(lik.mean(torch.tensor([-0.5, 0.2, 1.5, 0.0, 1.0])), torch.tensor([0.0, 0.2, 1.0, 0.0, 1.0]))


def sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))


def dl_direct(logits, locs, log_scales, k: int) -> float:
    """P(x = k/255) for one pixel: the mixture of logistic CDF differences, in plain floats."""
    x = 2 * k / 255 - 1
    weights = [math.exp(w) for w in logits]
    total = 0.0
    for w, mu, log_s in zip(weights, locs, log_scales):
        s = math.exp(max(log_s, -7.0))
        a, b = (x - mu + 1 / 255) / s, (x - mu - 1 / 255) / s
        if k == 0:
            mass = sigmoid(a)
        elif k == 255:
            mass = sigmoid(-b)
        elif b > 0:  # in the right tail difference the complements, which keep their digits
            mass = sigmoid(-b) - sigmoid(-a)
        else:
            mass = sigmoid(a) - sigmoid(b)
        total += w / sum(weights) * mass
    return total


def test_discretized_logistic_sums_to_one_and_matches_the_cdf_differences():
    m, d = 3, 4
    lik = make_likelihood("discretized-logistic", d, LikelihoodConfig(logistic_mixtures=m))
    assert lik.discrete and lik.params_per_value == 3 * m
    gen = torch.Generator().manual_seed(3)
    params = torch.randn(2, 3 * m, d, generator=gen, dtype=torch.float64)
    params[:, m : 2 * m] *= 1.5  # some locations beyond [-1, 1]
    params[:, 2 * m :] = params[:, 2 * m :] * 2 - 3  # scales from tiny to wide
    params[0, 2 * m] = -9.0  # below the clamp
    values = torch.arange(256, dtype=torch.float64) / 255
    # all pixels of an image take the same value k: the joint log-mass is the sum of the
    # per-pixel ones, so score each pixel alone to get its 256 probabilities
    for b in range(2):
        for j in range(d):
            one = DiscretizedLogisticImage(*params[b, :, j : j + 1].chunk(3, dim=0))
            log_p = one.log_prob(values[:, None])
            assert log_p.shape == (256,) and torch.isfinite(log_p).all()
            assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
            lg, mu, ls = (params[b, i * m : (i + 1) * m, j].tolist() for i in range(3))
            direct = torch.tensor([dl_direct(lg, mu, ls, k) for k in range(256)], dtype=torch.float64)
            assert torch.allclose(log_p.exp(), direct, rtol=1e-8, atol=0)
    # the layout: params.view(..., 3M, D) split into logits, locations, log-scales
    flat = params.reshape(2, -1)
    x = (example_data("discretized-logistic", (2, d), gen) * 255).round().double() / 255
    joint = lik.distribution(flat).log_prob(x)
    for b in range(2):
        per_pixel = 0.0
        for j in range(d):
            lg, mu, ls = (params[b, i * m : (i + 1) * m, j].tolist() for i in range(3))
            per_pixel += math.log(dl_direct(lg, mu, ls, round(x[b, j].item() * 255)))
        assert joint[b].item() == pytest.approx(per_pixel, rel=1e-9)


def test_discretized_logistic_stays_finite_where_the_cdf_difference_underflows():
    # one narrow logistic far from the value: sigmoid(a) - sigmoid(b) is 0 in float32
    locs = torch.tensor([[0.9]])
    d = DiscretizedLogisticImage(torch.zeros(1, 1), locs, torch.full((1, 1), -7.0))
    x = torch.tensor([[100 / 255]])
    lp32 = d.log_prob(x)
    d64 = DiscretizedLogisticImage(torch.zeros(1, 1, dtype=torch.float64), locs.double(),
                                   torch.full((1, 1), -7.0, dtype=torch.float64))
    lp64 = d64.log_prob(x.double())
    assert torch.isfinite(lp32).all() and lp32.item() < -500
    assert lp32.item() == pytest.approx(lp64.item(), rel=1e-5)


def test_discretized_logistic_bias_mean_and_draws():
    m, d = 2, 3
    lik = make_likelihood("discretized-logistic", d, LikelihoodConfig(logistic_mixtures=m))
    pixel_mean = torch.tensor([0.0, 0.25, 1.0])
    bias = lik.init_bias(pixel_mean)
    blocks = bias.view(3 * m, d)
    assert torch.equal(blocks[:m], torch.zeros(m, d))
    assert torch.equal(blocks[m : 2 * m], (2 * pixel_mean - 1).expand(m, d))
    assert torch.allclose(blocks[2 * m :], torch.full((m, d), math.log(0.1)))
    assert torch.allclose(lik.mean(bias), pixel_mean)
    torch.manual_seed(0)
    draws = lik.distribution(bias).sample((20000,))
    assert draws.shape == (20000, d)
    assert torch.allclose(draws * 255, (draws * 255).round(), atol=1e-4) and draws.min() >= 0 and draws.max() <= 1
    values = torch.arange(256) / 255  # the draws' mean is the discretized one, edge bins included
    for j in range(d):
        masses = DiscretizedLogisticImage(*blocks[:, j : j + 1].chunk(3, dim=0)).log_prob(values[:, None]).exp()
        assert draws[:, j].mean().item() == pytest.approx((values * masses).sum().item(), abs=0.006)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_broadcasting_expand_and_plates(name):
    d = 6
    lik = make_likelihood(name, d, LikelihoodConfig(logistic_mixtures=2))
    p = lik.params_per_value
    gen = torch.Generator().manual_seed(4)
    params = torch.randn(5, 3, p * d, generator=gen)
    x = example_data(name, (3, d), gen)
    dist_ = lik.distribution(params)
    assert dist_.batch_shape == (5, 3) and dist_.event_shape == (d,)
    lp = dist_.log_prob(x)
    assert lp.shape == (5, 3)
    for s in range(5):
        assert torch.allclose(lik.distribution(params[s]).log_prob(x), lp[s])
    # value with more leading dims than the distribution (enumerated labels x batch)
    assert lik.distribution(params[0]).log_prob(x.expand(4, 3, d)).shape == (4, 3)
    expanded = lik.distribution(params[0, 0]).expand((2, 3))
    assert expanded.batch_shape == (2, 3) and expanded.event_shape == (d,)
    assert torch.allclose(expanded.log_prob(x), lik.distribution(params[0, 0]).log_prob(x).expand(2, 3))
    sample = expanded.sample()
    assert sample.shape == (2, 3, d)
    lik.check_support(sample, "the draws")
    assert lik.distribution(params).sample((2,)).shape == (2, 5, 3, d)
    mean = lik.mean(params)
    assert mean.shape == (5, 3, d) and mean.min() >= 0 and mean.max() <= 1
    assert lik.init_bias(torch.rand(d, generator=gen)).shape == (p * d,)

    def model(data):  # Pyro's plate expands an unbatched distribution to the batch
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", lik.distribution(params[0, 0]), obs=data)

    trace = pyro.poutine.trace(model).get_trace(x)
    trace.compute_log_prob()
    assert torch.allclose(trace.nodes["x"]["log_prob"], lik.distribution(params[0, 0]).log_prob(x).expand(3))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_at_extreme_params(name):
    d = 8
    lik = make_likelihood(name, d, LikelihoodConfig(logistic_mixtures=2))
    extremes = torch.tensor([-1e4, -100.0, -7.5, -1e-6, 0.0, 1e-6, 100.0, 1e4])
    params = extremes.repeat(lik.params_per_value * d // 8 + 1)[: lik.params_per_value * d]
    params = torch.stack([params, params.flip(0)]).requires_grad_()
    x = {"bernoulli": torch.tensor([0.0, 1.0]), "continuous-bernoulli": torch.tensor([0.0, 0.5, 1.0]),
         "gaussian": torch.tensor([0.0, 0.3, 1.0]), "discretized-logistic": torch.tensor([0.0, 1 / 255, 0.5, 1.0])}[name]
    x = x.repeat(d)[:d]
    lp = lik.distribution(params).log_prob(x)
    (g,) = torch.autograd.grad(lp.sum(), params)
    assert torch.isfinite(lp).all()
    assert torch.isfinite(g).all()


def test_check_support_accepts_and_rejects_the_right_data():
    gen = torch.Generator().manual_seed(5)
    binary = torch.bernoulli(torch.full((10, 6), 0.5), generator=gen)
    eight_bit = torch.randint(0, 256, (10, 6), generator=gen) / 255
    grey = torch.rand(10, 6, generator=gen)
    outside = grey * 3 - 1
    nan = grey.clone()
    nan[0, 0] = float("nan")
    accepted = {
        "bernoulli": (binary,),
        "continuous-bernoulli": (binary, eight_bit, grey),
        "gaussian": (binary, eight_bit, grey, outside),
        "discretized-logistic": (binary, eight_bit),
    }
    for name, ok in accepted.items():
        lik = make_likelihood(name, 6)
        for x in ok:
            lik.check_support(x, "the data")
        for x in (binary, eight_bit, grey, outside, nan):
            if any(x is y for y in ok):
                continue
            with pytest.raises(DataError) as e:
                lik.check_support(x, "the training split of toy")
            message = str(e.value)
            assert "\n" not in message and message.startswith("the training split of toy"), message
            assert name in message or "binarize=" in message, message
    lik = make_likelihood("bernoulli", 6)
    with pytest.raises(DataError, match="not binary.*binarize='dynamic' or binarize='threshold'.*"
                                        "likelihood='continuous-bernoulli'") as refused:
        lik.check_support(grey, "x")
    assert "--binarize dynamic or --binarize threshold" in refused.value.cli_message()
    assert "--likelihood continuous-bernoulli" in refused.value.cli_message()
    with pytest.raises(DataError, match=r"not multiples of 1/255.*likelihood='gaussian' or "
                                        r"likelihood='continuous-bernoulli'") as refused:
        make_likelihood("discretized-logistic", 6).check_support(grey, "x")
    assert "--likelihood gaussian or --likelihood continuous-bernoulli" in refused.value.cli_message()
    with pytest.raises(DataError, match=r"values in \[-1, 2\], outside \[0, 1\].*likelihood='gaussian'"):
        make_likelihood("discretized-logistic", 6).check_support(torch.tensor([-1.0, 2.0]), "x")
    with pytest.raises(DataError, match="outside"):
        make_likelihood("continuous-bernoulli", 6).check_support(outside, "x")
    # float32 k/255 is close enough to the grid, and empty data is fine
    make_likelihood("discretized-logistic", 6).check_support(torch.arange(256, dtype=torch.float32) / 255, "x")
    make_likelihood("bernoulli", 6).check_support(torch.zeros(0, 6), "x")


def test_pyro_bernoulli_equivalence_still_holds():
    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(6))
    x = torch.bernoulli(torch.full((2, 7), 0.5))
    ref = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    assert torch.allclose(make_likelihood("bernoulli", 7).distribution(logits).log_prob(x), ref)
