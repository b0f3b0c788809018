"""Scoring a trained run: the bounds on log p(x) of a data split, and the family's own
metrics. Shared by ``pyro-vae evaluate``, ``pyro-vae cluster`` and the experiments."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .bounds import BoundEstimates, estimate_bounds
from .data import Dataset, random_rows
from .errors import DataError
from .distributed import current as current_world
from .train import Run


def split_data(run: Run, split: str = "test", limit: int | None = None, seed: int = 0,
               data_dir: str | Path | None = None, download: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A split of the run's dataset as evaluation sees it (binarized once with a fixed
    seed), on the model's device: ``(x, labels or None, row indices)``. ``limit`` takes
    that many rows at random (seeded), since some split files are sorted by class."""
    data = run.load_data(data_dir, download)
    x = nonempty_split(data, split)
    index = torch.arange(x.shape[0])
    if limit is not None and limit < x.shape[0]:
        index = random_rows(x.shape[0], limit, seed)
    labels = data.labels[split][index] if split in data.labels else None
    return x[index].to(next(run.model.parameters()).device), labels, index


def nonempty_split(data: Dataset, split: str) -> torch.Tensor:
    """The split as evaluation sees it, refused if it has no images."""
    if split not in data.splits or len(data.split(split)) == 0:
        raise DataError(f"{data.name} has no {split} images; choose another split")
    return data.eval_data(split)


def evaluate_run(run: Run, x: torch.Tensor, labels: torch.Tensor | None, num_particles: int, *,
                 seed: int = 0, ks: Sequence[int] | None = None, batch_size: int = 100,
                 max_rows: int = 2_000, progress: Callable[[int], None] | None = None,
                 index: torch.Tensor | None = None, compile: bool = True,
                 log: Callable[[str], None] | None = None) -> tuple[dict[str, Any] | None, BoundEstimates | None]:
    """ELBO, IWAE-k sweep and log p(x) with ``num_particles`` importance samples for every
    row of ``x`` (from ``split_data``), plus the family's metrics (e.g. accuracy, when
    ``labels`` are given). Returns the summary (as written to JSON) and the per-image
    estimates.

    The draws of each image are keyed by (``seed``, its row in the split: ``index``, by
    default 0..N-1), so an image's estimates are the same in any batch, chunk, subset or
    process. Under ``torchrun`` each process scores a contiguous block of the images and
    rank 0 gathers them: it returns the results, the other processes (None, None).
    ``compile`` runs each chunk as a trace (``bounds.estimate_bounds``: the same numbers,
    faster); ``log`` hears of its trace times, and of a fallback to eager code."""
    world = current_world()
    if world.size > x.shape[0]:
        raise DataError(f"{x.shape[0]} images cannot be shared among {world.size} processes: start at most "
                        f"{x.shape[0]} (torchrun --nproc-per-node), or score more images")
    index = torch.arange(x.shape[0]) if index is None else index
    mine = world.block(x.shape[0])
    start = time.perf_counter()
    est = estimate_bounds(run.model.model, run.model.guide, x[mine], num_particles, ks=ks,
                          batch_size=batch_size, max_rows=max_rows, progress=progress, seed=seed,
                          index=index[mine], compile=compile, log=log)
    parts = world.gather(est)
    if parts is None:
        return None, None
    est = BoundEstimates.cat(parts)
    torch.manual_seed(seed)  # for the family's metrics, should they draw
    summary = {"run": str(run.dir.path), "model": run.model_name, "seed": seed,
               "seconds": time.perf_counter() - start, "device": str(x.device), "processes": world.size,
               "likelihood": run.model.likelihood.name, **est.summary(), **run.model.metrics(x, labels)}
    if run.model.likelihood.discrete:
        add_bits_per_dim(summary, x.shape[1])
    return summary, est


def add_bits_per_dim(summary: dict[str, Any], dims: int) -> None:
    """Beside each bound and estimate in nats per image, the same in bits per dimension,
    -value / (D ln 2): the unit of the grey and colour image literature. Only for
    likelihoods of discrete data (log-masses, not densities)."""
    for entry in [summary["elbo"], summary["log_px"], *summary["iwae"].values(),
                  *([summary["jackknife"]] if "jackknife" in summary else [])]:
        entry["bits_per_dim"] = -entry["mean"] / (dims * math.log(2))
