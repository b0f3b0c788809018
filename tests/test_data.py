"""Datasets: the MNIST copies, binarization, splits, the .amat reader's checks, every named
source on tiny files fabricated in its own on-disk layout, and the user-array layouts."""

import os
import pickle
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pyro_vae.cli import main
from pyro_vae.data import DATASETS, Dataset, as_chw, load_dataset
from pyro_vae.errors import DataError


def test_mnist_splits_and_dynamic_binarization(mnist_root):
    ds = load_dataset("mnist", mnist_root, download=False)
    assert {k: v.shape for k, v in ds.splits.items()} == {
        "train": (50_000, 784), "valid": (10_000, 784), "test": (10_000, 784)}
    assert ds.binarize == "dynamic" and ds.labels["test"].shape == (10_000,)
    assert ds.image_shape == (1, 28, 28) and ds.splits["train"].dtype == torch.float32
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


def _small_amat(root, monkeypatch, seed=0):
    """Binarized MNIST files of 5, 3 and 2 lines, and their values."""
    from pyro_vae import data

    sizes = {"train": 5, "valid": 3, "test": 2}
    monkeypatch.setattr(data, "AMAT_SIZES", sizes)
    folder = root / "binarized_mnist"
    folder.mkdir(parents=True, exist_ok=True)
    values = {}
    for split, n in sizes.items():
        values[split] = np.random.default_rng([seed, n]).integers(0, 2, (n, 784)).astype(np.float32)
        (folder / f"binarized_mnist_{split}.amat").write_text(
            "".join(" ".join(str(int(v)) for v in row) + "\n" for row in values[split]))
    return folder, values


def _parses(monkeypatch):
    """A list that records each .amat file parsed."""
    from pyro_vae import data

    parsed, parse = [], data._parse_amat
    monkeypatch.setattr(data, "_parse_amat", lambda path, n: parsed.append(path.name) or parse(path, n))
    return parsed


def test_amat_is_parsed_once_and_a_stale_or_damaged_copy_is_made_again(tmp_path, monkeypatch):
    folder, values = _small_amat(tmp_path, monkeypatch)
    parsed = _parses(monkeypatch)
    check = lambda ds: all(torch.equal(ds.splits[k], torch.from_numpy(v)) for k, v in values.items())  # noqa: E731
    assert check(load_dataset("binarized-mnist", tmp_path, download=False)) and len(parsed) == 3
    copies = sorted(p.name for p in folder.glob("*.pyro_vae.npz"))
    assert copies == [f"binarized_mnist_{s}.amat.pyro_vae.npz" for s in ("test", "train", "valid")]
    parsed.clear()
    ds = load_dataset("binarized-mnist", tmp_path, download=False)
    assert check(ds) and ds.splits["train"].dtype == torch.float32 and parsed == []  # read from the copies
    copy = folder / "binarized_mnist_train.amat.pyro_vae.npz"
    for damage in (lambda: copy.write_bytes(copy.read_bytes()[:200]),  # truncated
                   lambda: copy.write_bytes(b"\x93NUMPY" + bytes(range(256)) * 4),  # garbage
                   lambda: copy.write_bytes(b"")):
        damage()
        assert check(load_dataset("binarized-mnist", tmp_path, download=False))
        assert parsed == ["binarized_mnist_train.amat"]
        parsed.clear()
    # the source changed (same size, a new time): its copy is stale
    source = folder / "binarized_mnist_valid.amat"
    new = 1 - values["valid"]
    source.write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in new))
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert torch.equal(load_dataset("binarized-mnist", tmp_path, download=False).splits["valid"], torch.from_numpy(new))
    assert parsed == ["binarized_mnist_valid.amat"]
    parsed.clear()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))  # touched only: parsed again
    load_dataset("binarized-mnist", tmp_path, download=False)
    assert parsed == ["binarized_mnist_valid.amat"]


