"""ADGM: the pair's objective and importance weights against explicit sums over labels,
predictions as an average over draws of the auxiliary latent, learning from a few labels,
exact resume, and the refusal of impossible sizes."""

import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.distributions import Normal
from torch.nn import functional as F

from pyro_vae import ADGM, ADGMConfig, TrainConfig, fit, resume
from pyro_vae.bounds import importance_traces
from pyro_vae.errors import ConfigError

from helpers import FAST, assert_clean_error, assert_scores_and_samples_by_class, invoke, labelled_npz

C, Z, A, D = 3, 2, 3, 10
SMALL = {"z_dim": 2, "a_dim": 2, "hidden": (16,), "classifier_hidden": (16,), "classes": 4, "labels": 8}


@pytest.fixture
def pair():
    torch.manual_seed(4)
    model = ADGM(D, ADGMConfig(z_dim=Z, a_dim=A, hidden=(8,), classifier_hidden=(8,), activation="softplus",
                               classes=C, labels=C))
    return model, torch.bernoulli(torch.full((5, D), 0.4))


def log_joint_given_label(model, x, a, y, z):
    """log p(x | y, z) + log p(y) + log p(z) + log p(a | x, y, z) - log q(z | a, x, y), by
    hand from the networks: a (..., batch, A), z (..., batch, Z), y an int."""
    onehot = F.one_hot(torch.tensor(y), C).float().expand(*z.shape[:-1], C)
    logits = model.decoder(torch.cat([z, onehot], -1))
    log_px = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(-1)
    xs = x.expand(*z.shape[:-1], D)
    loc, scale = model.aux_decoder(xs, torch.cat([z, onehot], -1))
    log_pa = Normal(loc, scale).log_prob(a).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    qloc, qscale = model.encoder(xs, torch.cat([a, onehot], -1))
    log_qz = Normal(qloc, qscale).log_prob(z).sum(-1)
    return log_px - math.log(C) + log_pz + log_pa - log_qz


def log_qa(model, x, a):
    loc, scale = model.aux_encoder(x)
    return Normal(loc, scale).log_prob(a).sum(-1)


def test_unlabelled_objective_equals_the_explicit_sum_over_labels(pair):
    model, x = pair
    pyro.set_rng_seed(8)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x)
    pyro.set_rng_seed(8)  # the guide runs first: the same a, and the same z for each label
    trace = poutine.trace(poutine.enum(model.guide, first_available_dim=-2)).get_trace(x)
    a, z = trace.nodes["a"]["value"], trace.nodes["z"]["value"]
    assert a.shape == (5, A) and z.shape == (C, 5, Z)
    q_y = torch.softmax(model.classifier_head(model.classifier_body(torch.cat([x, a], -1))), -1)
    per_label = torch.stack([log_joint_given_label(model, x, a, c, z[c]) for c in range(C)], -1)
    expected = (q_y * per_label).sum(-1) - (q_y * q_y.log()).sum(-1) - log_qa(model, x, a)
    assert loss == pytest.approx(-expected.sum().item(), rel=1e-5)


def test_labelled_objective_is_the_elbo_at_the_given_label(pair):
    model, x = pair
    y = torch.tensor([0, 2, 1, 1, 0])
    pyro.set_rng_seed(5)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x, y)
    pyro.set_rng_seed(5)
    trace = poutine.trace(model.guide).get_trace(x, y)
    a, z = trace.nodes["a"]["value"], trace.nodes["z"]["value"]
    per_label = torch.stack([log_joint_given_label(model, x, a, c, z) for c in range(C)], -1)
    expected = per_label.gather(-1, y[:, None]).squeeze(-1) - log_qa(model, x, a)
    assert loss == pytest.approx(-expected.sum().item(), rel=1e-5)


def test_importance_weights_sum_the_label_out_inside_each_weight(pair):
    """w = sum_y p(x, y, z^y, a) / (q(a | x) q(z^y | a, x, y)): unbiased for p(x)."""
    model, x = pair
    pyro.set_rng_seed(3)
    log_w, _, guide_trace = importance_traces(model.model, model.guide, x, 7)
    a, z = guide_trace.nodes["a"]["value"], guide_trace.nodes["z"]["value"]
    assert a.shape == (7, 5, A) and z.shape == (C, 7, 5, Z)
    per_label = torch.stack([log_joint_given_label(model, x, a, c, z[c]) for c in range(C)])
    expected = torch.logsumexp(per_label, 0) - log_qa(model, x, a)
    assert torch.allclose(log_w, expected, atol=1e-4)


