"""The data of the course reference's (CS236) SSVAE, for ``pyro-vae fit ssvae``.

The course reference trains on all 60,000 MNIST training images, of which 100 keep their
labels: not a random draw but a fixed choice, ten per class, given in its code as
positions within each class (the ``CLASS_POSITIONS`` table below: row c holds the
positions among the training images of digit c, in file order). One position appears
twice for digit 4, so the set has 99 distinct images. It validates on nothing and
reports accuracy on the grey test images.

This script writes what a run on that split needs:

- ``mnist-60k.npz``: ``train`` = the 60,000 training images (uint8, as stored) with
  ``train_labels``; ``test`` with ``test_labels``; and the test set again as ``valid``,
  since there is no held-out training data left (no choice is made from it: the
  figures in the README use the last checkpoint);
- ``cs236-rows.txt``: the 99 labelled rows of ``train``.

Then (50 epochs of 600 steps = the reference's 30,000 iterations of batch 100)::

    python experiments/cs236_split.py --out runs/cs236-data
    pyro-vae fit ssvae --dataset runs/cs236-data/mnist-60k.npz --binarize dynamic \\
        --labels 99 --labelled-rows runs/cs236-data/cs236-rows.txt --epochs 50 --run-dir runs/ssvae-cs236
    pyro-vae evaluate runs/ssvae-cs236 --iw 100
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from pyro_vae.data import load_dataset

# positions within each digit's training images (row = digit), from the course reference
CLASS_POSITIONS = [
    [2732, 2607, 1653, 3264, 4931, 4859, 5827, 1033, 4373, 5874],
    [5924, 3468, 6458, 705, 2599, 2135, 2222, 2897, 1701, 537],
    [2893, 2163, 5072, 4851, 2046, 1871, 2496, 99, 2008, 755],
    [797, 659, 3219, 423, 3337, 2745, 4735, 544, 714, 2292],
    [151, 2723, 3531, 2930, 1207, 802, 2176, 2176, 1956, 3622],
    [3560, 756, 4369, 4484, 1641, 3114, 4984, 4353, 4071, 4009],
    [2105, 3942, 3191, 430, 4187, 2446, 2659, 1589, 2956, 2681],
    [4180, 2251, 4420, 4870, 1071, 4735, 6132, 5251, 5068, 1204],
    [3918, 1167, 1684, 3299, 2767, 2957, 4469, 560, 5425, 1605],
    [5795, 1472, 3678, 256, 3762, 5412, 1954, 816, 2435, 1634],
]


def labelled_rows(labels: np.ndarray) -> np.ndarray:
    """The distinct rows of the 60,000 training images that CLASS_POSITIONS names (sorted)."""
    rows = [np.flatnonzero(labels == digit)[positions] for digit, positions in enumerate(CLASS_POSITIONS)]
    return np.unique(np.concatenate(rows))


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/cs236-data"),
              show_default=True, help="folder for mnist-60k.npz and cs236-rows.txt")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="MNIST folder (default: $PYRO_VAE_DATA or ~/.cache/pyro_vae)")
def main(out: Path, data_dir: str | None) -> None:
    """Write the 60,000-image training set and the course reference's labelled rows."""
    data = load_dataset("mnist", data_dir=data_dir, download=False)
    as_bytes = lambda x: (x * 255).round().to(torch.uint8).reshape(-1, 28, 28).numpy()  # noqa: E731
    # the library's MNIST keeps the first 50,000 for training and the last 10,000 to validate
    train = np.concatenate([as_bytes(data.split("train")), as_bytes(data.split("valid"))])
    train_labels = torch.cat([data.labels["train"], data.labels["valid"]]).numpy()
    test, test_labels = as_bytes(data.split("test")), data.labels["test"].numpy()
    rows = labelled_rows(train_labels)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "mnist-60k.npz", train=train, train_labels=train_labels, valid=test, valid_labels=test_labels,
             test=test, test_labels=test_labels)
    (out / "cs236-rows.txt").write_text(
        "# rows of mnist-60k.npz's train split labelled by the course reference (99 distinct)\n"
        + "\n".join(" ".join(map(str, rows[i:i + 10])) for i in range(0, len(rows), 10)) + "\n")
    click.echo(f"{out / 'mnist-60k.npz'}: {len(train)} training images; {out / 'cs236-rows.txt'}: "
               f"{len(rows)} labelled rows, per digit {np.bincount(train_labels[rows]).tolist()}")


if __name__ == "__main__":
    main()