def test_amat_in_a_read_only_folder_is_copied_to_the_cache_folder(tmp_path, monkeypatch):
    folder, values = _small_amat(tmp_path / "data", monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYRO_VAE_CACHE", str(cache))
    parsed = _parses(monkeypatch)
    before = sorted(folder.iterdir())
    for path in (folder, *before):
        path.chmod(0o555 if path == folder else 0o444)
    try:
        for _ in range(2):
            ds = load_dataset("binarized-mnist", tmp_path / "data", download=False)
            assert all(torch.equal(ds.splits[k], torch.from_numpy(v)) for k, v in values.items())
        assert sorted(folder.iterdir()) == before  # nothing written there
        assert len(parsed) == 3 and len(list(cache.glob("*.npz"))) == 3
        # another folder with files of the same names has copies of its own
        other, other_values = _small_amat(tmp_path / "other", monkeypatch, seed=1)
        ds = load_dataset("binarized-mnist", tmp_path / "other", download=False)
        assert torch.equal(ds.splits["test"], torch.from_numpy(other_values["test"]))
    finally:
        folder.chmod(0o755)


def test_binarized_mnist_loads_from_its_copy_quickly(binarized_root, monkeypatch):
    """The shared copy's folder is read-only: the second load reads the cache folder's copy
    without parsing, in well under a second."""
    import time

    first = load_dataset("binarized-mnist", binarized_root, download=False)
    parsed = _parses(monkeypatch)
    start = time.perf_counter()
    again = load_dataset("binarized-mnist", binarized_root, download=False)
    seconds = time.perf_counter() - start
    assert parsed == [] and all(torch.equal(first.splits[k], again.splits[k]) for k in first.splits)
    assert seconds < 1.0, seconds  # about 0.05 s on a quiet machine; a loaded one is slower


def test_array_splits_and_threshold(tmp_path):
    x = np.random.default_rng(0).random((100, 3, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    ds = load_dataset(str(tmp_path / "a.npy"), binarize="threshold", valid_fraction=0.2)
    assert ds.splits["train"].shape == (80, 15) and ds.splits["valid"].shape == (20, 15)
    assert ds.image_shape == (1, 3, 5) and "100 grey images 1x3x5" in ds.note
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


def test_as_chw_reads_old_and_new_shapes():
    assert as_chw([28, 28]) == (1, 28, 28) and as_chw((3, 32, 32)) == (3, 32, 32)
    assert as_chw(None) is None and as_chw([]) is None


def test_unknown_dataset_lists_every_name():
    with pytest.raises(DataError, match="unknown dataset") as e:
        load_dataset("cifar", download=False)
    assert all(name in str(e.value) for name in DATASETS) and ".npy/.npz" in str(e.value)


# --- named sources on fabricated files ---------------------------------------------------


@pytest.fixture
def no_md5(monkeypatch):
    """Fabricated files cannot match torchvision's checksums of the real ones."""
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "check_md5", lambda *args, **kwargs: True)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as MNIST ships it: magic 0x08 (uint8) and the rank, big-endian sizes, bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_digits(n: int) -> np.ndarray:
    """n 28x28 uint8 images; image i has grey level i in its top row only (upright marker)."""
    x = np.zeros((n, 28, 28), np.uint8)
    x[:, 0, :] = np.arange(1, n + 1)[:, None]
    return x


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"),
                                          ("kmnist", "KMNIST")])
