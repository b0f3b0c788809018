"""Test accuracy of a semi-supervised family (SSVAE, ADGM, M1+M2) over several draws of the
labelled subset, for the README.

    python experiments/ssvae_draws.py RUN... [--out FILE]

Each RUN is a finished ``pyro-vae fit ssvae|adgm|m1m2 --seed S`` run (the seed picks the
labelled images) that ``pyro-vae evaluate RUN --iw K`` has scored; this reads the
evaluations (``eval-test-iw*.json``) and prints the accuracy, error and ECE of each run
with their mean and sample standard deviation, and writes them as JSON, with each run's
training wall time (the epochs' steps and scoring, from its metrics; for M1+M2 also its
M1 run's, when that run is still where the config says).

Beside the accuracy on the test images as every evaluation sees them (binarized once
with a fixed seed), it gives the accuracy on the test images as stored (``accuracy_grey``:
the grey MNIST intensities, the input some references classify; the same images for
data that are already binary), from the run's last checkpoint.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click

from pyro_vae.train import load_run

EVALUATED = ("accuracy", "error", "ece")  # read from the run's evaluation
KEYS = (*EVALUATED, "accuracy_grey")


def grey_accuracy(run: Path, data_dir: str | None) -> float:
    """Accuracy of the run's classifier q(y | x) on the unbinarized test images."""
    loaded = load_run(run)
    data = loaded.train.load_data(data_dir, download=False)
    probs = loaded.model.classify(data.split("test"))
    return (probs.argmax(-1) == data.labels["test"]).float().mean().item()


def training_seconds(run: Path) -> float:
    """Wall seconds of a run's epochs (steps and per-epoch scoring), from its metrics."""
    return sum(json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines())


def summarize(runs: list[Path], data_dir: str | None = None) -> dict:
    """Per-run scores and their mean and standard deviation over runs."""
    rows = []
    for run in runs:
        evals = sorted(run.glob("eval-test-iw*.json"))
        if not evals:
            raise click.UsageError(f"{run} has no test evaluation: run `pyro-vae evaluate {run} --iw 100` first")
        summary = json.loads(evals[-1].read_text())
        config = json.loads((run / "config.json").read_text())
        m1 = config["model_config"].get("m1_run")
        m1_seconds = training_seconds(Path(m1)) if m1 and (Path(m1) / "metrics.jsonl").is_file() else None
        rows.append({"run": run.name, "seed": config["train"]["seed"],
                     "epochs": len((run / "metrics.jsonl").read_text().splitlines()),
                     "train_seconds": training_seconds(run), **({"m1_seconds": m1_seconds} if m1_seconds else {}),
                     **{k: summary[k] for k in EVALUATED}, "accuracy_grey": grey_accuracy(run, data_dir),
                     "log_px": summary["log_px"]["mean"], "num_particles": summary["num_particles"]})
    stats = {k: {"mean": statistics.mean(r[k] for r in rows),
                 "sd": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else None} for k in KEYS}
    return {"runs": rows, **stats}


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON file")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="dataset folder (default: $PYRO_VAE_DATA or ~/.cache/pyro_vae)")
def main(runs: tuple[Path, ...], out: Path | None, data_dir: str | None) -> None:
    result = summarize(list(runs), data_dir)
    for r in result["runs"]:
        click.echo(f"{r['run']:20} seed {r['seed']}  {r['train_seconds'] / 60:.0f} min  accuracy {r['accuracy']:.4f} (grey images "
                   f"{r['accuracy_grey']:.4f})  ECE {r['ece']:.4f}  log p(x) (K={r['num_particles']}) {r['log_px']:.2f}")
    a, g, e = result["accuracy"], result["accuracy_grey"], result["ece"]
    click.echo(f"mean accuracy {a['mean']:.4f} (sd {a['sd'] or 0:.4f} over {len(runs)} draws; grey images "
               f"{g['mean']:.4f}), ECE {e['mean']:.4f}")
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
