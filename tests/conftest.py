import os
from pathlib import Path

import numpy as np
import pyro
import pytest

from pyro_vae.data import default_data_dir

from helpers import REPO, make_binary_images


@pytest.fixture(autouse=True)
def _validation_and_seed():
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.enable_validation(False)


@pytest.fixture(autouse=True, scope="session")
def _parsed_copies(tmp_path_factory):
    """Parsed copies of sources in read-only data folders go to a folder of the test
    session's, not the user's cache (CLI subprocesses inherit it)."""
    os.environ.setdefault("PYRO_VAE_CACHE", str(tmp_path_factory.mktemp("parsed")))
    yield


@pytest.fixture
def tiny_npy(tmp_path) -> Path:
    path = tmp_path / "tiny.npy"
    np.save(path, make_binary_images(200))
    return path


@pytest.fixture
def tiny_text(tmp_path) -> Path:
    """A corpus of 150 short sentences over 8 words with a pattern (each sentence one of
    three templates), one per line."""
    rng = np.random.default_rng(0)
    templates = [["the", "cat", "sat", "on", "a", "mat"], ["a", "dog", "ran"], ["the", "big", "dog", "sat"]]
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(" ".join(templates[rng.integers(3)]) for _ in range(150)) + "\n")
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
