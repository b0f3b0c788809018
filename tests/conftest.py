import os
from pathlib import Path

import numpy as np
import pyro
import pytest

import pyro_vae  # noqa: F401  (sets module_local_params)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _validation_and_seed():
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.enable_validation(False)


def make_binary_images(n: int, side: int = 8, seed: int = 0) -> np.ndarray:
    """Noisy copies of four random prototypes: binary data with structure a VAE can learn."""
    rng = np.random.default_rng(seed)
    protos = rng.random((4, side, side)) < 0.4
    which = rng.integers(0, 4, n)
    flips = rng.random((n, side, side)) < 0.05
    return (protos[which] ^ flips).astype(np.float32)


@pytest.fixture
def tiny_npy(tmp_path) -> Path:
    path = tmp_path / "tiny.npy"
    np.save(path, make_binary_images(200))
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The MNIST copies: $PYRO_VAE_DATA, else ../shared/data beside the repo."""
    root = Path(os.environ.get("PYRO_VAE_DATA", REPO.parent / "shared" / "data"))
    if not (root / "MNIST" / "raw").is_dir():
        if os.environ.get("PYRO_VAE_REQUIRE_DATA"):
            pytest.fail(f"MNIST is not under {root} but PYRO_VAE_REQUIRE_DATA is set")
        pytest.skip(f"MNIST is not under {root}; set PYRO_VAE_DATA")
    return root
