"""How tight is each bound? The ELBO, IWAE-k for k = 1, 2, 5, 10, ..., K and the log p(x)
estimate (IWAE-K) of trained runs on a data split, with standard errors, and the gap
log p(x) - ELBO (the cost of the approximate posterior, E_x KL(q(z|x) || p(z|x)) up to the
estimate's own bias) split by how much of it each k closes.

    python experiments/compare_bounds.py RUN [RUN ...] [--iw 5000] [--split test] [--out DIR]
    python experiments/compare_bounds.py --quick --out DIR   # tiny data, two tiny models, < 1 min

All k come from the same K draws per image, split into disjoint groups of k (see
``pyro_vae.bounds``). Writes DIR/bounds.json (everything), DIR/bounds.csv (one row per run
and k) and DIR/bounds-vs-k.png (each bound against k, and the gap left to log p(x)).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from matplotlib.figure import Figure

from pyro_vae import TrainConfig, fit, load_run
from pyro_vae.data import toy_binary_images
from pyro_vae.evaluation import evaluate_run, split_data


def compare(run_dirs: list[str], num_particles: int, split: str, limit: int | None, seed: int,
            max_rows: int, device: str, data_dir: str | None) -> list[dict[str, Any]]:
    """One record per run: the evaluation summary plus the gap analysis."""
    records = []
    for path in run_dirs:
        run = load_run(path, "last", device)
        x, labels, _ = split_data(run, split, limit, seed, data_dir)
        with click.progressbar(length=len(x), label=f"{path}: K={num_particles}", file=sys.stderr) as bar:
            summary, est = evaluate_run(run, x, labels, num_particles, seed=seed, max_rows=max_rows,
                                        progress=bar.update)
        gap = est.log_px - est.elbo  # per image, paired: far more precise than the two means
        total = gap.mean().item()
        summary["split"] = split
        summary["gap"] = {
            "log_px_minus_elbo": {"mean": total, "data_se": gap.std().item() / math.sqrt(len(gap))},
            "closed_by_k": {str(k): (v - est.elbo).mean().item() / total for k, v in est.iwae.items()},
            "left_at_k": {str(k): (est.log_px - v).mean().item() for k, v in est.iwae.items()},
        }
        records.append(summary)
        click.echo(f"{path}: ELBO {summary['elbo']['mean']:.2f}, log p(x) {summary['log_px']['mean']:.2f}, "
                   f"gap {total:.2f} nats ({summary['seconds']:.0f} s)")
    return records


def write(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """bounds.json, bounds.csv and bounds-vs-k.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bounds.json").write_text(json.dumps(records, indent=2) + "\n")
    with open(out / "bounds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "model", "k", "bound", "mc_se", "data_se", "gap_closed", "gap_left"])
        for r in records:
            for k, st in r["iwae"].items():
                w.writerow([r["run"], r["model"], k, st["mean"], st["mc_se"], st["data_se"],
                            r["gap"]["closed_by_k"][k], r["gap"]["left_at_k"][k]])
    fig = Figure(figsize=(11, 4.2))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for r in records:
        ks = np.array([int(k) for k in r["iwae"]])
        means = np.array([st["mean"] for st in r["iwae"].values()])
        label = f"{Path(r['run']).name} ({r['model']})"
        line, = ax.plot(ks, means, "o-", ms=3, label=label)
        ax.axhline(r["log_px"]["mean"], color=line.get_color(), ls=":", lw=1)
        left = np.array([r["gap"]["left_at_k"][str(k)] for k in ks[:-1]])
        ax2.plot(ks[:-1], left, "o-", ms=3, color=line.get_color(), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("k (importance samples in the bound)")
    ax.set_ylabel("IWAE-k, nats per image (k = 1: the ELBO)")
    ax.set_title(f"bounds on log p(x); dotted: IWAE-K, K = {records[0]['num_particles']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("k")
    ax2.set_ylabel("IWAE-K minus IWAE-k, nats per image")
    ax2.set_title("how the gap to the log p(x) estimate closes", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    fig.savefig(out / "bounds-vs-k.png", dpi=100, bbox_inches="tight")
    return [out / "bounds.json", out / "bounds.csv", out / "bounds-vs-k.png"]


def quick_runs(folder: Path) -> list[str]:
    """A tiny VAE and GMVAE trained for a few epochs on toy images (seconds)."""
    images, labels = toy_binary_images(300, seed=0)
    data = folder / "toy.npz"
    np.savez(data, train=images[:200], test=images[200:])
    train = TrainConfig(dataset=str(data), epochs=5, batch_size=20, lr=3e-3, eval_size=100)
    small = {"z_dim": 2, "hidden": (16,)}
    return [str(fit(name, small, train, folder / name, device="cpu").dir.path) for name in ("vae", "gmvae")]


@click.command()
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--iw", default=5000, show_default=True, type=click.IntRange(min=2), help="importance samples K")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test"]))
@click.option("--limit", type=click.IntRange(min=1), help="a random subset of this many images")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-rows", default=2_000, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--out", default="experiments/results/compare-bounds", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="tiny data and two tiny models trained on the spot (K=200)")
def main(runs: tuple[str, ...], iw: int, split: str, limit: int | None, seed: int, max_rows: int,
         device: str, data_dir: str | None, out: str, quick: bool) -> None:
    """Compare the ELBO, IWAE-k and log p(x) of trained runs."""
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            runs, iw, device = tuple(quick_runs(Path(tmp))), 200, "cpu"
        if not runs:
            raise click.UsageError("name at least one run directory, or pass --quick")
        torch.manual_seed(seed)
        written = write(compare(list(runs), iw, split, limit, seed, max_rows, device, data_dir), Path(out))
    click.echo("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
