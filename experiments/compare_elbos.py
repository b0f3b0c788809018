"""What does each ELBO flavour do to the model it trains? The same VAE (same networks,
data, epochs and seed) trained once per flavour, then compared on the test set:

- test ELBO and log p(x) (IWAE-K, K = 5000 by default), with standard errors;
- active latent units (Burda et al. 2016: Cov_x(E_q[z_i | x]) > 0.01);
- the signal-to-noise ratio |E g| / sd(g) of the gradient of each flavour's own
  objective, per parameter element, summarised by its median over the encoder's and over
  the decoder's parameters (Rainforth et al. 2018: tighter bounds can starve the encoder);
- the training budget in decoder evaluations (k particles cost k per image).

    python experiments/compare_elbos.py [--dataset binarized-mnist --epochs 100 --particles 5]
        [--flavours meanfield,trace,iwae,dreg,renyi] [--iw 5000] [--out DIR]
    python experiments/compare_elbos.py --quick --out DIR      # toy data, < 1 min

Writes DIR/elbos.json, DIR/elbos.csv, DIR/elbos.png (validation bound per epoch for each
flavour, and the test metrics), and keeps the trained runs in DIR/runs/.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyro
import torch
from matplotlib.figure import Figure

from pyro_vae import TrainConfig, fit, make_objective
from pyro_vae.data import toy_binary_images
from pyro_vae.evaluation import evaluate_run, split_data

SINGLE_SAMPLE = ("meanfield", "trace")  # flavours that take no --particles here


def active_units(model: Any, x: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across the data: Var_x E_q[z_i] > threshold."""
    with torch.no_grad():
        loc = torch.cat([model.encode(x[i : i + 1000])[0] for i in range(0, len(x), 1000)])
    return int((loc.var(0) > threshold).sum())


def gradient_snr(model: Any, objective: Any, x: torch.Tensor, draws: int, seed: int) -> dict[str, float]:
    """Median over parameter elements of |mean| / sd of the objective's gradient on ``x``,
    over ``draws`` independent draws, for the encoder and for the decoder."""
    groups = {"encoder": list(model.encoder.parameters()), "decoder": list(model.decoder.parameters())}
    samples: dict[str, list[torch.Tensor]] = {k: [] for k in groups}
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(False):
        for _ in range(draws):
            model.zero_grad()
            objective.differentiable_loss(model.model, model.guide, x).backward()
            for name, params in groups.items():
                samples[name].append(torch.cat([p.grad.flatten() for p in params]))
    out = {}
    for name, values in samples.items():
        g = torch.stack(values)
        snr = g.mean(0).abs() / g.std(0).clamp(min=1e-12)
        out[name] = snr.median().item()
    return out


def run_flavour(flavour: str, out: Path, train: TrainConfig, model_config: dict[str, Any],
                num_particles: int, snr_draws: int, data_dir: str | None, device: str) -> dict[str, Any]:
    """Train one flavour and score it."""
    run = fit("vae", model_config, train, out / "runs" / flavour, data_dir=data_dir, device=device,
              log=lambda line: click.echo(f"[{flavour}] {line}", err=True))
    x, labels, _ = split_data(run, "test", None, train.seed, data_dir)
    with click.progressbar(length=len(x), label=f"[{flavour}] K={num_particles}", file=sys.stderr) as bar:
        summary, _ = evaluate_run(run, x, labels, num_particles, seed=train.seed, progress=bar.update)
    snr = gradient_snr(run.model, make_objective(train.objective, train.particles, train.alpha),
                       x[:100], snr_draws, train.seed)
    images_seen = train.epochs * train.load_data(data_dir).split("train").shape[0]
    return {
        "flavour": flavour, "particles": train.particles, "epochs": train.epochs,
        "decoder_evaluations": images_seen * train.particles,
        "test_elbo": summary["elbo"], "test_log_px": summary["log_px"], "kl": summary["kl"],
        "active_units": active_units(run.model, x), "z_dim": run.model.config.z_dim,
        "snr_encoder": snr["encoder"], "snr_decoder": snr["decoder"],
        "train_seconds": sum(row["seconds"] for row in run.history),
        "history": [{k: row[k] for k in ("epoch", "train_bound", "valid_bound")} for row in run.history],
    }


