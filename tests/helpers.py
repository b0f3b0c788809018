"""Helpers that several test files share: tiny data, the CLI runner, the clean-error
check, the small networks of the model-space tests and brief training."""

import json
import os
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from click.testing import CliRunner

from pyro_vae.cli import main
from pyro_vae.data import toy_binary_images

REPO = Path(__file__).resolve().parents[1]


def make_binary_images(n: int, side: int = 8, seed: int = 0, with_labels: bool = False):
    """The package's toy images (four noisy prototypes), with their labels if asked."""
    images, labels = toy_binary_images(n, side, seed)
    return (images, labels) if with_labels else images


def signal_during_batch(monkeypatch, n: int, signum: int):
    """Send ``signum`` to this process as training takes its ``n``-th batch (counted over
    every epoch, from 1); returns the real ``Dataset.train_batches`` to put back."""
    from pyro_vae.data import Dataset

    original = Dataset.train_batches
    calls = {"n": 0}

    def interrupting(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signum)
            yield batch

    monkeypatch.setattr(Dataset, "train_batches", interrupting)
    return original


def labelled_npz(tmp_path, seed=1):
    images, labels = make_binary_images(440, seed=seed, with_labels=True)
    path = tmp_path / "labelled.npz"
    np.savez(path, train=images[:400], train_labels=labels[:400], test=images[400:], test_labels=labels[400:])
    return path


FAST = ["--z-dim", "2", "--hidden", "16", "--epochs", "2", "--batch-size", "20",
        "--eval-size", "50", "--device", "cpu", "-q"]


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def assert_clean_error(result, *fragments):
    """Non-zero exit, a one-line message naming the problem, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(message) == 1, result.output
    for fragment in fragments:
        assert fragment in message[0], message[0]


def assert_scores_and_samples_by_class(run, tmp_path, classes=4):
    """``evaluate`` of a semi-supervised run reports the classifier and a bound above its
    ELBO; ``sample --by-class`` writes 3 images of each class with values in [0, 1]."""
    result = invoke("evaluate", run, "--iw", 10, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "eval-test-iw10.json").read_text())
    assert summary["accuracy"] + summary["error"] == pytest.approx(1.0) and summary["ece"] >= 0
    assert summary["log_px"]["mean"] >= summary["elbo"]["mean"]
    result = invoke("sample", run, "--by-class", "-n", 3, "--output", tmp_path / "c.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    images = np.load(tmp_path / "c.npy")
    assert images.shape == (3 * classes, 64) and ((images >= 0) & (images <= 1)).all()


SHAPE = (1, 8, 8)
NETS = {"z_dim": 3, "hidden": (24,), "activation": "tanh"}


def _net_families() -> list[str]:
    from pyro_vae.models import MODELS, NetsConfig

    return sorted(name for name, cls in MODELS.items() if issubclass(cls.Config, NetsConfig))


#: the families assembled from networks, a likelihood and a guide (``NetsConfig``): those that
#: the model-space tests build from ``NETS`` (the SBN has layers of binary units instead)
NET_FAMILIES = _net_families()
FAMILY = {"ssvae": {"classifier_hidden": (24,), "classes": 2, "labels": 4},
          "adgm": {"classifier_hidden": (24,), "classes": 2, "labels": 4, "a_dim": 3},
          # the network, likelihood and guide options describe M1 (untrained here, and frozen)
          "m1m2": {"classifier_hidden": (24,), "classes": 2, "labels": 4, "m1_z_dim": 4, "m1_hidden": (24,)}}


# the text families at sizes for tests, on sentences of up to 6 words over a 12-word vocabulary
TEXT_FAMILY = {"sentence-vae": {"embed": 8, "hidden": 12, "z_dim": 3, "word_dropout": 0.3},
               "rnnlm": {"embed": 8, "hidden": 12, "word_dropout": 0.3}}
TEXT_VOCAB = 12
#: the families that the generic pair tests build: from ``NETS`` (images) or ``TEXT_FAMILY``
PAIR_FAMILIES = sorted(NET_FAMILIES + list(TEXT_FAMILY))


def toy_sentences(n: int, width: int = 7, seed: int = 0) -> torch.Tensor:
    """(n, width) padded token ids: 1 to width - 1 random words (ids 4..11), <eos>, <pad>."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(torch.randint(1, width, (n,), generator=gen).tolist()):
        x[i, :length] = torch.randint(4, TEXT_VOCAB, (length,), generator=gen)
        x[i, length] = 2
    return x


def toy_images(n: int, shape=SHAPE, seed: int = 0, binary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prototypes of grey levels k/255 with noise, flattened (n, C*H*W), and the
    prototype of each image as its label."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(2, *shape, generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    x = (protos[labels] + 0.1 * torch.randn(n, *shape, generator=gen)).clamp(0, 1)
    x = torch.bernoulli(x, generator=gen) if binary else torch.round(x * 255) / 255
    return x.reshape(n, -1), labels


def loss_of(model, objective, x, y):
    if model.has_classes:
        return model.training_loss(objective, (x, x[:8], y[:8], 1.0), 1.0)
    return model.training_loss(objective, (x,), 1.0)


def train_briefly(model, objective, x, y, steps: int = 25) -> tuple[float, float]:
    """The objective's bound per image (fixed draws) before and after ``steps`` Adam steps
    from the output bias at the data's mean."""
    model.decoder.init_output_bias(model.likelihood.init_bias(x.mean(0)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def score() -> float:
        with pyro.validation_enabled(False):
            torch.manual_seed(1)
            return -objective.loss(model.model, model.guide, x) / len(x)

    before = score()
    for step in range(steps):
        with pyro.validation_enabled(step == 0):
            loss = loss_of(model, objective, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, score()
