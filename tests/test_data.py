"""Datasets: the MNIST copies, binarization, splits, and the .amat reader's checks."""

import shutil

import numpy as np
import pytest
import torch

from pyro_vae.data import load_dataset
from pyro_vae.errors import DataError


def test_mnist_splits_and_dynamic_binarization(mnist_root):
    ds = load_dataset("mnist", mnist_root, download=False)
    assert {k: v.shape for k, v in ds.splits.items()} == {
        "train": (50_000, 784), "valid": (10_000, 784), "test": (10_000, 784)}
    assert ds.binarize == "dynamic" and ds.labels["test"].shape == (10_000,)
    assert 0 < ds.split("train").float().mean() < 0.5
    e0 = next(ds.train_batches(100, epoch=0, seed=0))
    e0_again = next(ds.train_batches(100, epoch=0, seed=0))
    e1 = next(ds.train_batches(100, epoch=1, seed=0))
    assert torch.equal(e0, e0_again) and not torch.equal(e0, e1)
    assert set(e0.unique().tolist()) == {0.0, 1.0}
    test = ds.eval_data("test")
    assert torch.equal(test, ds.eval_data("test")) and set(test.unique().tolist()) == {0.0, 1.0}
    # a fresh draw, not a threshold: grey pixels come out 1 about as often as their level
    grey = (ds.split("test") > 0.3) & (ds.split("test") < 0.7)
    assert abs(test[grey].mean().item() - ds.split("test")[grey].mean().item()) < 0.01


def test_binarized_mnist_is_read_whole(binarized_root):
    ds = load_dataset("binarized-mnist", binarized_root, download=False)
    assert {k: v.shape[0] for k, v in ds.splits.items()} == {"train": 50_000, "valid": 10_000, "test": 10_000}
    assert ds.binarize == "none" and set(ds.splits["valid"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(ds.eval_data("test"), ds.splits["test"])


def test_truncated_amat_is_reported(binarized_root, tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(binarized_root / "binarized_mnist" / f"binarized_mnist_{split}.amat", folder)
    text = (folder / "binarized_mnist_valid.amat").read_bytes()
    (folder / "binarized_mnist_valid.amat").write_bytes(text[: len(text) // 3])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("binarized-mnist", tmp_path, download=False)


def test_array_splits_and_threshold(tmp_path):
    x = np.random.default_rng(0).random((100, 3, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    ds = load_dataset(str(tmp_path / "a.npy"), binarize="threshold", valid_fraction=0.2)
    assert ds.splits["train"].shape == (80, 15) and ds.splits["valid"].shape == (20, 15)
    assert ds.image_shape == (3, 5)
    assert torch.equal(ds.eval_data("valid"), (ds.splits["valid"] > 0.5).float())
    with pytest.raises(DataError, match="no 'test' split"):
        ds.eval_data("test")

    np.savez(tmp_path / "b.npz", train=(x[:60] > 0.5), test=(x[60:] > 0.5))
    ds = load_dataset(str(tmp_path / "b.npz"))
    assert set(ds.splits) == {"train", "valid", "test"} and ds.splits["test"].shape == (40, 15)
    np.save(tmp_path / "u8.npy", (x * 255).astype(np.uint8))
    ds = load_dataset(str(tmp_path / "u8.npy"), binarize="dynamic")
    assert ds.splits["train"].max() <= 1.0


def test_npz_labels_follow_their_images_into_the_validation_split(tmp_path):
    x = (np.arange(50)[:, None] * np.ones((1, 4)) % 2).astype(np.float32)  # row i is all (i % 2)
    path = tmp_path / "l.npz"
    np.savez(path, x=x, labels=np.arange(50) % 2)
    ds = load_dataset(str(path), valid_fraction=0.2)
    for split in ("train", "valid"):
        assert torch.equal(ds.labels[split].float(), ds.split(split)[:, 0])
    assert len(ds.labels["valid"]) == 10


@pytest.mark.parametrize("labels, fragment", [(np.arange(49), "50 integer class labels"),
                                              (np.full(50, 0.5), "integer"),
                                              (-np.ones(50, dtype=int), "negative")])
def test_malformed_labels_are_refused(tmp_path, labels, fragment):
    path = tmp_path / "l.npz"
    np.savez(path, train=np.zeros((50, 4), np.float32), train_labels=labels)
    with pytest.raises(DataError, match=fragment):
        load_dataset(str(path))
