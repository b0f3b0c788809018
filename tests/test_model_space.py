"""Every family with every network and likelihood: the pairs build, train and score.

Tiny 8x8 images (grey levels in multiples of 1/255, one and three channels) keep each
combination to a fraction of a second; the CLI round trip covers the data checks, the
binarization default of grey likelihoods and colour figures once.
"""

import math

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import MODELS, build_model, estimate_bounds, make_objective
from pyro_vae.errors import ConfigError
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.nets import DECODERS, ENCODERS

from helpers import FAMILY, NET_FAMILIES, NETS, SHAPE, assert_clean_error, invoke, toy_images, train_briefly

COMBOS = [(family, net, likelihood) for family in NET_FAMILIES for net in sorted(ENCODERS)
          for likelihood in LIKELIHOODS]


@pytest.mark.parametrize("family,net,likelihood", COMBOS)
def test_every_family_network_and_likelihood_trains(family, net, likelihood):
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    x, y = toy_images(40, binary=likelihood == "bernoulli")
    config = {**NETS, **FAMILY.get(family, {}), "encoder": net, "decoder": net, "likelihood": likelihood}
    model = build_model(family, SHAPE, config)
    assert model.likelihood.name == likelihood
    cls = MODELS[family]
    objective = make_objective(cls.default_objective, cls.default_particles)
    before, after = train_briefly(model, objective, x, y)
    assert math.isfinite(before) and math.isfinite(after)
    assert after > before, (before, after)
    # the evaluator's bounds are finite and ordered for the trained pair
    est = estimate_bounds(model.model, model.guide, x[:6], 20)
    assert torch.isfinite(est.log_px).all() and (est.log_px >= est.elbo - 1e-4).all()
    # read-outs of the contract: pictures in [0, 1], the posterior over z
    for images in (model.sample(3), model.reconstruct(x[:3])):
        assert images.shape == (3, x.shape[1]) and ((images >= 0) & (images <= 1)).all()
    q = model.posterior(x[:3])
    assert q.batch_shape == (3,) and q.event_shape == (NETS["z_dim"],)
    assert model.decode(q.sample()).batch_shape == (3,) if not model.has_classes else True


def test_colour_images_through_the_conv_pair():
    x, _ = toy_images(10, shape=(3, 8, 8))
    model = build_model("vae", (3, 8, 8), {**NETS, "encoder": "conv", "decoder": "conv",
                                           "likelihood": "discretized-logistic", "logistic_mixtures": 2})
    assert model.decoder(model.encode(x)[0]).shape == (10, 3 * 2 * 192)
    assert model.decode(model.encode(x)[0]).log_prob(x).shape == (10,)


