"""The GAN family: its game's losses and gradients, training through the library's loop,
its figures, scoring under a Gaussian observation model, and what it refuses."""

import json
import math

import numpy as np
import pytest
import torch

from pyro_vae import MODELS, build_model, estimate_bounds, fit, load_run, make_objective, resume, TrainConfig
from pyro_vae.ais import ais
from pyro_vae.errors import ConfigError

from helpers import SHAPE, assert_clean_error, invoke, toy_images

SMALL = {"z_dim": 2, "hidden": (32,)}


@pytest.fixture
def toy_npz(tmp_path):
    x, y = toy_images(240, seed=3)
    path = tmp_path / "toy.npz"
    np.savez(path, train=x[:200].view(-1, 8, 8).numpy(), train_labels=y[:200].numpy(),
             test=x[200:].view(-1, 8, 8).numpy(), test_labels=y[200:].numpy())
    return path


def _losses(gan, objective, x, seed=5):
    """Both players' losses at the current weights, on ``x`` and fixed draws of z."""
    torch.manual_seed(seed)
    with torch.no_grad():
        fake = gan._fake(x.shape[0])
        return (objective.discriminator_loss(gan._logits(x), gan._logits(fake)).item(),
                objective.generator_loss(gan._logits(fake)).item())


def test_the_game_s_losses_are_the_cross_entropies_of_goodfellow_et_al():
    real, fake = torch.randn(7), torch.randn(7)
    d, f = torch.sigmoid(real), torch.sigmoid(fake)
    game, minimax = make_objective("gan"), make_objective("gan-minimax")
    torch.testing.assert_close(game.discriminator_loss(real, fake), -(d.log() + (1 - f).log()).sum())
    torch.testing.assert_close(game.generator_loss(fake), -f.log().sum())
    torch.testing.assert_close(minimax.generator_loss(fake), (1 - f).log().sum())


@pytest.mark.parametrize("objective", ["gan", "gan-minimax"])
def test_one_loss_gives_each_player_the_gradient_of_its_own_loss(objective):
    torch.manual_seed(0)
    gan = build_model("gan", SHAPE, SMALL)
    game = make_objective(objective)
    x, _ = toy_images(16)
    d_params, g_params = list(gan.discriminator.parameters()), list(gan.decoder.parameters())
    assert len(d_params) + len(g_params) == len(list(gan.parameters()))
    torch.manual_seed(1)
    grads = torch.autograd.grad(gan.training_loss(game, (x,), 1.0), d_params + g_params)
    torch.manual_seed(1)  # the same draws of z
    fake = gan._fake(16)
    d_loss = game.discriminator_loss(gan._logits(x), gan._logits(fake.detach()))
    g_loss = game.generator_loss(gan._logits(fake))
    want = torch.autograd.grad(d_loss, d_params) + torch.autograd.grad(g_loss, g_params)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected)


def test_a_few_simultaneous_steps_move_each_player_s_loss_down():
    """Against the other player as it was: D's steps lower D's loss, G's steps lower G's."""
    torch.manual_seed(0)
    gan = build_model("gan", SHAPE, SMALL)
    game = make_objective("gan")
    x, _ = toy_images(64, seed=1)
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    d0, g0 = _losses(gan, game, x)
    optimizer = torch.optim.Adam(gan.parameters(), lr=2e-3, betas=gan.adam_betas)
    for step in range(10):
        torch.manual_seed(100 + step)
        optimizer.zero_grad()
        gan.training_loss(game, (x,), 1.0).backward()
        optimizer.step()
    after = {k: v.clone() for k, v in gan.state_dict().items()}
    gan.load_state_dict({k: after[k] if k.startswith("discriminator") else before[k] for k in before})
    d1, _ = _losses(gan, game, x)
    gan.load_state_dict({k: before[k] if k.startswith("discriminator") else after[k] for k in before})
    _, g1 = _losses(gan, game, x)
    assert d1 < d0 - 0.05 and g1 < g0 - 0.05, (d0, d1, g0, g1)


