import os
from pathlib import Path

import numpy as np
import pyro
import pytest

from pyro_vae.data import default_data_dir, toy_binary_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _validation_and_seed():
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.enable_validation(False)


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


@pytest.fixture
def tiny_npy(tmp_path) -> Path:
    path = tmp_path / "tiny.npy"
    np.save(path, make_binary_images(200))
    return path


@pytest.fixture
def tiny_labelled(tmp_path) -> Path:
    """The tiny images with their classes: train (200) and test (40) splits."""
    images, labels = make_binary_images(240, seed=1, with_labels=True)
    path = tmp_path / "labelled.npz"
    np.savez(path, train=images[:200], train_labels=labels[:200], test=images[200:], test_labels=labels[200:])
    return path


def _find_data(marker: str) -> Path:
    """The first of $PYRO_VAE_DATA, ../shared/data beside the repo and the default data
    folder that holds ``marker``; skipped when none does, unless PYRO_VAE_REQUIRE_DATA is set."""
    candidates = [Path(p) for p in (os.environ.get("PYRO_VAE_DATA"),) if p]
    candidates += [REPO.parent / "shared" / "data", default_data_dir()]
    for root in candidates:
        if (root / marker).exists():
            return root
    if os.environ.get("PYRO_VAE_REQUIRE_DATA"):
        pytest.fail(f"{marker} is in none of {candidates} but PYRO_VAE_REQUIRE_DATA is set")
    pytest.skip(f"{marker} is in none of {candidates}; `pyro-vae download` fetches it")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    return _find_data("MNIST/raw/t10k-images-idx3-ubyte")


@pytest.fixture(scope="session")
def binarized_root() -> Path:
    return _find_data("binarized_mnist/binarized_mnist_test.amat")