def test_mnist_style_sources(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    for part, n in (("train", 12), ("t10k", 4)):
        write_idx(raw / f"{part}-images-idx3-ubyte", fake_digits(n))
        write_idx(raw / f"{part}-labels-idx1-ubyte", np.arange(n) % 10)
    ds = load_dataset(name, tmp_path, download=False)
    assert {k: tuple(v.shape) for k, v in ds.splits.items()} == {"train": (10, 784), "valid": (2, 784),
                                                                 "test": (4, 784)}
    assert ds.image_shape == (1, 28, 28) and ds.binarize == DATASETS[name].binarize == "dynamic"
    assert ds.labels["valid"].tolist() == [0, 1] and ds.labels["test"].tolist() == [0, 1, 2, 3]
    valid = ds.split("valid").view(-1, 28, 28)
    assert valid.dtype == torch.float32 and torch.equal(valid[:, 0, 0], torch.tensor([11.0, 12.0]) / 255)
    assert valid[:, 1:].abs().sum() == 0
    assert (ds.splits["train"].dtype == torch.float32) == (name == "mnist")  # MNIST keeps float storage


def test_emnist_letters_are_turned_upright_and_numbered_from_zero(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    for part, n in (("train", 12), ("test", 3)):
        write_idx(raw / f"emnist-letters-{part}-images-idx3-ubyte", fake_digits(n).transpose(0, 2, 1))
        write_idx(raw / f"emnist-letters-{part}-labels-idx1-ubyte", np.arange(n) % 26 + 1)
    ds = load_dataset("emnist", tmp_path, download=False)
    assert [len(ds.splits[k]) for k in ("train", "valid", "test")] == [10, 2, 3]
    test = ds.split("test").view(-1, 28, 28)
    assert (test[:, 0, :] > 0).all() and test[:, 1:].abs().sum() == 0  # the top row, not the left column
    assert ds.labels["test"].tolist() == [0, 1, 2] and ds.labels["train"].min() == 0


def write_omniglot(root: Path, which: str, characters: dict[str, list[str]], drawings: int) -> None:
    """images_<which>/<alphabet>/<character>/<id>_<drawer>.png, 105x105 one-bit drawings,
    black strokes on white; character k of the set (sorted) has a stroke in band k, so the
    labels can be checked against the pictures. torchvision also wants the zip."""
    folder = root / "omniglot-py" / f"images_{which}"
    k = 0
    for alphabet in sorted(characters):
        for character in sorted(characters[alphabet]):
            path = folder / alphabet / character
            path.mkdir(parents=True)
            for d in range(drawings):
                img = np.full((105, 105), 255, np.uint8)
                img[k * 15 : k * 15 + 15, 10:50] = 0
                Image.fromarray(img).convert("1").save(path / f"{k:04d}_{d + 1:02d}.png")
            k += 1
    with zipfile.ZipFile(root / "omniglot-py" / f"images_{which}.zip", "w") as z:
        for png in sorted(folder.rglob("*.png")):
            z.write(png, png.relative_to(folder.parent))


def test_omniglot_inverted_downsampled_and_numbered_over_both_sets(tmp_path, no_md5):
    write_omniglot(tmp_path, "background", {"Bb": ["character02", "character01"], "Aa": ["character01",
                                                                                  "character02"]}, 10)
    write_omniglot(tmp_path, "evaluation", {"Cc": ["character01", "character02"]}, 10)
    ds = load_dataset("omniglot", tmp_path, download=False)
    assert [len(ds.splits[k]) for k in ("train", "valid", "test")] == [36, 4, 20]
    assert ds.image_shape == (1, 28, 28) and ds.splits["train"].dtype == torch.uint8
    assert ds.labels["valid"].tolist() == [0, 1, 2, 3]  # the last drawing of each character
    assert sorted(set(ds.labels["test"].tolist())) == [4, 5]  # evaluation characters come after
    for split in ("train", "test"):
        x, y = ds.split(split).view(-1, 28, 28), ds.labels[split]
        assert x.max() == 1.0 and x.min() == 0.0  # strokes bright, paper dark
        for img, label in zip(x, y):
            band = label % 4 if split == "train" else label - 4
            rows = img.sum(1).nonzero().flatten()  # 15 of 105 rows per band -> 4 of 28
            assert rows.min() >= int(band * 4) - 1 and rows.max() <= int(band * 4) + 4


def cifar_batch(first: int, n: int) -> dict:
    """A CIFAR-10 python batch: rows of 3072 bytes (red plane, green plane, blue plane)."""
    data = np.zeros((n, 3, 32, 32), np.uint8)
    data[:, 0] = np.arange(first, first + n)[:, None, None]
    data[:, 1, 0, :] = 200  # green only in the top row
    return {"data": data.reshape(n, -1), "labels": [i % 10 for i in range(first, first + n)]}


def test_cifar10_pickled_batches(tmp_path, no_md5):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(5):
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(cifar_batch(4 * b, 4)))
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(100, 3)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert [len(ds.splits[k]) for k in ("train", "valid", "test")] == [18, 2, 3]
    assert ds.image_shape == (3, 32, 32) and ds.x_dim == 3072
    assert ds.labels["valid"].tolist() == [8, 9] and ds.labels["test"].tolist() == [0, 1, 2]
    test = ds.split("test").view(-1, 3, 32, 32)
    assert torch.equal(test[:, 0, 5, 5], torch.tensor([100.0, 101.0, 102.0]) / 255)  # red plane first
    assert (test[:, 1, 0] == 200 / 255).all() and test[:, 1, 1:].sum() == 0 and test[:, 2].sum() == 0


def has_scipy() -> bool:
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        return False
    return True


def write_svhn(folder: Path, split: str, n: int) -> None:
    """SVHN's {split}_32x32.mat: X as (H, W, C, N) uint8, y as (N, 1) with 10 for the digit 0."""
    import scipy.io

    x = np.zeros((32, 32, 3, n), np.uint8)
    x[0, :, 0, :] = 255  # a red top row
    x[:, :, 2, :] = np.arange(n)  # blue level = index
    folder.mkdir(exist_ok=True)
    scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": (np.arange(n) % 10 + 1)[:, None]})


def test_svhn_mat_files(tmp_path, no_md5):
    if not has_scipy():
        pytest.skip("scipy is not installed (torchvision reads SVHN with it)")
    write_svhn(tmp_path / "SVHN", "train", 20)
    write_svhn(tmp_path / "SVHN", "test", 5)
    ds = load_dataset("svhn", tmp_path, download=False)
    assert [len(ds.splits[k]) for k in ("train", "valid", "test")] == [18, 2, 5]
    assert ds.labels["test"].tolist() == [1, 2, 3, 4, 5] and ds.labels["train"][9] == 0  # 10 means 0
    test = ds.split("test").view(-1, 3, 32, 32)
    assert (test[:, 0, 0] == 1).all() and test[:, 0, 1:].sum() == 0
    assert torch.equal(test[:, 2, 7, 7], torch.arange(5.0) / 255)


def test_svhn_without_scipy_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match=r"^svhn needs scipy: pip install scipy$"):
        load_dataset("svhn", tmp_path, download=False)


