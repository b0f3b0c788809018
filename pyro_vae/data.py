"""Datasets as in-memory tensors, binarization, and batching.

Every dataset is held as float tensors of shape (N, D) with values in [0, 1]; images are
flattened and their (H, W) kept for plots. Binarization is done in bulk on whole tensors:

- ``dynamic``: a fresh Bernoulli draw of the grey levels for each training epoch, and one
  fixed-seed draw for evaluation (so every model is scored on the same binary images);
- ``threshold``: pixel > 0.5;
- ``none``: the data must already be 0/1 (statically binarized MNIST, user binary data).

Sources: ``mnist`` (torchvision layout, first 50k train / last 10k validation / t10k test),
``binarized-mnist`` (Larochelle & Murray's .amat files, 50k/10k/10k), or the path of a
``.npy``/``.npz`` array of shape (N, H, W) or (N, D); an ``.npz`` may hold splits
``train``/``valid``/``test`` and integer class labels ``train_labels``... (``labels`` beside
a single array).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

BINARIZATIONS = ("dynamic", "threshold", "none")
LAYOUTS = ("auto", "nhwc", "nchw")  # TEMP until the datasets branch lands
DATASET_NAMES = ("mnist", "binarized-mnist")


def as_chw(shape):  # TEMP
    if not shape:
        return None
    return (1, *shape) if len(shape) == 2 else tuple(shape)
EVAL_BINARIZATION_SEED = 20140101  # fixed: every run sees the same binary test images
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"
AMAT_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}


@dataclass
class Dataset:
    """Train/valid/test splits as float tensors in [0, 1], with their binarization mode."""

    name: str
    splits: dict[str, torch.Tensor]
    binarize: str
    image_shape: tuple[int, ...] | None = None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""

    @property
    def x_dim(self) -> int:
        """Size of one flattened item."""
        return self.splits["train"].shape[1]

    def split(self, name: str) -> torch.Tensor:
        """The grey-level (unbinarized) tensor of one split."""
        if name not in self.splits:
            raise DataError(
                f"dataset {self.name!r} has no {name!r} split; it has {', '.join(self.splits)}"
            )
        return self.splits[name]

    def eval_data(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One split binarized once with a fixed seed: the data every evaluation scores."""
        gen = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED + _SPLIT_IDS[name])
        return self.binarized(self.split(name), gen).to(device)

    def binarized(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x`` as the decoder sees it under this dataset's binarization (a draw from
        ``gen`` when dynamic)."""
        if self.binarize == "dynamic":
            return torch.bernoulli(x, generator=gen)
        if self.binarize == "threshold":
            return (x > 0.5).float()
        return x

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, device: torch.device | str = "cpu",
        start: int = 0, rows: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """Shuffled training batches of one epoch (of the training ``rows`` only, if
        given), from batch index ``start`` on.

        Order and binarization depend only on (seed, epoch), so a run resumed mid-epoch
        sees exactly the batches it would have seen."""
        x = self.splits["train"] if rows is None else self.splits["train"][rows]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(x.shape[0], generator=gen)
        x = self.binarized(x, gen)[perm].to(device)
        for i in range(start * batch_size, x.shape[0], batch_size):
            yield x[i : i + batch_size]

    def num_batches(self, batch_size: int, rows: torch.Tensor | None = None) -> int:
        """Batches in one training epoch (the last one may be smaller)."""
        n = self.splits["train"].shape[0] if rows is None else len(rows)
        return -(-n // batch_size)


_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


def random_rows(total: int, n: int, seed: int) -> torch.Tensor:
    """Indices of ``min(n, total)`` distinct rows drawn with a fixed seed: the way to take
    part of a split, whose files can be sorted by class."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def balanced_subset(labels: torch.Tensor, n: int, classes: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` items, ``n / classes`` of each class, drawn with a fixed seed
    (sorted). The semi-supervised setting of Kingma et al. 2014: 100 labels = 10 a digit."""
    if n % classes:
        raise DataError(f"--labels {n} cannot be split evenly over {classes} classes")
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < n // classes:
            raise DataError(f"class {c} has {len(members)} training items; {n // classes} are needed "
                            f"for --labels {n}")
        picked.append(members[torch.randperm(len(members), generator=gen)[: n // classes]])
    return torch.cat(picked).sort().values


def read_rows(path: str | Path) -> torch.Tensor:
    """Row numbers from a file: a ``.npy`` array, or text with integers separated by
    white space or commas (``#`` starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".npy":
        values = np.load(path, allow_pickle=False).ravel()
    else:
        text = " ".join(line.split("#")[0] for line in path.read_text().splitlines())
        try:
            values = np.array([int(v) for v in text.replace(",", " ").split()], dtype=np.int64)
        except ValueError as e:
            raise DataError(f"{path}: expected integers separated by spaces or commas ({e})") from None
    if not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{path}: expected integer row numbers, got {values.dtype}")
    return torch.from_numpy(values.astype(np.int64))


def toy_binary_images(n: int, side: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies (5% of pixels flipped) of four random binary prototypes, and the index
    of each image's prototype as its label: a tiny dataset with structure that the models
    learn in seconds, for tests and the experiments' quick modes."""
    rng = np.random.default_rng(seed)
    protos = rng.random((4, side, side)) < 0.4
    which = rng.integers(0, 4, n)
    flips = rng.random((n, side, side)) < 0.05
    return (protos[which] ^ flips).astype(np.float32), which


def default_data_dir() -> Path:
    """``$PYRO_VAE_DATA`` if set, else ``~/.cache/pyro_vae``."""
    env = os.environ.get("PYRO_VAE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "pyro_vae"


def load_dataset(
    source: str,
    data_dir: str | Path | None = None,
    binarize: str | None = None,
    valid_fraction: float = 0.1,
    download: bool = True,
    seed: int = 0,
    layout: str = "auto",
) -> Dataset:
    """Load a named dataset or a ``.npy``/``.npz`` file (see the module docstring).

    ``binarize=None`` picks the source's default: dynamic for MNIST, none otherwise.
    """
    if binarize is not None and binarize not in BINARIZATIONS:
        raise DataError(f"unknown binarization {binarize!r}; choose one of {', '.join(BINARIZATIONS)}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if source == "mnist":
        ds = _load_mnist(root, download)
        ds.binarize = binarize or "dynamic"
    elif source == "binarized-mnist":
        ds = _load_binarized_mnist(root, download)
        ds.binarize = binarize or "none"
    elif source.endswith((".npy", ".npz")):
        ds = _load_array(Path(source), valid_fraction, seed)
        ds.binarize = binarize or "none"
    else:
        raise DataError(
            f"unknown dataset {source!r}; use mnist, binarized-mnist, or the path of a .npy/.npz file"
        )
    return ds


def _check_range(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.bool_:
        return x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{what} has dtype {x.dtype}; expected real numbers in [0, 1], bool or uint8")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{what} contains NaN or infinite values")
    lo, hi = float(x.min(initial=0)), float(x.max(initial=0))
    if lo < 0 or hi > 1:
        raise DataError(
            f"{what} has values in [{lo:g}, {hi:g}] but must lie in [0, 1] "
            "(rescale it, e.g. divide 0-255 grey levels by 255)"
        )
    return x


def _flatten(x: np.ndarray, what: str) -> tuple[np.ndarray, tuple[int, ...] | None]:
    if x.ndim == 3:
        return x.reshape(x.shape[0], -1), tuple(x.shape[1:])
    if x.ndim == 2:
        side = int(round(x.shape[1] ** 0.5))
        return x, (side, side) if side * side == x.shape[1] else None
    raise DataError(f"{what} has shape {x.shape}; expected (N, H, W) images or (N, D) vectors")


def _load_array(path: Path, valid_fraction: float, seed: int) -> Dataset:
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError... for bad files
        raise DataError(f"cannot read {path} as a numpy array ({e})") from None
    if isinstance(loaded, np.ndarray):
        arrays = {"all": loaded}
    else:
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    images = [k for k in arrays if not k.endswith("labels")]
    if "train" not in arrays and len(images) == 1:
        arrays = {"all": arrays[images[0]], **({"labels": arrays["labels"]} if "labels" in arrays else {})}
    splits: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    shape = None
    for key in ("all", "train", "valid", "test"):
        if key in arrays:
            x, shape_k = _flatten(_check_range(arrays[key], f"{path.name}[{key}]"), f"{path.name}[{key}]")
            splits[key] = x
            shape = shape or shape_k
            label_key = "labels" if key == "all" else f"{key}_labels"
            if label_key in arrays:
                labels[key] = _check_labels(arrays[label_key], len(x), f"{path.name}[{label_key}]")
    if not splits:
        raise DataError(
            f"{path} holds arrays {', '.join(arrays)}; an .npz needs 'train' (and optionally "
            "'valid', 'test', and integer class labels 'train_labels', ...), or a single array"
        )
    dims = {x.shape[1] for x in splits.values()}
    if len(dims) > 1:
        raise DataError(f"the arrays in {path} have different sizes per item: {sorted(dims)}")
    if "all" in splits:
        splits["train"] = splits.pop("all")
        if "all" in labels:
            labels["train"] = labels.pop("all")
    if "valid" not in splits:
        x = splits["train"]
        if not 0 < valid_fraction < 1:
            raise DataError(f"--valid-fraction must lie in (0, 1), got {valid_fraction}")
        n_valid = max(1, int(round(valid_fraction * x.shape[0])))
        if x.shape[0] - n_valid < 1:
            raise DataError(f"{path} has {x.shape[0]} items: too few to hold out a validation split")
        perm = np.random.default_rng(seed).permutation(x.shape[0])
        splits["valid"], splits["train"] = x[perm[:n_valid]], x[perm[n_valid:]]
        if "train" in labels:
            labels["valid"], labels["train"] = labels["train"][perm[:n_valid]], labels["train"][perm[n_valid:]]
    return Dataset(
        name=path.name,
        splits={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in splits.items()},
        binarize="none",
        image_shape=shape,
        labels={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in labels.items()},
    )


def _check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """Class labels: n non-negative integers."""
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        raise DataError(f"{what} must be {n} integer class labels, one per item; got shape {y.shape}, dtype {y.dtype}")
    if n and y.min() < 0:
        raise DataError(f"{what} has negative labels; classes are numbered 0, 1, ...")
    return y.astype(np.int64)


def _missing(what: str, where: Path, why: str, how: str) -> DataError:
    return DataError(
        f"{what} is not in {where} and could not be downloaded ({why}). {how} "
        "Or point --data-dir (or PYRO_VAE_DATA) at a folder that holds it."
    )


def _load_mnist(root: Path, download: bool) -> Dataset:
    from torchvision.datasets import MNIST  # imported here: torchvision is slow to import

    raw = root / "MNIST" / "raw"
    try:
        train = MNIST(str(root), train=True, download=download)
        test = MNIST(str(root), train=False, download=download)
    except Exception as e:  # offline downloads raise URLError, RuntimeError, ...
        raise _missing(
            "MNIST", raw, str(e).splitlines()[0] if str(e) else type(e).__name__,
            "On a machine with internet run `pyro-vae download mnist --data-dir DIR` and copy "
            "DIR/MNIST/raw here (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte).",
        ) from None
    x_train = train.data.reshape(-1, 784).float() / 255.0
    x_test = test.data.reshape(-1, 784).float() / 255.0
    return Dataset(
        name="mnist",
        splits={"train": x_train[:50_000], "valid": x_train[50_000:], "test": x_test},
        labels={"train": train.targets[:50_000], "valid": train.targets[50_000:], "test": test.targets},
        binarize="dynamic",
        image_shape=(28, 28),
    )


def _read_amat(path: Path, expected: int) -> np.ndarray:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    lines = int((raw == ord("\n")).sum())
    bits = raw[(raw == ord("0")) | (raw == ord("1"))] - ord("0")
    if lines != expected or bits.size != expected * 784:
        raise DataError(
            f"{path} looks truncated or corrupt: {lines} lines and {bits.size} values, expected "
            f"{expected} lines of 784; delete it and download it again"
        )
    return bits.reshape(expected, 784).astype(np.float32)


def _load_binarized_mnist(root: Path, download: bool) -> Dataset:
    folder = root / "binarized_mnist"
    splits = {}
    for split, size in AMAT_SIZES.items():
        path = folder / f"binarized_mnist_{split}.amat"
        if not path.is_file():
            if not download:
                raise _missing("statically binarized MNIST", folder, "downloads are off",
                               f"Get binarized_mnist_{{train,valid,test}}.amat from {AMAT_URL.format('SPLIT')}.")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".part")
                urllib.request.urlretrieve(AMAT_URL.format(split), tmp)
                os.replace(tmp, path)
            except Exception as e:
                raise _missing("statically binarized MNIST", folder, str(e),
                               f"Get binarized_mnist_{{train,valid,test}}.amat from {AMAT_URL.format('SPLIT')}.") from None
        splits[split] = torch.from_numpy(_read_amat(path, size))
    return Dataset(name="binarized-mnist", splits=splits, binarize="none", image_shape=(28, 28))
