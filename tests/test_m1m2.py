"""M1+M2: the stacked pair's objective and importance weights against explicit sums over
labels, M1 frozen while M2 trains, learning from a few labels, exact resume, and the
refusals of an M1 run that cannot serve."""

import json
import math
import shutil

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from pyro_vae import M1M2, M1M2Config, TrainConfig, VAEConfig, fit, load_run, make_objective, resume
from pyro_vae.bounds import importance_traces
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.models.m1m2 import FLAT_M1_KEYS

from helpers import FAST, assert_clean_error, assert_scores_and_samples_by_class, invoke, labelled_npz, make_binary_images

C, Z1, Z2 = 3, 4, 2
SMALL = {"z_dim": 2, "hidden": (16,), "classifier_hidden": (16,), "classes": 4, "labels": 8,
         "m1": {"z_dim": 4, "hidden": (16,)}, "m1_epochs": 2}


@pytest.fixture
def pair():
    torch.manual_seed(4)
    model = M1M2(10, M1M2Config(z_dim=Z2, hidden=(8,), classifier_hidden=(8,), activation="softplus", classes=C,
                                labels=C, m1=VAEConfig(z_dim=Z1, hidden=(8,))))
    model.eval()  # z1 drawn from q(z1 | x), as every bound is scored
    return model, torch.bernoulli(torch.full((5, 10), 0.4))


def log_joint_given_label(model, x, z1, y, z2):
    """log p(x | z1) + log p(z1 | y, z2) + log p(y) + log p(z2) - log q(z2 | z1, y), by hand."""
    onehot = torch.nn.functional.one_hot(torch.tensor(y), C).float().expand(*z2.shape[:-1], C)
    logits = model.m1.decoder(z1)
    log_px = (x * torch.nn.functional.logsigmoid(logits) + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    loc, scale = model.feature_decoder(z2, onehot)
    log_pz1 = torch.distributions.Normal(loc, scale).log_prob(z1).sum(-1)
    log_pz2 = torch.distributions.Normal(0.0, 1.0).log_prob(z2).sum(-1)
    qloc, qscale = model.encoder(z1, onehot)
    log_qz2 = torch.distributions.Normal(qloc, qscale).log_prob(z2).sum(-1)
    return log_px + log_pz1 - math.log(C) + log_pz2 - log_qz2


def log_q1(model, x, z1):
    loc, scale = model.m1.encoder(x)
    return torch.distributions.Normal(loc, scale).log_prob(z1).sum(-1)


def test_unlabelled_objective_equals_the_explicit_sum_over_labels(pair):
    model, x = pair
    pyro.set_rng_seed(8)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x)
    pyro.set_rng_seed(8)  # the guide runs first: the same z1, and the same z2 for each label
    trace = poutine.trace(poutine.enum(model.guide, first_available_dim=-2)).get_trace(x)
    z1, z2 = trace.nodes["z1"]["value"], trace.nodes["z"]["value"]
    assert z1.shape == (5, Z1) and z2.shape == (C, 5, Z2)
    q_y = torch.softmax(model.classifier(z1), -1)
    per_label = torch.stack([log_joint_given_label(model, x, z1, c, z2[c]) for c in range(C)], -1)
    expected = (q_y * per_label).sum(-1) - (q_y * q_y.log()).sum(-1) - log_q1(model, x, z1)
    assert loss == pytest.approx(-expected.sum().item(), rel=1e-5)


def test_importance_weights_sum_the_label_out_inside_each_weight(pair):
    """w = sum_y p(x, z1, y, z2^y) / (q(z1 | x) q(z2^y | z1, y)): unbiased for p(x)."""
    model, x = pair
    pyro.set_rng_seed(3)
    log_w, _, guide_trace = importance_traces(model.model, model.guide, x, 7)
    z1, z2 = guide_trace.nodes["z1"]["value"], guide_trace.nodes["z"]["value"]
    assert z1.shape == (7, 5, Z1) and z2.shape == (C, 7, 5, Z2)
    per_label = torch.stack([log_joint_given_label(model, x, z1, c, z2[c]) for c in range(C)])
    expected = torch.logsumexp(per_label, 0) - log_q1(model, x, z1)
    assert torch.allclose(log_w, expected, atol=1e-4)