@pytest.mark.parametrize("config,fragment", [
    ({"encoder": "resnet"}, "choose one of mlp, conv"),
    ({"decoder": "nope"}, "choose one of mlp, conv"),
    ({"likelihood": "poisson"}, "choose one of bernoulli"),
    ({"z_dim": 0}, "^z_dim must be at least 1"),
])
def test_unknown_parts_are_refused_with_the_choices(config, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_model("vae", SHAPE, {**NETS, **config})


def test_conv_nets_refuse_vectors_and_tiny_images():
    with pytest.raises(ConfigError, match="encoder='mlp'") as refused:
        build_model("vae", (64,), {**NETS, "encoder": "conv"})
    assert refused.value.cli_message().endswith("use --encoder mlp")
    with pytest.raises(ConfigError, match="at least 4"):
        build_model("vae", (1, 3, 8), {**NETS, "decoder": "conv"})


@pytest.fixture
def grey_npy(tmp_path):
    path = tmp_path / "grey.npy"
    x, _ = toy_images(120)
    np.save(path, (x.reshape(120, 8, 8).numpy() * 255).round().astype(np.uint8))
    return path


def test_cli_fits_a_grey_conv_vae_and_scores_it(grey_npy, tmp_path):
    run = tmp_path / "run"
    result = invoke("fit", "vae", "--dataset", grey_npy, "--likelihood", "discretized-logistic",
                    "--encoder", "conv", "--decoder", "conv", "--logistic-mixtures", "2", "--z-dim", "2",
                    "--hidden", "16", "--epochs", "2", "--batch-size", "20", "--eval-size", "30",
                    "--device", "cpu", "--run-dir", run, "-q")
    assert result.exit_code == 0, result.output
    import json
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["binarize"] == "none" and config["data"]["image_shape"] == [1, 8, 8]
    result = invoke("evaluate", run, "--iw", 10, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "bits/dim" in result.output
    summary = json.loads((run / "eval-valid-iw10.json").read_text())
    assert summary["log_px"]["bits_per_dim"] == pytest.approx(-summary["log_px"]["mean"] / (64 * math.log(2)))


@pytest.mark.parametrize("likelihood,fragment", [
    ("bernoulli", "--binarize"),
    ("discretized-logistic", "--likelihood"),
])
def test_data_outside_the_likelihood_support_is_refused(likelihood, fragment, tmp_path):
    path = tmp_path / "grey.npy"
    np.save(path, np.random.default_rng(0).random((50, 8, 8)).astype(np.float32))  # not multiples of 1/255
    result = invoke("fit", "vae", "--dataset", path, "--likelihood", likelihood, "--binarize", "none",
                    "--epochs", "1", "--device", "cpu", "--run-dir", tmp_path / "run", "-q")
    assert_clean_error(result, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,fragments", [
    (["--encoder", "resnet"], ["--encoder", "mlp", "conv"]),
    (["--likelihood", "poisson"], ["--likelihood", "discretized-logistic"]),
    (["--dataset", "imagenet"], ["unknown dataset", "cifar10", ".npy"]),
    (["--encoder", "conv", "--dataset", "TINY3"], ["at least 4", "--encoder mlp"]),
    (["--decoder", "conv", "--dataset", "VECTORS"], ["vectors", "--decoder mlp"]),
    (["--dataset", "AMBIGUOUS"], ["--layout"]),
    (["--logistic-mixtures", "0", "--likelihood", "discretized-logistic"], ["--logistic-mixtures"]),
])
def test_bad_parts_and_data_end_in_one_line_and_write_nothing(args, fragments, tmp_path):
    files = {"TINY3": np.zeros((20, 3, 3), np.uint8), "VECTORS": np.zeros((20, 7), np.uint8),
             "AMBIGUOUS": np.zeros((20, 3, 8, 3), np.uint8)}
    for name, array in files.items():
        np.save(tmp_path / f"{name}.npy", array)
    args = [str(tmp_path / f"{a}.npy") if a in files else a for a in args]
    if "--dataset" not in args:
        args += ["--dataset", str(tmp_path / "VECTORS.npy")]
    result = invoke("fit", "vae", *args, "--epochs", "1", "--device", "cpu", "--run-dir", tmp_path / "run", "-q")
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_run_directory_of_an_earlier_version_still_loads(tmp_path):
    """Runs written before the model space opened: (H, W) image shapes, no network or
    likelihood fields, no --layout."""
    import json

    from pyro_vae import fit, load_run, TrainConfig

    path = tmp_path / "old.npy"
    np.save(path, toy_images(60, binary=True)[0].reshape(60, 8, 8).numpy())
    run = fit("vae", {"z_dim": 2, "hidden": (8,)}, TrainConfig(dataset=str(path), epochs=1, eval_size=20),
              tmp_path / "run", device="cpu")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("encoder", "decoder", "likelihood", "gaussian_scale", "logistic_mixtures"):
        del config["model_config"][key]
    del config["train"]["layout"]
    config["data"]["image_shape"] = [8, 8]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    old = load_run(tmp_path / "run")
    assert old.model.image_shape == (1, 8, 8) and old.model.likelihood.name == "bernoulli"
    for a, b in zip(run.model.state_dict().values(), old.model.state_dict().values()):
        assert torch.equal(a, b)
    result = invoke("evaluate", tmp_path / "run", "--iw", 5, "--split", "valid", "--device", "cpu")
    assert result.exit_code == 0, result.output
