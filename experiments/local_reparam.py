"""The local reparameterization trick on a VAE with a Bayesian decoder (Kingma, Salimans &
Welling 2015), in two parts:

1. variance: the variance over minibatches, at fixed parameters, of the stochastic gradient
   of the ELBO (per datapoint, the weights' KL at batch / N) with respect to the decoder's
   weight-posterior locations and scales, in its top layer (next to z) and its bottom
   layer (next to x), for the three ways to draw the weights: ``shared`` (one draw per
   minibatch), ``local`` (pre-activations per datapoint) and ``independent`` (a weight
   draw per datapoint, the slow reference), with the time per step of each; at
   initialisation and after a short training with ``local``;
2. small data: a Bayesian decoder against the point-estimate decoder trained on 1,000 and
   5,000 random images of statically binarized MNIST's training split (10% of them held
   out for validation), each for the same epochs, scored by the evaluator on random test
   images.

    python experiments/local_reparam.py [--out DIR] [--batches 100] [--train-epochs 1]
        [--sizes 1000,5000] [--epochs 100] [--iw 1000] [--test-images 2000]
    python experiments/local_reparam.py --quick --out DIR      # toy data, < 1 min

Writes DIR/variance.json, DIR/small-data.json and DIR/tables.md (both tables), and keeps
the trained runs in DIR/runs/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyro
import torch

from pyro_vae import TrainConfig, build_model, fit, load_dataset, make_objective
from pyro_vae.bayesian import WEIGHT_SAMPLINGS
from pyro_vae.data import random_rows, toy_binary_images
from pyro_vae.evaluation import evaluate_run, split_data

#: the network of both parts: z of 20, one hidden layer of 200 (the decoder 20-200-784)
NETS = {"z_dim": 20, "hidden": (200,), "activation": "tanh"}


def gradient_variance(model: Any, x: torch.Tensor, sampling: str, batches: int, batch_size: int,
                      seed: int) -> dict[str, Any]:
    """Variance over ``batches`` random minibatches of the gradient of the per-datapoint
    ELBO estimate with respect to the top and bottom layers' posterior locations and
    (raw) scales, averaged over each tensor's elements; and the median seconds per
    forward and backward pass."""
    net = model.decoder.net
    net.sampling = sampling
    model.train()
    objective = make_objective("meanfield")
    layers = {"top": net.layers[0], "bottom": net.layers[-1]}
    params = [p for layer in layers.values() for p in (layer.loc, layer.raw_scale)]
    draws: list[list[torch.Tensor]] = [[] for _ in params]
    seconds = []
    gen = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    for _ in range(batches):
        rows = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        start = time.perf_counter()
        loss = model.training_loss(objective, (x[rows],), 1.0) / batch_size
        grads = torch.autograd.grad(loss, params)
        seconds.append(time.perf_counter() - start)
        for d, g in zip(draws, grads):
            d.append(g.flatten())
    variances = [torch.stack(d).var(0).mean().item() for d in draws]
    out: dict[str, Any] = {"sampling": sampling, "seconds_per_step": float(np.median(seconds))}
    for i, name in enumerate(layers):
        out[f"{name}_loc"] = variances[2 * i]
        out[f"{name}_scale"] = variances[2 * i + 1]
    return out


def variance_table(data_name: str, runs: Path, batches: int, batch_size: int, train_epochs: int,
                   quick: bool, log: Any) -> list[dict[str, Any]]:
    """Part 1: the gradient variances at initialisation and after ``train_epochs`` epochs."""
    train = TrainConfig(dataset=data_name, epochs=train_epochs, batch_size=batch_size, eval_size=500,
                        figures="none", objective="meanfield", seed=0)
    config = {**NETS, "bayesian": "decoder", "weight_sampling": "local"}
    if quick:
        config = {"z_dim": 2, "hidden": (16,), "bayesian": "decoder", "weight_sampling": "local"}
    data = train.load_data()
    pyro.set_rng_seed(0)
    init = build_model("vae", data.image_shape or (data.x_dim,), config)
    init.init_from_data(data, 0)
    trained = fit("vae", config, train, runs / "variance-trained", device="cpu", overwrite=True, log=log).model
    x = data.eval_data("train")
    rows = []
    for when, model in (("initialisation", init), (f"after {train_epochs} epoch(s)", trained)):
        for sampling in WEIGHT_SAMPLINGS:
            row = {"parameters": when, **gradient_variance(model, x, sampling, batches, batch_size, seed=1)}
            rows.append(row)
            log(json.dumps(row))
    return rows


def small_data(source: Any, sizes: list[int], epochs: int, iw: int, test_images: int, runs: Path, out: Path,
               quick: bool, log: Any) -> list[dict[str, Any]]:
    """Part 2: point-estimate and Bayesian decoders on the first n training images."""
    x_train, x_test = source
    rows = []
    config = NETS if not quick else {"z_dim": 2, "hidden": (16,)}
    # random rows, seeded: the split files are not shuffled (the test file's first images
    # are not like the rest); the smaller training set is part of the larger
    train_rows = random_rows(len(x_train), max(sizes), 0).numpy()
    test_rows = random_rows(len(x_test), min(test_images, len(x_test)), 1).numpy()
    for n in sizes:
        path = out / "runs" / f"subset-{n}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, train=x_train[train_rows[:n]], test=x_test[test_rows])
        for decoder, extra in (("point", {}), ("bayesian", {"bayesian": "decoder", "weight_sampling": "local"})):
            train = TrainConfig(dataset=str(path), epochs=epochs, batch_size=100, eval_size=1000, figures="none",
                                objective="meanfield", seed=0, binarize="none")
            start = time.perf_counter()
            run = fit("vae", {**config, **extra}, train, runs / f"small-{n}-{decoder}", device="cpu", overwrite=True)
            seconds = time.perf_counter() - start
            x, _, index = split_data(run, "test")
            summary, _ = evaluate_run(run, x, None, iw, index=index)
            best = max(run.history, key=lambda r: r["valid_bound"])
            row = {"train_images": n, "decoder": decoder, "epochs": epochs, "train_seconds": seconds,
                   "last_train_bound": run.history[-1]["train_bound"],
                   "last_valid_bound": run.history[-1]["valid_bound"],
                   "best_valid_epoch": best["epoch"], "test_elbo": summary["elbo"]["mean"],
                   "test_log_px": summary["log_px"]["mean"], "test_log_px_data_se": summary["log_px"]["data_se"],
                   "iw": iw, "test_images": summary["num_images"]}
            rows.append(row)
            log(json.dumps(row))
    return rows


def tables(variance: list[dict[str, Any]], small: list[dict[str, Any]]) -> str:
    lines = ["| parameters | weights drawn | top loc | top scale | bottom loc | bottom scale | ms per step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in variance:
        lines.append(f"| {r['parameters']} | {r['sampling']} | {r['top_loc']:.3g} | {r['top_scale']:.3g} | "
                     f"{r['bottom_loc']:.3g} | {r['bottom_scale']:.3g} | {1000 * r['seconds_per_step']:.1f} |")
    lines += ["", "| train images | decoder | epochs | train bound (last) | valid bound (last) | best valid epoch | "
              "test ELBO | test log p(x) (IWAE-K) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in small:
        lines.append(f"| {r['train_images']} | {r['decoder']} | {r['epochs']} | {r['last_train_bound']:.2f} | "
                     f"{r['last_valid_bound']:.2f} | {r['best_valid_epoch']} | {r['test_elbo']:.2f} | "
                     f"{r['test_log_px']:.2f} ± {r['test_log_px_data_se']:.2f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="experiments/results/local-reparam", show_default=True)
@click.option("--batches", default=100, show_default=True, help="minibatches per gradient variance")
@click.option("--batch-size", default=100, show_default=True)
@click.option("--train-epochs", default=1, show_default=True, help="epochs before the trained variances")
@click.option("--sizes", default="1000,5000", show_default=True, help="training set sizes of part 2")
@click.option("--epochs", default=100, show_default=True, help="epochs of part 2")
@click.option("--iw", default=1000, show_default=True, help="importance samples per test image")
@click.option("--test-images", default=2000, show_default=True)
@click.option("--part", type=click.Choice(["both", "variance", "small-data"]), default="both", show_default=True)
@click.option("--quick", is_flag=True, help="toy data and tiny budgets (a smoke test)")
def main(out: str, batches: int, batch_size: int, train_epochs: int, sizes: str, epochs: int, iw: int,
         test_images: int, part: str, quick: bool) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    if quick:
        images = toy_binary_images(400, seed=0)[0].reshape(400, -1).astype(np.float32)
        np.save(out_dir / "toy.npy", images)
        data_name, source = str(out_dir / "toy.npy"), (images[:300], images[300:])
        batches, batch_size, train_epochs, size_list, epochs, iw = 5, 20, 1, [100], 2, 10
    else:
        mnist = load_dataset("binarized-mnist")
        data_name = "binarized-mnist"
        source = (mnist.split("train").numpy(), mnist.split("test").numpy())
        size_list = [int(s) for s in sizes.split(",")]
    variance = small = []
    if part in ("both", "variance"):
        variance = variance_table(data_name, runs, batches, batch_size, train_epochs, quick, log)
        (out_dir / "variance.json").write_text(json.dumps(variance, indent=1))
    if part in ("both", "small-data"):
        small = small_data(source, size_list, epochs, iw, test_images, runs, out_dir, quick, log)
        (out_dir / "small-data.json").write_text(json.dumps(small, indent=1))
    if (out_dir / "variance.json").exists() and (out_dir / "small-data.json").exists():
        variance = json.loads((out_dir / "variance.json").read_text())
        small = json.loads((out_dir / "small-data.json").read_text())
        (out_dir / "tables.md").write_text(tables(variance, small))
    click.echo(f"wrote {out_dir}", err=True)


if __name__ == "__main__":
    sys.exit(main())