def test_a_prediction_averages_the_classifier_over_draws_of_a(pair):
    model, x = pair
    model.eval()
    torch.manual_seed(2)
    probs = model.classify(x)
    torch.manual_seed(2)
    loc, scale = model.aux_encoder(x)
    a = loc + scale * torch.randn(model.config.class_draws, *loc.shape)
    by_hand = torch.softmax(model.logits_given_aux(x, a), -1).mean(0)
    assert torch.allclose(probs, by_hand, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(5))
    # training: the classification loss sees q(y | a, x) at a single draw of a
    model.train()
    torch.manual_seed(2)
    single = model.class_logits(x)
    torch.manual_seed(2)
    a = loc + scale * torch.randn(loc.shape)
    assert torch.allclose(torch.log_softmax(single, -1), torch.log_softmax(model.logits_given_aux(x, a), -1),
                          atol=1e-6)


def test_eight_labels_teach_the_classifier(tmp_path):
    """4 classes, 2 labelled images of each."""
    train = TrainConfig(dataset=str(labelled_npz(tmp_path)), epochs=6, batch_size=20, lr=3e-3, eval_size=100)
    run = fit("adgm", SMALL, train, tmp_path / "run", device="cpu")
    assert run.history[-1]["valid_accuracy"] > 0.6  # chance: 0.25
    assert run.history[-1]["valid_bound"] > run.history[0]["valid_bound"]


def test_resume_is_exact(tiny_labelled, tmp_path):
    train = TrainConfig(dataset=str(tiny_labelled), epochs=3, batch_size=20, lr=3e-3, eval_size=100)
    straight = fit("adgm", SMALL, train, tmp_path / "a", device="cpu")
    fit("adgm", SMALL, TrainConfig(**{**train.__dict__, "epochs": 2}), tmp_path / "b", device="cpu")
    resumed = resume(tmp_path / "b", epochs=3, device="cpu")
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]
    assert untimed(straight.history) == untimed(resumed.history)  # accuracy too: its draws of a are the same


def test_cli_fit_evaluate_and_sample_by_class(tiny_labelled, tmp_path):
    run = tmp_path / "ad"
    result = invoke("fit", "adgm", "--dataset", tiny_labelled, "--run-dir", run, "--classes", 4, "--labels", 8,
                    "--classifier-hidden", 16, "--a-dim", 3, "--class-draws", 4, *FAST)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())["model_config"]
    assert (config["a_dim"], config["class_draws"]) == (3, 4)
    assert_scores_and_samples_by_class(run, tmp_path)


@pytest.mark.parametrize("option,value", [("--a-dim", 0), ("--a-dim", -3), ("--class-draws", 0), ("--z-dim", 0),
                                          ("--labels", 2), ("--a-dim", "x"), ("--class-draws", 1.5)])
def test_impossible_sizes_are_refused_in_one_line(tiny_labelled, tmp_path, option, value):
    out = tmp_path / "run"
    assert_clean_error(invoke("fit", "adgm", "--dataset", tiny_labelled, "--run-dir", out, "--classes", 4,
                              "--labels", 8, *FAST, option, value), option)
    assert not out.exists()


def test_impossible_sizes_are_refused_from_python():
    with pytest.raises(ConfigError, match="^a_dim must be at least 1"):
        ADGM(D, ADGMConfig(a_dim=0, classes=C, labels=C))
    with pytest.raises(ConfigError, match="^class_draws must be at least 1"):
        ADGM(D, ADGMConfig(class_draws=-1, classes=C, labels=C))


def test_many_draws_of_a_are_scored_in_blocks(pair, monkeypatch):
    """A prediction over more draws than one block averages q(y | a, x) over every draw of
    every block, the last one short."""
    import pyro_vae.models.adgm as adgm

    model, x = pair
    model.eval()
    model.config.class_draws = 7
    monkeypatch.setattr(adgm, "CLASS_DRAW_BLOCK", 3)  # blocks of 3, 3 and 1
    torch.manual_seed(3)
    blocks = model.classify(x)
    torch.manual_seed(3)
    q_a = model.aux_posterior(x)
    a = torch.cat([q_a.sample((n,)) for n in (3, 3, 1)])
    by_hand = torch.softmax(model.logits_given_aux(x, a), -1).mean(0)
    assert torch.allclose(blocks, by_hand, atol=1e-6) and torch.allclose(blocks.sum(-1), torch.ones(5))
