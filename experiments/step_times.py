"""Median time of one training step (loss, backward, Adam) for model/objective pairs,
measured in interleaved rounds in one process on a random binary batch.

    python experiments/step_times.py [--batch 100 --rounds 10 --steps 5]

Prints one line per pair: the figures quoted in the README. The benchmark suite of the
performance work will supersede this script.
"""

from __future__ import annotations

import statistics
import time

import click
import pyro
import torch

from pyro_vae import build_model, make_objective

PAIRS = [
    ("vae", {}, "meanfield", 1),
    ("vae", {}, "iwae", 5),
    ("vae", {}, "dreg", 5),
    ("vae", {}, "iwae", 50),
    ("gmvae", {}, "enum", 1),
    ("gmvae", {"z_dim": 10, "hidden": (300, 300), "activation": "elu", "components": 500}, "enum", 1),
]


@click.command()
@click.option("--batch", default=100, show_default=True)
@click.option("--rounds", default=10, show_default=True, help="interleaved rounds over all pairs")
@click.option("--steps", default=5, show_default=True, help="timed steps per pair and round")
def main(batch: int, rounds: int, steps: int) -> None:
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((batch, 784), 0.2))
    setups = []
    for name, config, objective_name, particles in PAIRS:
        model = build_model(name, 784, config)
        setups.append((model, make_objective(objective_name, particles),
                       torch.optim.Adam(model.parameters(), lr=1e-3), []))
    # rounds interleave the pairs, so that machine noise hits all of them alike; the
    # first round is warm-up
    for r in range(rounds + 1):
        for model, objective, optimizer, times in setups:
            for _ in range(steps):
                start = time.perf_counter()
                with pyro.validation_enabled(False):  # as in the training loop after its first step
                    loss = objective.differentiable_loss(model.model, model.guide, x)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if r:
                    times.append(time.perf_counter() - start)
    base = statistics.median(setups[0][3])
    for (name, config, objective_name, particles), (*_, times) in zip(PAIRS, setups):
        median = statistics.median(times)
        click.echo(f"{name:6} {str(config or 'defaults'):72} {objective_name:9} k={particles:<3} "
                   f"{1000 * median:7.1f} ms  {median / base:5.2f}x the first")


if __name__ == "__main__":
    main()
