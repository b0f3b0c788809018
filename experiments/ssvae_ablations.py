"""The table of the SSVAE recipe ablations (``experiments/ssvae_ablations.sh``): per run,
what it changes from the defaults, its validation accuracy after each epoch, and the
difference from the default recipe on the same label draw at the same epochs.

    python experiments/ssvae_ablations.py RUN... [--baseline DIR] [--out DIR]

Each RUN is a ``pyro-vae fit ssvae`` run (on draw S: ``--seed S``, or ``--labelled-rows``
of a file named ``draw-S.txt``). The default recipe's curve for a label draw
(seed S) is read from ``BASELINE/seedS/metrics.jsonl`` (the 60-epoch five-draw runs, whose
first epochs are what a default run of this revision gives) unless a RUN is itself the
default recipe. The score of a run is its mean validation accuracy over its last
``--last`` epochs (10,000 validation images, binarized as the run's data are), a
smoother ranking than one epoch's value.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import click

from pyro_vae.models import model_class
from pyro_vae.train import TrainConfig

#: training fields that are not part of the recipe
NOT_RECIPE = {"epochs", "seed", "figures", "eval_size", "compile"}


def changes(config: dict) -> dict:
    """The fields of a run's config that differ from the defaults of its family and of
    training (after ``resolve`` filled the objective, particles and binarization in)."""
    family = model_class(config["model"]).Config()
    out = {k: v for k, v in config["model_config"].items()
           if k not in ("labels", "labelled_rows") and json.loads(json.dumps(getattr(family, k, None))) != v}
    if config["model_config"].get("labelled_rows"):
        out["training seed"] = config["train"]["seed"]
    defaults = {"objective": "enum", "particles": 1,
                "binarize": "dynamic" if config["model_config"].get("likelihood", "bernoulli") == "bernoulli"
                else "none"}
    train = dataclasses.asdict(TrainConfig())
    for k, v in config["train"].items():
        if k in NOT_RECIPE:
            continue
        if v != defaults.get(k, train.get(k)) and not (k == "binarize" and v is None):
            out[k] = v  # binarize None: the dataset's own, dynamic for MNIST
    return out


def draw_of(config: dict) -> int:
    """The label draw a run trained on: its seed, or S for ``--labelled-rows .../draw-S.txt``
    (the driver's retrain arm: draw S's labelled images under another training seed)."""
    rows = config["model_config"].get("labelled_rows")
    return int(Path(rows).stem.split("-")[-1]) if rows else config["train"]["seed"]


def curve(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def score(rows: list[dict], epochs: int, last: int) -> float:
    """Mean validation accuracy over epochs epochs-last+1 .. epochs."""
    return statistics.mean(r["valid_accuracy"] for r in rows[epochs - last : epochs])


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baseline", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("experiments/results/ssvae-draws-60"), show_default=True)
@click.option("--last", default=3, show_default=True, help="epochs averaged into the score")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="folder for table.md and table.json")
def main(runs: tuple[Path, ...], baseline: Path, last: int, out: Path | None) -> None:
    rows = []
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        metrics = curve(run / "metrics.jsonl")
        seed, epochs = draw_of(config), len(metrics)
        base = curve(baseline / f"seed{seed}" / "metrics.jsonl")
        if epochs < last or len(base) < epochs:
            raise click.UsageError(f"{run}: {epochs} epochs; need at least --last {last} and at most the "
                                   f"baseline's {len(base)}")
        rows.append({
            "run": run.name, "seed": seed, "epochs": epochs, "changes": changes(config),
            "valid_accuracy": [r["valid_accuracy"] for r in metrics],
            "score": score(metrics, epochs, last), "default_score": score(base, epochs, last),
            "valid_bound": metrics[-1]["valid_bound"], "default_valid_bound": base[epochs - 1]["valid_bound"],
            "seconds_per_epoch": statistics.mean(r["seconds"] for r in metrics),
        })
        rows[-1]["difference"] = rows[-1]["score"] - rows[-1]["default_score"]
    rows.sort(key=lambda r: -r["difference"])
    lines = [f"| arm (change from the defaults) | draw | epochs | valid accuracy, mean of the last {last} epochs "
             "| default, same draw and epochs | difference | valid accuracy per epoch | valid ELBO (default) "
             "| s per epoch |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        change = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(defaults)"
        per_epoch = " ".join(f"{100 * a:.1f}" for a in r["valid_accuracy"])
        lines.append(f"| {change} | {r['seed']} | {r['epochs']} | {100 * r['score']:.2f}% | "
                     f"{100 * r['default_score']:.2f}% | {100 * r['difference']:+.2f} | {per_epoch} | "
                     f"{r['valid_bound']:.2f} ({r['default_valid_bound']:.2f}) | {r['seconds_per_epoch']:.0f} |")
    table = "\n".join(lines)
    click.echo(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table + "\n")
        (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