def test_mean_features_train_on_the_mean_and_score_on_draws(pair):
    model, x = pair
    model.config.features = "mean"
    model.train()
    trace = poutine.trace(model.guide).get_trace(x, torch.zeros(5, dtype=torch.long))
    loc, _ = model.m1.encoder(x)
    assert torch.equal(trace.nodes["z1"]["value"], loc)
    model.eval()
    trace = poutine.trace(model.guide).get_trace(x, torch.zeros(5, dtype=torch.long))
    assert not torch.equal(trace.nodes["z1"]["value"], loc)


@pytest.mark.parametrize("train_m1", [False, True])
def test_m1_is_frozen_while_m2_trains_unless_asked(pair, train_m1):
    model, x = pair
    model = M1M2(10, M1M2Config(**{**model.config.__dict__, "train_m1": train_m1}))
    model.train()
    m1_before = {k: v.clone() for k, v in model.m1.state_dict().items()}
    m2_before = model.classifier[0].weight.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = (x, x[:3], torch.tensor([0, 1, 2]), 0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model.training_loss(make_objective("enum"), batch, 1.0).backward()
        optimizer.step()
    changed = [k for k, v in model.m1.state_dict().items() if not torch.equal(v, m1_before[k])]
    assert not torch.equal(model.classifier[0].weight, m2_before)
    assert (changed == []) != train_m1, changed


def test_eight_labels_teach_the_stacked_classifier(tmp_path):
    """4 classes, 2 labelled images of each; M1 trained here first into RUN-m1."""
    train = TrainConfig(dataset=str(labelled_npz(tmp_path)), epochs=6, batch_size=20, lr=3e-3, eval_size=100)
    run = fit("m1m2", {**SMALL, "m1_epochs": 6}, train, tmp_path / "run", device="cpu")
    assert (tmp_path / "run-m1" / "checkpoint.pt").is_file()
    assert run.model.config.m1_run == str(tmp_path / "run-m1")
    m1 = load_run(tmp_path / "run-m1").model
    assert all(torch.equal(v, run.model.m1.state_dict()[k]) for k, v in m1.state_dict().items())
    assert run.history[-1]["valid_accuracy"] > 0.6  # chance: 0.25


def test_resume_is_exact_and_reuses_a_finished_m1(tiny_labelled, tmp_path):
    train = TrainConfig(dataset=str(tiny_labelled), epochs=3, batch_size=20, lr=3e-3, eval_size=100)
    straight = fit("m1m2", SMALL, train, tmp_path / "a", device="cpu")
    fit("m1m2", {**SMALL, "m1_run": str(tmp_path / "a-m1")}, TrainConfig(**{**train.__dict__, "epochs": 2}),
        tmp_path / "b", device="cpu")
    resumed = resume(tmp_path / "b", epochs=3, device="cpu")
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [r["valid_bound"] for r in straight.history] == [r["valid_bound"] for r in resumed.history]
    # a finished M1 in RUN-m1 is taken as it is, not retrained
    stamp = (tmp_path / "a-m1" / "checkpoint.pt").stat().st_mtime_ns
    fit("m1m2", SMALL, train, tmp_path / "a", device="cpu", overwrite=True)
    assert (tmp_path / "a-m1" / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_an_m1_run_that_cannot_serve_is_refused(tiny_labelled, tiny_npy, tmp_path):
    common = ["--classes", 4, "--labels", 8, "--classifier-hidden", 16, *FAST]
    vae = tmp_path / "vae"
    assert invoke("fit", "vae", "--dataset", tiny_labelled, "--run-dir", vae, *FAST).exit_code == 0
    ss = tmp_path / "ss"
    assert invoke("fit", "ssvae", "--dataset", tiny_labelled, "--run-dir", ss, *common).exit_code == 0
    other = tmp_path / "other.npz"  # same shape, other images
    images, labels = make_binary_images(240, seed=5, with_labels=True)
    np.savez(other, train=images[:200], train_labels=labels[:200], test=images[200:], test_labels=labels[200:])
    wide = tmp_path / "wide.npz"  # another shape
    images, labels = make_binary_images(240, side=10, seed=1, with_labels=True)
    np.savez(wide, train=images[:200], train_labels=labels[:200], test=images[200:], test_labels=labels[200:])
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"  # a VAE run whose checkpoint was cut short
    shutil.copytree(vae, broken)
    (broken / "checkpoint.pt").write_bytes((vae / "checkpoint.pt").read_bytes()[:100])
    cases = [
        (tiny_labelled, ss, ["ssvae run", "vae or iwae"]),
        (other, vae, ["was trained on", "the data M2 learns from"]),
        (wide, vae, ["was trained on"]),
        (tiny_labelled, tmp_path / "nowhere", ["--m1-run", "not a run directory"]),
        (tiny_labelled, tmp_path / "empty", ["--m1-run", "not a run directory"]),
        (tiny_labelled, tiny_npy, ["--m1-run", "not a run directory"]),
        (tiny_labelled, broken, ["--m1-run", "truncated or corrupt"]),
    ]
    for data, m1, fragments in cases:
        out = tmp_path / "m"
        assert_clean_error(invoke("fit", "m1m2", "--dataset", data, "--m1-run", m1, "--run-dir", out, *common),
                           *fragments)
        assert not out.exists()
    # impossible M1 or M2 options are refused by their own name before M1 is trained
    for option, value in (("--m1-epochs", 0), ("--m1-z-dim", 0), ("--m1-epochs", -2), ("--z-dim", 0),
                          ("--labels", 2)):
        out = tmp_path / "early"
        assert_clean_error(invoke("fit", "m1m2", "--dataset", tiny_labelled, "--run-dir", out, *common, option,
                                  value), option)
        assert not out.exists() and not (tmp_path / "early-m1").exists()
    # M1's options come from its run: one that contradicts it is refused
    for option, value in (("--m1-hidden", 32), ("--m1-z-dim", 3), ("--m1-encoder", "conv")):
        assert_clean_error(invoke("fit", "m1m2", "--dataset", tiny_labelled, "--m1-run", vae, option, value,
                                  "--run-dir", tmp_path / "m", *common), option, "contradicts")
    # the same data binarized otherwise is other data
    assert_clean_error(invoke("fit", "m1m2", "--dataset", tiny_labelled, "--binarize", "threshold", "--m1-run", vae,
                              "--run-dir", tmp_path / "m", *common), "binarize")
    # from Python: the same refusals, worded for Python
    with pytest.raises(ConfigError, match="m1_run="):
        fit("m1m2", {**SMALL, "m1_run": str(ss)}, TrainConfig(dataset=str(tiny_labelled)), tmp_path / "p")
    with pytest.raises(DataError, match="m1_run="):
        fit("m1m2", {**SMALL, "m1_run": str(vae)}, TrainConfig(dataset=str(other)), tmp_path / "p")


def test_cli_fit_evaluate_and_sample_by_class_through_both_stages(tiny_labelled, tmp_path):
    run = tmp_path / "mm"
    result = invoke("fit", "m1m2", "--dataset", tiny_labelled, "--run-dir", run, "--classes", 4, "--labels", 8,
                    "--classifier-hidden", 16, "--m1-z-dim", 4, "--m1-hidden", 16, "--m1-epochs", 2, *FAST)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mm-m1" / "config.json").is_file()  # M1 trained first, beside the run
    config = json.loads((run / "config.json").read_text())["model_config"]
    assert (config["m1"]["z_dim"], config["m1"]["hidden"], config["m1_run"]) == (4, [16], str(tmp_path / "mm-m1"))
    assert_scores_and_samples_by_class(run, tmp_path)
    # a run directory written while M1's options were flat fields (m1_z_dim, encoder, ...) still loads
    nested = load_run(run).model.config
    whole = json.loads((run / "config.json").read_text())
    m1 = whole["model_config"].pop("m1")
    # (the M1 options added since, such as the Bayesian decoder's, were not among them: they take their defaults)
    whole["model_config"].update({("m1_" + k if k in ("z_dim", "hidden", "activation") else k): v for k, v in m1.items()
                                  if k in FLAT_M1_KEYS.values()})
    (run / "config.json").write_text(json.dumps(whole))
    assert "m1_z_dim" in json.loads((run / "config.json").read_text())["model_config"]
    assert load_run(run).model.config == nested
    assert invoke("evaluate", run, "--iw", 2, "--limit", 5).exit_code == 0
