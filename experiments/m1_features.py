"""How far M1's features can carry a classifier: the ceiling beneath M1+M2's accuracy.

    python experiments/m1_features.py M1_RUN [--seeds 0,1,2,3,4] [--out FILE]

M1_RUN is a trained ``vae`` run (M1 of ``pyro-vae fit m1m2 --m1-run M1_RUN``). The
features are the means of q(z1 | x) for the training and test images (binarized as
``evaluate`` binarizes them). On them, with scikit-learn, this fits

- classifiers that see **every** training label (logistic regression; a 300-300 ReLU
  MLP): what a classifier over these features reaches when labels are no constraint;
- classifiers that see only the **100 labels** of each ``--seed`` (the labelled subset
  ``fit m1m2 --seed S`` draws): logistic regression and the nearest labelled neighbour,
  the supervised-only baselines M2's use of the unlabelled images has to beat.

It prints the test accuracies and writes them as JSON.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click
import numpy as np
import torch

from pyro_vae.data import balanced_subset
from pyro_vae.train import load_run


@torch.no_grad()
def features(model, x: torch.Tensor) -> np.ndarray:
    """Means of q(z1 | x), in chunks."""
    return torch.cat([model.encode(x[i : i + 2000])[0] for i in range(0, len(x), 2000)]).numpy()


def measure(m1_run: Path, seeds: list[int], labels: int = 100, data_dir: str | None = None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier

    run = load_run(m1_run)
    data = run.train.load_data(data_dir, download=False)
    train_x, test_x = (features(run.model, data.eval_data(s)) for s in ("train", "test"))
    train_y, test_y = data.labels["train"].numpy(), data.labels["test"].numpy()

    def score(clf, x, y) -> float:
        return float(clf.fit(x, y).score(test_x, test_y))

    out = {"m1_run": m1_run.name, "features": train_x.shape[1], "every_label": {
        "logistic": score(LogisticRegression(max_iter=2000), train_x, train_y),
        "mlp_300_300": score(MLPClassifier((300, 300), max_iter=30, random_state=0), train_x, train_y)},
        "labels": labels, "per_seed": []}
    for seed in seeds:
        rows = balanced_subset(data.labels["train"], labels, int(train_y.max()) + 1, seed).numpy()
        out["per_seed"].append({"seed": seed,
                                "logistic": score(LogisticRegression(max_iter=2000), train_x[rows], train_y[rows]),
                                "nearest_neighbour": score(KNeighborsClassifier(1), train_x[rows], train_y[rows])})
    for key in ("logistic", "nearest_neighbour"):
        values = [r[key] for r in out["per_seed"]]
        out[f"{key}_mean"] = statistics.mean(values)
    return out


@click.command()
@click.argument("m1_run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="labelled draws, comma separated")
@click.option("--labels", default=100, show_default=True, help="labelled images per draw")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON file")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
def main(m1_run: Path, seeds: str, labels: int, out: Path | None, data_dir: str | None) -> None:
    torch.manual_seed(0)
    result = measure(m1_run, [int(s) for s in seeds.split(",")], labels, data_dir)
    every = result["every_label"]
    click.echo(f"every training label: logistic {every['logistic']:.4f}, MLP {every['mlp_300_300']:.4f}")
    for r in result["per_seed"]:
        click.echo(f"{labels} labels, seed {r['seed']}: logistic {r['logistic']:.4f}, "
                   f"nearest neighbour {r['nearest_neighbour']:.4f}")
    click.echo(f"{labels} labels, mean: logistic {result['logistic_mean']:.4f}, "
               f"nearest neighbour {result['nearest_neighbour_mean']:.4f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