def test_the_minimax_generator_loss_stalls_while_d_rejects_its_images():
    torch.manual_seed(0)
    gan = build_model("gan", SHAPE, SMALL)
    with torch.no_grad():
        gan.discriminator[-1].bias.fill_(-8.0)  # D(G(z)) about 3e-4: D is sure G's images are fake
    x, _ = toy_images(16)
    norms = {}
    for name in ("gan", "gan-minimax"):
        torch.manual_seed(1)
        loss = gan.training_loss(make_objective(name), (x,), 1.0)
        grads = torch.autograd.grad(loss, list(gan.decoder.parameters()))
        norms[name] = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
    assert norms["gan-minimax"] < 1e-2 * norms["gan"], norms


def test_fit_gan_through_the_cli_draws_its_figures_and_resumes_exactly(toy_npz, tmp_path):
    common = ["--z-dim", 2, "--hidden", 32, "--batch-size", 20, "--eval-size", 60, "--device", "cpu", "-q",
              "--dataset", toy_npz, "--lr", 2e-4, "--eval-every", 2]
    result = invoke("fit", "gan", *common, "--epochs", 4, "--run-dir", tmp_path / "whole")
    assert result.exit_code == 0, result.output
    assert "valid GAN value V(D, G)" in result.output and "--observation gaussian --sigma S" in result.output
    figures = {p.name for p in (tmp_path / "whole" / "figures").iterdir()}
    assert {"samples-epoch0000.png", "samples-epoch0002.png", "samples-epoch0004.png", "curves.png",
            "interpolation.png"} <= figures and "reconstructions.png" not in figures
    history = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert {"valid_d_loss", "valid_g_loss", "valid_d_real", "valid_d_fake"} <= set(history[-1])
    scored = [row for row in history if "valid_bound" in row]  # --eval-every 2: epochs 2 and 4
    assert [row["epoch"] for row in scored] == [2, 4]
    assert all(row["valid_bound"] == pytest.approx(-row["valid_d_loss"]) for row in scored)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["train"]["objective"] == "gan" and config["train"]["binarize"] == "none"
    # two epochs, then two more from the checkpoint: the same weights as four at once
    assert invoke("fit", "gan", *common, "--epochs", 2, "--run-dir", tmp_path / "split").exit_code == 0
    resume(tmp_path / "split", epochs=4, device="cpu")
    whole, split = load_run(tmp_path / "whole").model.state_dict(), load_run(tmp_path / "split").model.state_dict()
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_the_optimizer_is_adam_with_beta1_one_half(toy_npz, tmp_path):
    run = fit("gan", SMALL, TrainConfig(dataset=str(toy_npz), epochs=1, batch_size=50, eval_size=20, lr=2e-4,
                                        figures="none"), tmp_path / "r", device="cpu")
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.999)
    assert run.history[0]["lr"] == 2e-4


@pytest.fixture
def gan_run(toy_npz, tmp_path):
    fit("gan", SMALL, TrainConfig(dataset=str(toy_npz), epochs=1, batch_size=50, eval_size=20, figures="none"),
        tmp_path / "gan", device="cpu")
    return tmp_path / "gan"


@pytest.mark.parametrize("args,fragments", [
    (["evaluate", "{run}", "--iw", 10], ["no density", "--observation gaussian --sigma S"]),
    (["evaluate", "{run}", "--iw", 10, "--ais", 5], ["--observation gaussian --sigma S"]),
    (["evaluate", "{run}", "--iw", 10, "--bdmc", 3], ["--observation gaussian --sigma S"]),
    (["evaluate", "{run}", "--iw", 10, "--observation", "gaussian"], ["--sigma", "positive"]),
    (["evaluate", "{run}", "--iw", 10, "--sigma", 0.1], ["--observation gaussian"]),
    (["encode", "{run}"], ["no encoder"]),
    (["reconstruct", "{run}"], ["no encoder"]),
])
def test_what_a_gan_cannot_do_is_refused_in_one_line_writing_nothing(gan_run, args, fragments):
    before = sorted(p.name for p in gan_run.rglob("*"))
    result = invoke(*[gan_run if a == "{run}" else a for a in args])
    assert_clean_error(result, *fragments)
    assert sorted(p.name for p in gan_run.rglob("*")) == before


def test_a_model_with_its_own_likelihood_refuses_an_observation_model(tiny_npy, tmp_path):
    fit("vae", {"z_dim": 2, "hidden": (16,)}, TrainConfig(dataset=str(tiny_npy), epochs=1, batch_size=20,
                                                          eval_size=20, figures="none"), tmp_path / "v", device="cpu")
    result = invoke("evaluate", tmp_path / "v", "--iw", 5, "--observation", "gaussian", "--sigma", 0.1)
    assert_clean_error(result, "own likelihood")
    assert not list((tmp_path / "v").glob("eval-*"))


