"""The flow-length table: the same VAE (networks, data, seed, epochs) with a diagonal
Gaussian guide and with amortized flow guides, scored on the test set:

- test ELBO and log p(x) (IWAE-K, K = 5000 by default), and the gap log p(x) - ELBO,
  paired over images, with standard errors over images;
- the training step's time (median over epochs of the steps' seconds / steps);
- beside them, -ln p(x) of Rezende & Mohamed 2015, Table 2, where the paper has the row.

    python experiments/flows.py [--dataset binarized-mnist --epochs 100 --iw 5000 --limit N]
        [--configs diagonal,diagonal-trace,planar-10,...] [--out DIR]
    python experiments/flows.py --quick --out DIR      # toy data, < 1 min

A config is GUIDE[-K] (K transforms; the diagonal guide trains on meanfield, the analytic
KL, as in the README's VAE row, ``diagonal-trace`` on the Monte Carlo KL that the flows
must use). Each finished config writes DIR/records/NAME.json, so that several processes can
share the list; every process then rewrites DIR/flows.json, DIR/flows.md and
DIR/flows.png from all the records present. ``--posteriors`` also trains 2-D VAEs (a
diagonal and a planar guide, same epochs) and draws q(z | x) beside the true posterior
for four test images (DIR/posteriors-GUIDE.png).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from matplotlib.figure import Figure

from pyro_vae import TrainConfig, fit, plots
from pyro_vae.data import toy_binary_images
from pyro_vae.evaluation import evaluate_run, split_data

# -ln p(x) on statically binarized MNIST, Rezende & Mohamed 2015, Table 2
PAPER = {"diagonal": 89.9, "planar-10": 87.5, "planar-20": 86.5, "planar-40": 85.7, "planar-80": 85.1}
DEFAULT_CONFIGS = ("diagonal,diagonal-trace,planar-10,planar-20,planar-40,planar-80,radial-10,radial-40,"
                   "iaf-4,sylvester-4")


def parse_config(name: str) -> tuple[str, int, str]:
    """(guide, flow length, objective) of a config name such as planar-10."""
    if name == "diagonal":
        return "diagonal", 1, "meanfield"
    if name == "diagonal-trace":
        return "diagonal", 1, "trace"
    guide, _, length = name.partition("-")
    return guide, int(length or 10), "trace"


def run_config(name: str, out: Path, train: TrainConfig, model_config: dict[str, Any], num_particles: int,
               limit: int | None, data_dir: str | None, device: str) -> dict[str, Any]:
    """Train one config, score it on the (subset of the) test set, write its record."""
    guide, length, objective = parse_config(name)
    train = dataclasses.replace(train, objective=objective)
    run = fit("vae", {**model_config, "guide": guide, "flow_length": length}, train, out / "runs" / name,
              data_dir=data_dir, device=device, log=lambda line: click.echo(f"[{name}] {line}", err=True))
    x, _, index = split_data(run, "test", limit, train.seed, data_dir)
    with click.progressbar(length=len(x), label=f"[{name}] K={num_particles}", file=sys.stderr) as bar:
        summary, est = evaluate_run(run, x, None, num_particles, seed=train.seed, progress=bar.update)
    gap = est.log_px - est.elbo
    steps = run.model.steps_per_epoch(train.load_data(data_dir), train.batch_size)
    record = {
        "name": name, "guide": guide, "flow_length": length if guide != "diagonal" else 0,
        "objective": objective, "epochs": train.epochs, "test_images": len(x), "iw": num_particles,
        "test_elbo": summary["elbo"], "test_log_px": summary["log_px"], "kl": summary["kl"],
        "gap": {"mean": gap.mean().item(), "data_se": (gap.std() / len(gap) ** 0.5).item()},
        "pareto_k": summary["pareto_k"],
        "step_ms": 1000 * statistics.median(row["steps_seconds"] / steps for row in run.history),
        "train_seconds": sum(row["seconds"] for row in run.history),
        "eval_seconds": summary["seconds"],
        "flow_parameters": sum(p.numel() for p in run.model.flow.parameters()),
        "paper_nll": PAPER.get(name) if train.dataset == "binarized-mnist" else None,
        "history": [{k: row[k] for k in ("epoch", "train_bound", "valid_bound")} for row in run.history],
    }
    (out / "records").mkdir(parents=True, exist_ok=True)
    (out / "records" / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def write(out: Path, order: list[str]) -> list[Path]:
    """flows.json, flows.md and flows.png from the records in ``out/records``, in ``order``."""
    records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    order = list(dict.fromkeys(order))
    names = [n for n in order if n in records] + sorted(set(records) - set(order))
    rows = [records[n] for n in names]
    (out / "flows.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| guide | objective | test ELBO | log p(x), K=%s | gap | k-hat median | step | flow parameters "
             "| paper -ln p(x) |" % (rows[0]["iw"] if rows else "K"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        guide = r["guide"] + (f", K = {r['flow_length']}" if r["flow_length"] else "")
        paper = f"{r['paper_nll']:.1f}" if r["paper_nll"] else ""
        lines.append(f"| {guide} | {r['objective']} | {r['test_elbo']['mean']:.2f} ± {r['test_elbo']['data_se']:.2f} "
                     f"| {r['test_log_px']['mean']:.2f} ± {r['test_log_px']['data_se']:.2f} "
                     f"| {r['gap']['mean']:.2f} ± {r['gap']['data_se']:.2f} | {r['pareto_k']['median']:.2f} "
                     f"| {r['step_ms']:.1f} ms | {r['flow_parameters']:,} | {paper} |")
    if rows:
        r = rows[0]
        lines.append(f"\n{r['epochs']} epochs each; {r['test_images']} test images; ± one standard error over "
                     "images (the gap's paired).")
    lines += validation_table(out, names)
    (out / "flows.md").write_text("\n".join(lines) + "\n")
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for r in rows:
        axes[0].plot([h["epoch"] for h in r["history"]], [h["valid_bound"] for h in r["history"]], label=r["name"])
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("validation ELBO (nats per image)")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    pos = np.arange(len(rows))
    for key, label, marker in (("test_elbo", "test ELBO", "o"), ("test_log_px", "test log p(x)", "s")):
        axes[1].errorbar(pos, [r[key]["mean"] for r in rows], yerr=[r[key]["data_se"] for r in rows],
                         fmt=marker, capsize=3, label=f"{label} ± s.e.")
    paper = [(i, -r["paper_nll"]) for i, r in enumerate(rows) if r["paper_nll"]]
    if paper:
        axes[1].plot(*zip(*paper), "k_", ms=14, label="Rezende & Mohamed 2015")
    axes[1].set_xticks(pos, names, rotation=25, fontsize=8)
    axes[1].set_ylabel("nats per image")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.savefig(out / "flows.png", dpi=100)
    return [out / "flows.json", out / "flows.md", out / "flows.png"]


def validation_table(out: Path, order: list[str]) -> list[str]:
    """Markdown lines: the validation ELBO at every epoch of every run in ``out/runs``
    (``metrics.jsonl``), unfinished ones included, to compare guides at equal epochs."""
    curves = {}
    for path in sorted((out / "runs").glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        curves[path.parent.name] = {row["epoch"]: row["valid_bound"] for row in rows}
    names = [n for n in order if n in curves] + sorted(set(curves) - set(order))
    epochs = sorted({e for c in curves.values() for e in c})
    if not epochs:
        return []
    lines = ["\nValidation ELBO (2,000 images) after each epoch, every run (unfinished ones too):\n",
             "| run | " + " | ".join(str(e) for e in epochs) + " |", "| --- |" + " ---: |" * len(epochs)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{curves[n][e]:.2f}" if e in curves[n] else "" for e in epochs) + " |")
    return lines


def posterior_figures(out: Path, train: TrainConfig, model_config: dict[str, Any], data_dir: str | None,
                      device: str, guides: tuple[str, ...] = ("diagonal", "planar")) -> list[Path]:
    """2-D VAEs with each guide: q(z | x) beside p(z | x) for four test images."""
    written = []
    for guide in guides:
        objective = "meanfield" if guide == "diagonal" else "trace"
        run = fit("vae", {**model_config, "z_dim": 2, "guide": guide, "flow_length": 10},
                  dataclasses.replace(train, objective=objective), out / "runs" / f"2d-{guide}",
                  data_dir=data_dir, device=device, log=lambda line: click.echo(f"[2d-{guide}] {line}", err=True))
        x, _, _ = split_data(run, "test", 4, train.seed, data_dir)
        torch.manual_seed(train.seed)
        written.append(plots.posterior_pictures(run.model, x, run.model.image_shape or (1, 1, x.shape[1]),
                                                out / f"posteriors-{guide}.png",
                                                title=f"z = 2, {guide} guide" + (", K = 10" if guide != "diagonal" else "")))
    return written


@click.command()
@click.option("--dataset", default="binarized-mnist", show_default=True)
@click.option("--configs", default=DEFAULT_CONFIGS, show_default=True)
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--iw", default=5000, show_default=True, type=click.IntRange(min=2), help="K of the test log p(x)")
@click.option("--limit", type=click.IntRange(min=1), help="score this many random test images (default: all)")
@click.option("--eval-size", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="train and validation images scored after each epoch")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--out", default="experiments/results/flows", show_default=True, type=click.Path(file_okay=False))
@click.option("--posteriors", is_flag=True, help="also the 2-D posterior pictures")
@click.option("--quick", is_flag=True, help="toy data, a tiny VAE, short flows, 2 epochs, K=50")
def main(dataset: str, configs: str, epochs: int, iw: int, limit: int | None, eval_size: int, seed: int,
         device: str, data_dir: str | None, out: str, posteriors: bool, quick: bool) -> None:
    """Train the same VAE with each guide and compare the bounds."""
    out_dir = Path(out)
    model_config: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    names = configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            images, _ = toy_binary_images(300, seed=seed)
            dataset = str(Path(tmp) / "toy.npz")
            np.savez(dataset, train=images[:200], test=images[200:])
            epochs, iw, device = 2, 50, "cpu"
            model_config = {"z_dim": 2, "hidden": (16,)}
            extra = {"batch_size": 20, "lr": 3e-3}
            eval_size = 100
            if configs == DEFAULT_CONFIGS:
                names = ["diagonal", "diagonal-trace", "planar-2", "radial-2", "iaf-2", "sylvester-2"]
        train = TrainConfig(dataset=dataset, epochs=epochs, seed=seed, eval_size=eval_size, **extra)
        for name in names:
            r = run_config(name, out_dir, train, model_config, iw, limit, data_dir, device)
            click.echo(f"{name}: test ELBO {r['test_elbo']['mean']:.2f}, log p(x) {r['test_log_px']['mean']:.2f}, "
                       f"gap {r['gap']['mean']:.2f}, step {r['step_ms']:.1f} ms")
        written = write(out_dir, DEFAULT_CONFIGS.split(",") + names)
        if posteriors:
            written += posterior_figures(out_dir, train, model_config, data_dir, device)
    click.echo("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
