"""Test accuracy of the SSVAE over several draws of the labelled subset, for the README.

    python experiments/ssvae_draws.py RUN... [--out FILE]

Each RUN is a finished ``pyro-vae fit ssvae --seed S`` run (the seed picks the labelled
images) that ``pyro-vae evaluate RUN --iw K`` has scored; this reads the evaluations
(``eval-test-iw*.json``) and prints the accuracy, error and ECE of each run with their
mean and sample standard deviation, and writes them as JSON.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click

KEYS = ("accuracy", "error", "ece")


def summarize(runs: list[Path]) -> dict:
    """Per-run scores and their mean and standard deviation over runs."""
    rows = []
    for run in runs:
        evals = sorted(run.glob("eval-test-iw*.json"))
        if not evals:
            raise click.UsageError(f"{run} has no test evaluation: run `pyro-vae evaluate {run} --iw 100` first")
        summary = json.loads(evals[-1].read_text())
        config = json.loads((run / "config.json").read_text())
        rows.append({"run": run.name, "seed": config["train"]["seed"], "epochs": len(
            (run / "metrics.jsonl").read_text().splitlines()), **{k: summary[k] for k in KEYS},
            "log_px": summary["log_px"]["mean"], "num_particles": summary["num_particles"]})
    stats = {k: {"mean": statistics.mean(r[k] for r in rows),
                 "sd": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else None} for k in KEYS}
    return {"runs": rows, **stats}


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON file")
def main(runs: tuple[Path, ...], out: Path | None) -> None:
    result = summarize(list(runs))
    for r in result["runs"]:
        click.echo(f"{r['run']:20} seed {r['seed']}  accuracy {r['accuracy']:.4f}  ECE {r['ece']:.4f}  "
                   f"log p(x) (K={r['num_particles']}) {r['log_px']:.2f}")
    a, e = result["accuracy"], result["ece"]
    click.echo(f"mean accuracy {a['mean']:.4f} (sd {a['sd'] or 0:.4f} over {len(runs)} draws), ECE {e['mean']:.4f}")
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