def write(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """elbos.json, elbos.csv and elbos.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "elbos.json").write_text(json.dumps(records, indent=2) + "\n")
    columns = ["flavour", "particles", "epochs", "decoder_evaluations", "test_elbo", "test_elbo_se",
               "test_log_px", "test_log_px_se", "active_units", "z_dim", "snr_encoder", "snr_decoder",
               "train_seconds"]
    with open(out / "elbos.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in records:
            w.writerow([r["flavour"], r["particles"], r["epochs"], r["decoder_evaluations"],
                        r["test_elbo"]["mean"], r["test_elbo"]["data_se"], r["test_log_px"]["mean"],
                        r["test_log_px"]["data_se"], r["active_units"], r["z_dim"], r["snr_encoder"],
                        r["snr_decoder"], r["train_seconds"]])
    fig = Figure(figsize=(16, 4), layout="constrained")
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    names = [f"{r['flavour']}" + (f" k={r['particles']}" if r["particles"] > 1 else "") for r in records]
    for r, name in zip(records, names):
        axes[0].plot([h["epoch"] for h in r["history"]], [h["valid_bound"] for h in r["history"]], label=name)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("validation value of each flavour's own objective")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    pos = np.arange(len(records))
    for key, label, marker in (("test_elbo", "test ELBO", "o"), ("test_log_px", "test log p(x)", "s")):
        axes[1].errorbar(pos, [r[key]["mean"] for r in records], yerr=[r[key]["data_se"] for r in records],
                         fmt=marker, capsize=3, label=f"{label} ± s.e.")
    axes[1].set_xticks(pos, names, rotation=20, fontsize=8)
    axes[1].set_ylabel("nats per image")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[2].bar(pos - 0.2, [r["snr_encoder"] for r in records], 0.4, label="encoder")
    axes[2].bar(pos + 0.2, [r["snr_decoder"] for r in records], 0.4, label="decoder")
    axes[2].set_xticks(pos, names, rotation=20, fontsize=8)
    axes[2].set_ylabel("median gradient SNR |E g| / sd(g)")
    axes[2].set_yscale("log")
    axes[2].set_ylim(top=3 * max(max(r["snr_encoder"], r["snr_decoder"]) for r in records))
    axes[2].legend(fontsize=8, ncols=2, loc="upper center")
    fig.savefig(out / "elbos.png", dpi=100)
    return [out / "elbos.json", out / "elbos.csv", out / "elbos.png"]


@click.command()
@click.option("--dataset", default="binarized-mnist", show_default=True)
@click.option("--flavours", default="meanfield,trace,iwae,dreg,renyi", show_default=True)
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--particles", default=5, show_default=True, type=click.IntRange(min=2),
              help="k of iwae, dreg and renyi (meanfield and trace use one sample)")
@click.option("--alpha", default=0.5, show_default=True, type=float, help="alpha of renyi")
@click.option("--iw", default=5000, show_default=True, type=click.IntRange(min=2), help="K of the test log p(x)")
@click.option("--snr-draws", default=100, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--out", default="experiments/results/compare-elbos", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="toy data, a tiny VAE, 3 epochs, K=100")
def main(dataset: str, flavours: str, epochs: int, particles: int, alpha: float, iw: int, snr_draws: int,
         seed: int, device: str, data_dir: str | None, out: str, quick: bool) -> None:
    """Train the same VAE with each ELBO flavour and compare what comes out."""
    out_dir = Path(out)
    model_config: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            images, _ = toy_binary_images(300, seed=seed)
            dataset = str(Path(tmp) / "toy.npz")
            np.savez(dataset, train=images[:200], test=images[200:])
            epochs, iw, snr_draws, device = 3, 100, 20, "cpu"
            model_config = {"z_dim": 2, "hidden": (16,)}
        records = []
        for flavour in flavours.split(","):
            train = TrainConfig(dataset=dataset, epochs=epochs, objective=flavour, seed=seed, alpha=alpha,
                                particles=1 if flavour in SINGLE_SAMPLE else particles,
                                **({"batch_size": 20, "lr": 3e-3, "eval_size": 100} if quick else {}))
            records.append(run_flavour(flavour, out_dir, train, model_config, iw, snr_draws, data_dir, device))
            click.echo(f"{flavour}: test ELBO {records[-1]['test_elbo']['mean']:.2f}, log p(x) "
                       f"{records[-1]['test_log_px']['mean']:.2f}, active units {records[-1]['active_units']}, "
                       f"SNR encoder {records[-1]['snr_encoder']:.3f} decoder {records[-1]['snr_decoder']:.3f}")
        written = write(records, out_dir)
    click.echo("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