@pytest.mark.parametrize("name,objective,extra", [
    ("gan", "meanfield", {}), ("gan", "iwae", {}), ("vae", "gan", {}), ("gmvae", "gan-minimax", {}),
    ("gan", "gan", {"beta": 0.5}), ("gan", "gan-minimax", {"kl_warmup": 1.0})])
def test_objectives_that_do_not_fit_the_family_are_refused_before_training(name, objective, extra, toy_npz,
                                                                            tmp_path):
    with pytest.raises(ConfigError) as refused:
        fit(name, SMALL, TrainConfig(dataset=str(toy_npz), objective=objective, **extra), tmp_path / "r",
            device="cpu")
    assert "\n" not in str(refused.value) and ("cannot be trained" in str(refused.value)
                                               or "GAN game" in str(refused.value))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("sigma", [0, -1.0, float("nan"), float("inf"), "0.1", None, True])
def test_set_observation_refuses_what_is_not_a_positive_sigma(sigma):
    gan = build_model("gan", SHAPE, SMALL)
    with pytest.raises(ConfigError, match="sigma"):
        gan.set_observation("gaussian", sigma)
    with pytest.raises(ConfigError, match="unknown observation"):
        gan.set_observation("laplace", 0.1)


def test_under_a_gaussian_observation_ais_and_importance_sampling_find_the_quadrature_log_px():
    """A GAN with a 1-D z: log p(x) = log of the integral of N(z) N(x; G(z), sigma^2 I),
    done on a fine grid, is what AIS from the prior and IWAE from the prior estimate."""
    torch.manual_seed(0)
    gan = build_model("gan", (6,), {"z_dim": 1, "hidden": (8,), "activation": "tanh"})
    with torch.no_grad():
        for p in gan.decoder.parameters():
            p.mul_(3)  # a generator that bends, so that the posterior is not Gaussian
    gan.eval()
    gan.set_observation("gaussian", 0.15)
    with torch.no_grad():
        x = gan.sample(4, draw=True)
        z = torch.linspace(-8, 8, 20001).unsqueeze(1)
        log_joint = gan.prior(len(z)).log_prob(z).unsqueeze(1) + gan.decode(z.unsqueeze(1)).log_prob(x)
        exact = torch.logsumexp(log_joint, 0) + math.log(z[1, 0] - z[0, 0])
    est = ais(gan.model, gan.guide, x, 20, chains=100, leapfrog=3, start="prior", seed=1)
    assert ((est.log_px - exact).abs() < 4 * est.log_px_se).all(), (est.log_px, exact, est.log_px_se)
    iw = estimate_bounds(gan.model, gan.guide, x, 5000, seed=2)
    assert ((iw.log_px - exact).abs() < 4 * iw.log_px_se + 0.02).all(), (iw.log_px, exact)
    assert (iw.elbo < exact).all()


def test_evaluate_scores_a_gan_under_the_observation_model(gan_run):
    result = invoke("evaluate", gan_run, "--iw", 20, "--limit", 6, "--observation", "gaussian", "--sigma", 0.2,
                    "--ais", 4, "--chains", 2, "--leapfrog", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((gan_run / "eval-test-iw20-n6-ais4-sigma0.2.json").read_text())
    assert summary["observation_sigma"] == 0.2 and summary["likelihood"] == "gaussian"
    assert math.isfinite(summary["ais"]["log_px"]["mean"]) and summary["log_px"]["mean"] >= summary["elbo"]["mean"]


def test_a_gan_has_neither_encoder_nor_density_and_says_so():
    cls = MODELS["gan"]
    assert not cls.has_encoder and not cls.has_density
    assert all(c.has_encoder and c.has_density for n, c in MODELS.items() if n != "gan")
    gan = build_model("gan", SHAPE, SMALL)
    x, _ = toy_images(3)
    for read_out in (gan.encode, gan.reconstruct):
        with pytest.raises(ConfigError, match="no encoder"):
            read_out(x)
    with pytest.raises(ConfigError, match="observation"):
        estimate_bounds(gan.model, gan.guide, x, 3)
    images = gan.sample(5)
    assert images.shape == (5, 64) and ((images >= 0) & (images <= 1)).all()
