"""The model space beyond binary MLPs: conv against MLP networks, grey-level likelihoods,
and data that is not MNIST, each trained and scored the same way.

    python experiments/model_space.py [--epochs 10] [--iw 5000] [--limit 500] [--out DIR]
    python experiments/model_space.py --quick --out DIR    # tiny data, seconds

Rows (same seed, same epochs within a group):

1. dynamically binarized MNIST, Bernoulli likelihood: the default MLP VAE against the
   conv encoder and decoder;
2. 8-bit grey-level MNIST with the discretized logistic likelihood: MLP and conv;
3. scikit-learn's 8x8 digits (1797 images, grey levels 0..16) through the user-array
   path: grey levels / 16 with the continuous Bernoulli, and the same levels as uint8
   (x * 255 / 16, rounded) with the discretized logistic.

Each row: test ELBO and log p(x) with ``--iw`` importance samples on ``--limit`` random
test images (0: all), in nats per image and, for discrete likelihoods, bits per dimension;
the median optimizer-step time over the epochs (the loop's own ``steps_seconds``); the
wall time of fit and of evaluate. Writes DIR/model_space.json and DIR/model_space.md; the
runs go under DIR/runs (their weights are not kept in the repository).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from pyro_vae import TrainConfig, fit, load_run, resume
from pyro_vae.evaluation import evaluate_run, evaluation_path, split_data, write_evaluation


def digits_files(folder: Path) -> tuple[Path, Path]:
    """scikit-learn's digits as two .npz files: grey levels / 16 as floats in [0, 1], and
    the same levels as uint8 multiples of 255 / 16 (8-bit data for the discretized
    logistic). The last 297 images are the test split, the rest training."""
    from sklearn.datasets import load_digits  # its wheel ships the data

    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "digits-float.npz", folder / "digits-uint8.npz"
    for path, x in zip(paths, (images, np.round(images * 255).astype(np.uint8))):
        np.savez(path, train=x[:1500], train_labels=labels[:1500], test=x[1500:], test_labels=labels[1500:])
    return paths


def toy_files(folder: Path) -> tuple[Path, Path]:
    """Stand-ins for --quick: 8x8 grey images of two prototypes, float and uint8."""
    rng = np.random.default_rng(0)
    protos = rng.random((2, 8, 8))
    x = np.clip(protos[rng.integers(0, 2, 300)] + 0.1 * rng.standard_normal((300, 8, 8)), 0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "toy-float.npz", folder / "toy-uint8.npz"
    for path, arr in zip(paths, (x.astype(np.float32), np.round(x * 255).astype(np.uint8))):
        np.savez(path, train=arr[:250], test=arr[250:])
    return paths


def rows(quick: bool, epochs: int, folder: Path) -> list[dict[str, Any]]:
    """(name, model config, training config) of every row."""
    if quick:
        grey, eight = toy_files(folder)
        mnist = {"dataset": str(eight), "binarize": "dynamic"}
        mnist8 = {"dataset": str(eight)}
        small = {"z_dim": 2, "hidden": (16,)}
        nets = [("mlp", small), ("conv", small)]
        digits_epochs = epochs
    else:
        grey, eight = digits_files(folder)
        mnist, mnist8 = {"dataset": "mnist"}, {"dataset": "mnist"}
        nets = [("mlp", {}), ("conv", {})]
        digits_epochs = 10 * epochs  # 15 steps an epoch
    out = []
    for net, base in nets:
        out.append({"group": "binary MNIST", "name": f"{net} VAE, bernoulli",
                    "model": {**base, "encoder": net, "decoder": net},
                    "train": {**mnist, "epochs": epochs}})
    for net, base in nets:
        out.append({"group": "8-bit MNIST", "name": f"{net} VAE, discretized logistic",
                    "model": {**base, "encoder": net, "decoder": net, "likelihood": "discretized-logistic"},
                    "train": {**mnist8, "epochs": epochs}})
    digits_net = {"z_dim": 2, "hidden": (16,)} if quick else {"z_dim": 10, "hidden": (200, 200)}
    out.append({"group": "8x8 digits", "name": "mlp VAE, continuous bernoulli",
                "model": {**digits_net, "likelihood": "continuous-bernoulli"},
                "train": {"dataset": str(grey), "epochs": digits_epochs}})
    out.append({"group": "8x8 digits", "name": "mlp VAE, discretized logistic",
                "model": {**digits_net, "likelihood": "discretized-logistic"},
                "train": {"dataset": str(eight), "epochs": digits_epochs}})
    return out


def run_row(row: dict[str, Any], run_dir: Path, iw: int, limit: int | None, eval_size: int,
            data_dir: str | None, device: str) -> dict[str, Any]:
    """Fit (continuing an unfinished run in ``run_dir``), then evaluate on the test split
    (reusing an evaluation with the same K and images)."""
    epochs = row["train"]["epochs"]
    if not (run_dir / "checkpoint.pt").is_file():
        fit("vae", row["model"], TrainConfig(**row["train"], eval_size=eval_size), run_dir,
            data_dir=data_dir, device=device, log=click.echo)
    elif len(load_run(run_dir).history) < epochs:
        resume(run_dir, data_dir=data_dir, device=device, log=click.echo)
    run = load_run(run_dir, "last", device)
    x, labels, index = split_data(run, "test", limit, 0, data_dir)
    path = evaluation_path(run, "test", iw, len(x))
    if path.is_file():
        summary = json.loads(path.read_text())
    else:
        summary, est = evaluate_run(run, x, labels, iw, seed=0)  # draws keyed by 0..N-1, as recorded
        write_evaluation(summary, est, path, "last", "test", index)
    steps = [h["steps_seconds"] / (h["step"] - (prev["step"] if prev else 0))
             for prev, h in zip([None, *run.history[:-1]], run.history)]
    return {**row, "run": str(run_dir), "images": len(x), "iw": iw,
            "elbo": summary["elbo"], "log_px": summary["log_px"], "likelihood": summary["likelihood"],
            "loop_step_ms": 1000 * statistics.median(steps),
            "fit_seconds": sum(h["seconds"] for h in run.history),  # steps and per-epoch scoring
            "eval_seconds": summary["seconds"], "epochs": len(run.history),
            "valid_bound": run.history[-1]["valid_bound"]}


def step_times(row_list: list[dict[str, Any]], rounds: int, steps: int, data_dir: str | None,
               device: str) -> dict[str, float]:
    """Median milliseconds of one optimizer step (batch 100) for every row's model, timed in
    interleaved rounds in this process, so that the machine's noise hits all rows alike."""
    import pyro
    import torch

    from pyro_vae import build_model, make_objective
    from pyro_vae.train import make_optimizer

    setups = {}
    for row in row_list:
        train = TrainConfig(**row["train"])
        data = train.load_data(data_dir)
        torch.manual_seed(0)
        model = build_model("vae", data.image_shape or (data.x_dim,), row["model"]).to(device)
        x = next(data.train_batches(100, 0, 0, device))
        setups[row["name"] + " / " + row["group"]] = (model, make_objective("meanfield"), make_optimizer(
            model.parameters(), 1e-3), x)
    times: dict[str, list[float]] = {name: [] for name in setups}
    pyro.enable_validation(False)  # as in the training loop after its first step
    for r in range(rounds + 1):  # round 0 warms up
        for name, (model, objective, optimizer, x) in setups.items():
            for _ in range(steps):
                start = time.perf_counter()
                loss = model.training_loss(objective, (x,), 1.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if r:
                    times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def table(records: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    def bits(st: dict[str, Any]) -> str:
        return f"{st['bits_per_dim']:.3f}" if "bits_per_dim" in st else "density"

    lines = ["| data | model | test images, K | test ELBO | log p(x) | bits/dim (ELBO / log p(x)) | step in the loop "
             "| fit | evaluate |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        lines.append(
            f"| {r['group']} | {r['name']} | {r['images']}, {r['iw']} | {r['elbo']['mean']:.2f} ± {r['elbo']['data_se']:.2f} | "
            f"{r['log_px']['mean']:.2f} ± {r['log_px']['data_se']:.2f} | {bits(r['elbo'])} / {bits(r['log_px'])} | "
            f"{r['loop_step_ms']:.1f} ms | {r['fit_seconds'] / 60:.1f} min | {r['eval_seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1),
              help="epochs of the MNIST rows (the digits rows train 10x as many: 15 steps an epoch)")
@click.option("--iw", default=5000, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", default=500, show_default=True, type=click.IntRange(min=0),
              help="random test images scored (0: all)")
@click.option("--eval-size", default=2000, show_default=True, type=click.IntRange(min=1),
              help="train and validation images scored after each epoch")
@click.option("--only", multiple=True, help="run only the rows whose name contains this (repeatable)")
@click.option("--out", default="experiments/results/model-space", show_default=True, type=click.Path(file_okay=False))
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True)
@click.option("--steps-only", is_flag=True,
              help="only time the rows' optimizer steps side by side (OUT/steps.json), no training")
@click.option("--quick", is_flag=True, help="tiny stand-in data, for the smoke test")
def main(epochs: int, iw: int, limit: int, eval_size: int, only: tuple[str, ...], out: str,
         data_dir: str | None, device: str, steps_only: bool, quick: bool) -> None:
    """Train and score every row; write model_space.json and model_space.md into OUT."""
    out_dir = Path(out)
    selected = [row for row in rows(quick, epochs, out_dir / "data")
                if not only or any(o in f"{row['group']} {row['name']}" for o in only)]
    if steps_only:
        times = step_times(selected, 1 if quick else 10, 1 if quick else 5, data_dir, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "steps.json").write_text(json.dumps(times, indent=2) + "\n")
        for name, ms in times.items():
            click.echo(f"{ms:8.2f} ms  {name}")
        return
    records = []
    for row in selected:
        name = f"{row['group']}-{row['name']}".replace(" ", "-").replace(",", "")
        click.echo(f"== {row['group']}: {row['name']}")
        records.append(run_row(row, out_dir / "runs" / name, iw, limit or None, eval_size, data_dir, device))
        click.echo(table(records[-1:]).splitlines()[-1])
    # rows run with other settings (--only) before stay, in the order of ``rows``
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model_space.json"
    done = {(r["group"], r["name"]): r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    done.update({(r["group"], r["name"]): r for r in records})
    order = [(r["group"], r["name"]) for r in rows(quick, epochs, out_dir / "data")]
    records = [done[key] for key in order if key in done]
    path.write_text(json.dumps(records, indent=2) + "\n")
    (out_dir / "model_space.md").write_text(table(records))
    click.echo(table(records))


if __name__ == "__main__":
    main()
