"""Where the time of one evaluation chunk goes: ``log_weights`` for a batch of test images
and a chunk of particles, against the decoder alone, with torch's profiler table.

    python experiments/profile_evaluation.py RUN [--particles 20 --batch 100]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import click
import pyro
import torch
from torch.profiler import profile

from pyro_vae import load_run, log_weights
from pyro_vae.evaluation import split_data


def median_seconds(f: Callable[[], object], repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--particles", default=20, show_default=True)
@click.option("--batch", default=100, show_default=True)
def main(run_dir: str, particles: int, batch: int) -> None:
    run = load_run(run_dir)
    model = run.model
    x, _, _ = split_data(run, "test", limit=batch)
    z = torch.randn(particles, batch, model.config.z_dim)
    with torch.no_grad(), pyro.validation_enabled(False):
        chunk = median_seconds(lambda: log_weights(model.model, model.guide, x, particles))
        decoder = median_seconds(lambda: model.decoder(z))
        with profile() as prof:
            log_weights(model.model, model.guide, x, particles)
    click.echo(f"log_weights, {particles} particles x {batch} images: {1000 * chunk:.1f} ms; "
               f"decoder alone: {1000 * decoder:.1f} ms")
    click.echo(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