def write_celeba(root: Path, partition: list[int]) -> None:
    """img_align_celeba/NNNNNN.jpg (178x218: green, red inside the central 148x148 square) and
    the five text files torchvision's CelebA opens."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    for i, name in enumerate(names):
        img = np.zeros((218, 178, 3), np.uint8)
        img[..., 1] = 255
        img[35:183, 15:163] = (255, 0, i * 40)
        Image.fromarray(img).save(folder / "img_align_celeba" / name, quality=95)
    rows = lambda values: "".join(f"{n} {' '.join(map(str, v))}\n" for n, v in zip(names, values))  # noqa: E731
    n = len(names)
    (folder / "list_eval_partition.txt").write_text(rows([[p] for p in partition]))
    (folder / "identity_CelebA.txt").write_text(rows([[i + 1] for i in range(n)]))
    (folder / "list_bbox_celeba.txt").write_text(f"{n}\nimage_id x_1 y_1 width height\n" + rows([[1, 2, 3, 4]] * n))
    (folder / "list_landmarks_align_celeba.txt").write_text(f"{n}\n{' '.join(f'p{j}' for j in range(10))}\n"
                                                             + rows([list(range(10))] * n))
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n{' '.join(f'a{j}' for j in range(40))}\n"
                                                 + rows([[1, -1] * 20] * n))


def test_celeba_cropped_to_64_from_the_partition_file_and_cached(tmp_path, no_md5):
    write_celeba(tmp_path, [0, 0, 1, 0, 2, 1, 2])  # (torchvision fails on a split of one image)
    ds = load_dataset("celeba", tmp_path, download=False)
    assert [len(ds.splits[k]) for k in ("train", "valid", "test")] == [3, 2, 2]
    assert ds.image_shape == (3, 64, 64) and ds.splits["train"].dtype == torch.uint8 and not ds.labels
    x = ds.split("train").view(-1, 3, 64, 64)
    assert x[:, 0].mean() > 0.95 and x[:, 1].mean() < 0.05  # the green border is cropped away
    assert torch.allclose(x[:, 2].mean((1, 2)), torch.tensor([0.0, 40, 120]) / 255, atol=0.03)  # rows 1, 2, 4
    shutil.rmtree(tmp_path / "celeba" / "img_align_celeba")  # a second load reads the cache
    again = load_dataset("celeba", tmp_path, download=False)
    assert all(torch.equal(again.splits[k], ds.splits[k]) for k in ds.splits)


@pytest.mark.parametrize("name", [n for n, spec in DATASETS.items() if spec.corpus is None])  # ptb: a package
def test_missing_files_say_where_and_how(tmp_path, name):
    if name == "svhn" and not has_scipy():
        pytest.skip("without scipy svhn stops earlier (test_svhn_without_scipy_says_so)")
    with pytest.raises(DataError, match="data_dir") as e:
        load_dataset(name, tmp_path / "empty", download=False)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert "pyro-vae download" in str(e.value) or ".amat" in str(e.value)


def test_download_command_offers_every_dataset_and_keeps_files_there(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    for part, n in (("train", 6), ("t10k", 2)):
        write_idx(raw / f"{part}-images-idx3-ubyte", fake_digits(n))
        write_idx(raw / f"{part}-labels-idx1-ubyte", np.arange(n))
    result = CliRunner().invoke(main, ["download", "kmnist", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0 and "kmnist ready" in result.output and "train 5, valid 1, test 2" in result.output
    help_text = CliRunner().invoke(main, ["download", "--help"]).output
    assert all(name in help_text for name in DATASETS)


# --- 8-bit storage ------------------------------------------------------------------------


def test_uint8_splits_are_converted_per_batch_reproducibly():
    x = torch.randint(0, 256, (50, 12), dtype=torch.uint8)
    ds = Dataset("u8", {"train": x, "valid": x[:5]}, binarize="none", image_shape=(3, 2, 2))
    batches = list(ds.train_batches(8, epoch=0, seed=1))
    assert len(batches) == 7 and all(b.dtype == torch.float32 for b in batches)
    assert torch.equal(torch.cat(batches).sort(0).values, (x.float() / 255).sort(0).values)
    assert torch.allclose(ds.pixel_mean(), x.float().mean(0) / 255)
    ds.binarize = "dynamic"
    first = list(ds.train_batches(8, epoch=0, seed=1))
    assert set(torch.cat(first).unique().tolist()) <= {0.0, 1.0}
    assert all(torch.equal(a, b) for a, b in zip(first[3:], ds.train_batches(8, epoch=0, seed=1, start=3)))
    assert not torch.equal(first[0], next(ds.train_batches(8, epoch=1, seed=1)))
    assert torch.equal(ds.eval_data("valid"), ds.eval_data("valid"))


# --- user arrays ---------------------------------------------------------------------------


def chw_images(n: int = 10, c: int = 3, h: int = 4, w: int = 5) -> np.ndarray:
    return (np.arange(n * c * h * w) % 256).astype(np.uint8).reshape(n, c, h, w)


@pytest.mark.parametrize("make, shape, note", [
    (lambda x: x.transpose(0, 2, 3, 1), (3, 4, 5), "10 colour images 3x4x5 (channels last)"),
    (lambda x: x, (3, 4, 5), "10 colour images 3x4x5 (channels first)"),
    (lambda x: x[:, :1].transpose(0, 2, 3, 1), (1, 4, 5), "10 grey images 1x4x5 (channels last)"),
    (lambda x: x[:, :1], (1, 4, 5), "10 grey images 1x4x5 (channels first)"),
    (lambda x: x[:, 0], (1, 4, 5), "10 grey images 1x4x5"),
    (lambda x: x.reshape(10, -1), None, "10 vectors of 60 values"),
    (lambda x: x[:, 0, :4, :4].reshape(10, 16), (1, 4, 4), "each row a square image"),
])
def test_array_layouts_are_read_channel_first(tmp_path, make, shape, note):
    x = chw_images()
    np.save(tmp_path / "a.npy", make(x))
    ds = load_dataset(str(tmp_path / "a.npy"), valid_fraction=0.2)
    assert ds.image_shape == shape and note in ds.note
    expected = {(3, 4, 5): x, (1, 4, 5): x[:, :1], (1, 4, 4): x[:, :1, :4, :4], None: x}[shape]
    got = torch.cat([ds.splits["train"], ds.splits["valid"]]).sort(0).values
    assert torch.equal(got, torch.from_numpy(expected.reshape(10, -1) / np.float32(255)).sort(0).values)


@pytest.mark.parametrize("shape", [(6, 3, 32, 3), (6, 1, 28, 1)])
def test_ambiguous_layouts_need_the_flag(tmp_path, shape):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match="layout='nhwc' or layout='nchw'") as refused:
        load_dataset(str(tmp_path / "a.npy"))
    assert "pass --layout nhwc or --layout nchw" in refused.value.cli_message()
    ds = load_dataset(str(tmp_path / "a.npy"), layout="nchw")
    assert ds.image_shape == shape[1:] and "channels first" in ds.note
    assert load_dataset(str(tmp_path / "a.npy"), layout="nhwc").image_shape == (shape[3], shape[1], shape[2])


@pytest.mark.parametrize("array, layout, fragment", [
    (np.zeros((5, 4, 4, 4), np.uint8), "auto", "RGBA"),
    (np.zeros((5, 8, 8, 4), np.uint8), "nhwc", "RGBA"),
    (np.zeros((5, 8, 8, 3), np.uint8), "nchw", "with layout='nchw' the channel axis has 8"),
    (np.zeros((5, 2, 4, 5), np.float32), "auto", r"shape \(5, 2, 4, 5\)"),
    (np.zeros((5, 1, 4, 4, 1), np.float32), "auto", "shape"),
    (np.zeros((5, 4, 4), np.complex64), "auto", "dtype complex64"),
    (np.array([["a"] * 4] * 5), "auto", "dtype <U1"),
    (np.full((5, 4, 4, 3), 300.0), "auto", r"\[0, 1\]"),
    (np.full((5, 3, 4, 4), -0.5, np.float32), "auto", r"\[0, 1\]"),
    (np.full((5, 4, 4, 3), np.nan, np.float32), "auto", "NaN"),
    (np.zeros((5, 4, 4), np.float32), "sideways", "unknown layout"),
])
def test_bad_arrays_are_refused_in_one_line(tmp_path, array, layout, fragment):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=fragment) as e:
        load_dataset(str(tmp_path / "bad.npy"), layout=layout)
    assert "\n" not in str(e.value)


def test_layout_is_refused_for_named_datasets(mnist_root):
    with pytest.raises(DataError, match="layout applies to .npy/.npz"):
        load_dataset("mnist", mnist_root, download=False, layout="nhwc")


def test_npz_splits_must_agree_on_the_image_shape(tmp_path):
    np.savez(tmp_path / "s.npz", train=np.zeros((5, 3, 4, 4), np.uint8), test=np.zeros((5, 4, 4, 3), np.uint8))
    assert load_dataset(str(tmp_path / "s.npz")).image_shape == (3, 4, 4)
    np.savez(tmp_path / "d.npz", train=np.zeros((5, 3, 4, 4), np.uint8), test=np.zeros((5, 12, 4), np.uint8))
    with pytest.raises(DataError, match="different shapes"):
        load_dataset(str(tmp_path / "d.npz"))


def test_split_chunks_read_a_uint8_split_as_its_floats():
    x = torch.randint(0, 256, (25, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = Dataset(name="eight", splits={"train": x}, binarize="none", image_shape=(1, 4, 4))
    chunks = list(ds.split_chunks("train", rows=7))
    assert [len(c) for c in chunks] == [7, 7, 7, 4] and all(c.dtype == torch.float32 for c in chunks)
    assert torch.equal(torch.cat(chunks), ds.split("train")) and torch.equal(ds.split("train") * 255, x.float())
    with pytest.raises(DataError, match="no 'test' split"):
        next(ds.split_chunks("test"))


def _npy_bytes(array) -> bytes:
    import io
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _flip_middle(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


GOOD = np.random.default_rng(0).random((50, 16)).astype(np.float32)
UNREADABLE_ARRAYS = {
    "object array in a .npy": ("a.npy", lambda p: p.write_bytes(_npy_bytes(np.array([{"x": 1}] * 3, dtype=object))),
                               "holds Python objects"),
    "object array in a .npz": ("a.npz", lambda p: np.savez(p, train=GOOD, test=np.array([[1], "a"], dtype=object)),
                               r"a.npz\[test\]: it holds Python objects"),
    "a pickle named .npy": ("a.npy", lambda p: p.write_bytes(pickle.dumps(GOOD)), "a Python pickle"),
    "text named .npy": ("a.npy", lambda p: p.write_text("1 2 3\n"), "neither a .npy nor an .npz"),
    "an empty file": ("a.npy", lambda p: p.write_bytes(b""), "is empty"),
    "a truncated .npy": ("a.npy", lambda p: p.write_bytes(_npy_bytes(GOOD)[:1000]), "truncated or corrupt"),
    "a truncated .npy header": ("a.npy", lambda p: p.write_bytes(_npy_bytes(GOOD)[:30]), "header is truncated"),
    "a truncated .npz": ("a.npz", lambda p: (np.savez(p, train=GOOD), p.write_bytes(p.read_bytes()[:900])),
                         "truncated or corrupt .npz"),
    "a corrupt compressed .npz": ("a.npz", lambda p: (np.savez_compressed(p, train=GOOD), _flip_middle(p)),
                                  "truncated or corrupt"),
    "a zip that is not an .npz": ("a.npz", lambda p: _zip(p, {"readme.txt": "hello"}), "member readme.txt is not"),
    "an .npz member that is not an array": ("a.npz", lambda p: _zip(p, {"train.npy": _npy_bytes(GOOD),
                                                                       "notes.txt": "x"}), "member notes.txt"),
    "an .npz member that is a folder": ("a.npz", lambda p: _zip(p, {"train.npy": _npy_bytes(GOOD), "sub/": ""}),
                                        "member sub/"),
    "an empty .npz": ("a.npz", lambda p: _zip(p, {}), "holds no arrays"),
}


@pytest.mark.parametrize("case", list(UNREADABLE_ARRAYS))
def test_every_unreadable_array_file_is_one_line_without_unsafe_advice(tmp_path, case):
    """Each way a user's array can fail to load is a DataError of one line that names the
    file and never suggests loading it with allow_pickle; from the command line too."""
    name, make, fragment = UNREADABLE_ARRAYS[case]
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError, match=fragment) as e:
        load_dataset(str(path))
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "allow_pickle" not in message
    result = CliRunner().invoke(main, ["fit", "vae", "--dataset", str(path), "--run-dir", str(tmp_path / "r"),
                                       "--epochs", "1", "--device", "cpu", "-q"], catch_exceptions=False)
    assert result.exit_code == 1 and "Traceback" not in result.output and "allow_pickle" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [f"Error: {message}"]
    assert not (tmp_path / "r").exists()


def test_row_files_are_read_without_unpickling(tmp_path):
    from pyro_vae.data import read_rows

    (tmp_path / "rows.npy").write_bytes(_npy_bytes(np.array([1, "2"], dtype=object)))
    with pytest.raises(DataError, match="rows.npy: it holds Python objects") as e:
        read_rows(tmp_path / "rows.npy")
    assert "allow_pickle" not in str(e.value)
    np.save(tmp_path / "ok.npy", np.array([3, 1]))
    assert read_rows(tmp_path / "ok.npy").tolist() == [3, 1]
