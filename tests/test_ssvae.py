"""The SSVAE (M2): the enumerated unlabelled ELBO against the explicit sum over labels,
the evaluator's log p(x) against per-label estimates, the labelled subset and batches,
calibration, and learning from a few labels."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_vae import SSVAE, SSVAEConfig, TrainConfig, estimate_bounds, fit, load_dataset, resume
from pyro_vae.data import balanced_subset
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.metrics import calibration

X_DIM, C = 10, 3


@pytest.fixture
def ssvae():
    torch.manual_seed(2)
    model = SSVAE(X_DIM, SSVAEConfig(z_dim=2, hidden=(8,), classifier_hidden=(8,), activation="softplus",
                                     classes=C, labels=C))
    x = torch.bernoulli(torch.full((5, X_DIM), 0.4))
    return model, x


def elbo_given_label(model, x, y, z):
    """log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y), written out."""
    onehot = torch.nn.functional.one_hot(y, C).float().expand(x.shape[0], C)
    logits = model.decoder(torch.cat([z, onehot], -1))
    log_lik = (x * torch.nn.functional.logsigmoid(logits) + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    loc, scale = model.encoder(torch.cat([x, onehot], -1))
    log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    return log_lik - math.log(C) + log_pz - log_q


def test_enumerated_unlabelled_elbo_equals_the_explicit_sum_over_labels(ssvae):
    model, x = ssvae
    pyro.set_rng_seed(8)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x)
    pyro.set_rng_seed(8)  # the guide runs first, under the same enumeration: the same z per label
    trace = poutine.trace(poutine.enum(model.guide, first_available_dim=-2)).get_trace(x)
    z = trace.nodes["z"]["value"]  # (C, batch, z_dim): one draw for each label
    assert z.shape == (C, 5, 2)
    q_y = torch.softmax(model.classifier(x), -1)  # (batch, C)
    per_label = torch.stack([elbo_given_label(model, x, torch.tensor(c), z[c]) for c in range(C)], -1)
    expected = (q_y * per_label).sum(-1) - (q_y * q_y.log()).sum(-1)
    assert loss == pytest.approx(-expected.sum().item(), rel=1e-5)


def test_labelled_elbo_is_the_elbo_at_the_observed_label(ssvae):
    model, x = ssvae
    y = torch.tensor([0, 2, 1, 1, 0])
    pyro.set_rng_seed(3)
    loss = Trace_ELBO(max_plate_nesting=1).loss(model.model, model.guide, x, y)
    pyro.set_rng_seed(3)
    z = poutine.trace(model.guide).get_trace(x, y).nodes["z"]["value"]
    expected = sum(elbo_given_label(model, x[i : i + 1], y[i], z[i : i + 1]) for i in range(5))
    assert loss == pytest.approx(-expected.item(), rel=1e-5)


def test_evaluator_log_px_is_the_logsumexp_of_per_label_estimates(ssvae):
    model, x = ssvae
    K = 4000
    pyro.set_rng_seed(0)
    joint = estimate_bounds(model.model, model.guide, x, K, max_rows=20_000)
    per_label, per_label_se = [], []
    for c in range(C):
        pyro.set_rng_seed(c + 1)
        est = estimate_bounds(model.model, model.guide, x, K, max_rows=20_000, y=torch.full((5,), c))
        per_label.append(est.log_px)
        per_label_se.append(est.log_px_se_delta)  # relative error of p(x, y=c), delta method
    per_label, per_label_se = torch.stack(per_label), torch.stack(per_label_se)
    summed = torch.logsumexp(per_label, 0)
    # delta method: the relative error of sum_c p_c is sqrt(sum_c (p_c se_c)^2) / sum_c p_c
    weights = torch.softmax(per_label, 0)
    se = torch.sqrt((weights * per_label_se).pow(2).sum(0) + joint.log_px_se_delta.pow(2))
    assert ((joint.log_px - summed).abs() < 4 * se).all(), (joint.log_px, summed, se)
    assert (se < 0.05).all()  # the check has teeth (the delta method: the tail-aware errors are wider here, k-hat 0.49-0.77)


def test_balanced_subset_is_balanced_seeded_and_refuses_the_impossible():
    labels = torch.arange(60) % 3
    a = balanced_subset(labels, 9, 3, seed=0)
    assert torch.equal(a, balanced_subset(labels, 9, 3, seed=0)) and not torch.equal(a, balanced_subset(labels, 9, 3, seed=1))
    assert torch.bincount(labels[a]).tolist() == [3, 3, 3] and torch.equal(a, a.sort().values)
    with pytest.raises(DataError, match="evenly"):
        balanced_subset(labels, 10, 3, seed=0)
    with pytest.raises(DataError, match="class 2"):
        balanced_subset(torch.tensor([0, 0, 1, 1, 2]), 6, 3, seed=0)


def test_labelled_rows_from_a_file_replace_the_seeded_draw(tiny_labelled, tmp_path):
    data = load_dataset(str(tiny_labelled), valid_fraction=0.1)
    rows = [17, 3, 150, 42, 99]
    text = tmp_path / "rows.txt"
    text.write_text("# a published split\n17, 3 150\n42 99  # the last\n")
    np.save(tmp_path / "rows.npy", np.array(rows))

    def chosen(path, labels=len(rows), seed=0):
        model = SSVAE(64, SSVAEConfig(z_dim=2, hidden=(8,), classifier_hidden=(8,), classes=4,
                                      labels=labels, labelled_rows=str(path)))
        model.check_data(data, seed)
        model.init_from_data(data, seed)
        return model.labelled.tolist()

    assert chosen(text) == chosen(tmp_path / "rows.npy") == sorted(rows)
    assert chosen(text, seed=1) == sorted(rows)  # the seed no longer picks them
    for content, message in [("3 3 17 42 99", "more than once"), ("3 17 42 99 180", "outside 0..179"),
                             ("3 17 x", "integers"), ("3 17 42 99 100 101", "pass labels=6")]:
        text.write_text(content)
        with pytest.raises((DataError, ConfigError), match=message):
            chosen(text)
    with pytest.raises(DataError, match="no such file"):
        chosen(tmp_path / "missing.txt")


def test_training_batches_pair_unlabelled_with_cycled_labelled_images(tiny_labelled):
    data = load_dataset(str(tiny_labelled), valid_fraction=0.1)
    model = SSVAE(64, SSVAEConfig(z_dim=2, hidden=(8,), classifier_hidden=(8,), classes=4, labels=8))
    model.init_from_data(data, seed=0)
    labelled = set(model.labelled.tolist())
    batches = list(model.training_batches(data, 20, epoch=0, seed=0, device="cpu"))
    assert len(batches) == model.steps_per_epoch(data, 20) == math.ceil((180 - 8) / 20)
    assert sum(len(b[0]) for b in batches) == 172
    for x_u, x_l, y_l, share in batches:
        assert len(x_l) == 8 and torch.equal(y_l.sort().values, torch.arange(4).repeat_interleave(2))
        assert share == pytest.approx(8 * len(x_u) / (172 * 8))  # each labelled image weighs one per epoch
    # the labelled images are exactly those of the chosen rows, and none of them is in the unlabelled stream
    train = data.split("train")
    assert all(any(torch.equal(row, train[i]) for i in labelled) for row in batches[0][1])
    # resuming at a step gives the same batches from there on
    again = list(model.training_batches(data, 20, epoch=0, seed=0, device="cpu", start=3))
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
               for pa, pb in zip(batches[3:], again) for a, b in zip(pa, pb))


def test_labelled_images_are_binarized_afresh_at_every_step(tmp_path):
    # dynamically binarized images: the first 8 pixels spell the row number in binary (0 or 1,
    # so every binarization keeps them), the other 56 are grey (probability 0.5)
    labels = torch.arange(4).repeat(50)
    grey = torch.full((200, 64), 0.5)
    grey[:, :8] = (torch.arange(200)[:, None] >> torch.arange(8) & 1).float()
    np.savez(tmp_path / "grey.npz", train=grey.numpy(), train_labels=labels.numpy())
    data = load_dataset(str(tmp_path / "grey.npz"), binarize="dynamic", valid_fraction=0.1)
    model = SSVAE(64, SSVAEConfig(z_dim=2, hidden=(8,), classifier_hidden=(8,), classes=4, labels=8))
    model.init_from_data(data, seed=0)
    batches = list(model.training_batches(data, 20, epoch=0, seed=0, device="cpu"))
    code = 2 ** torch.arange(8.0)
    draws = torch.stack([b[1][(b[1][:, :8] @ code).argsort()] for b in batches])  # (steps, 8, 64), by row
    assert set(draws.unique().tolist()) == {0.0, 1.0} and (draws[:, :, :8] == draws[0, :, :8]).all()
    # the same labelled image at consecutive steps: independent Bernoulli(0.5) grey pixels,
    # so two visits agree on about half of them (8 steps x 8 images x 56 pixels: sd ~0.008)
    agree = (draws[:-1, :, 8:] == draws[1:, :, 8:]).float().mean().item()
    assert 0.4 < agree < 0.6
    again = list(model.training_batches(data, 20, epoch=0, seed=0, device="cpu", start=4))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches[4:], again))
    other_epoch = list(model.training_batches(data, 20, epoch=1, seed=0, device="cpu"))
    assert not torch.equal(other_epoch[0][1], batches[0][1])


def test_calibration_matches_a_hand_computation():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1])
    s = calibration(probs, labels, bins=2)
    assert s["accuracy"] == 0.75
    # bin [0.5, 1): all four, confidence mean 0.7375, accuracy 0.75
    assert s["ece"] == pytest.approx(abs(0.75 - (0.9 + 0.8 + 0.7 + 0.55) / 4))
    assert s["calibration"]["count"] == [0.0, 4.0]


def test_a_few_labels_teach_the_classifier(tiny_labelled, tmp_path):
    config = {"z_dim": 2, "hidden": (16,), "classifier_hidden": (16,), "classes": 4, "labels": 8}
    train = TrainConfig(dataset=str(tiny_labelled), epochs=4, batch_size=20, lr=3e-3, eval_size=100)
    run = fit("ssvae", config, train, tmp_path / "ss", device="cpu")
    accuracy = [row["valid_accuracy"] for row in run.history]
    assert accuracy[-1] > 0.6, accuracy  # chance is 0.25; 8 labels, 2 of each class
    assert run.history[-1]["valid_bound"] > run.history[0]["valid_bound"]
    # the labelled rows are saved with the weights, and a resumed run continues them exactly
    part = fit("ssvae", config, TrainConfig(**{**train.__dict__, "epochs": 2}), tmp_path / "part", device="cpu")
    assert torch.equal(part.model.labelled, run.model.labelled)
    resumed = resume(tmp_path / "part", epochs=4, device="cpu")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]
    assert strip(resumed.history) == strip(run.history)
