"""What every model family offers the training loop, the evaluator and the CLI.

A family is a ``PyroModule`` with ``model`` and ``guide`` methods and a config dataclass;
the hooks below have defaults that fit an unsupervised model trained on batches of
images, and a family overrides those that differ (the SSVAE's labelled batches and
classifier metrics, the GMVAE's figures)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pyro.nn import PyroModule

from ..data import Dataset


class Family(PyroModule):
    """Base class of the model families; see the module docstring."""

    Config: type
    default_objective: str
    default_particles = 1  # samples per datapoint in the default objective
    objectives: tuple[str, ...]  # the ELBO flavours that are correct for this pair

    def check_data(self, data: Dataset, seed: int) -> None:
        """Refuse data this family cannot train on, before the run directory is made."""

    def init_from_data(self, data: Dataset, seed: int) -> None:
        """Data-dependent initialisation before training: the decoder's output bias at the
        logit of the mean training pixel."""
        bias = self.decoder.net[-1].bias
        self.decoder.init_output_bias(data.split("train").float().mean(0).to(bias.device))

    def steps_per_epoch(self, data: Dataset, batch_size: int) -> int:
        """Optimizer steps in one epoch."""
        return data.num_batches(batch_size)

    def training_batches(self, data: Dataset, batch_size: int, epoch: int, seed: int,
                         device: torch.device, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """The arguments of ``training_loss`` for each step of one epoch, from step ``start``
        on; they must depend only on (seed, epoch) so that a resumed run is exact."""
        for x in data.train_batches(batch_size, epoch, seed, device, start=start):
            yield (x,)

    def training_loss(self, objective: Any, batch: tuple[torch.Tensor, ...], kl_weight: float) -> torch.Tensor:
        """The differentiable loss of one step, summed over the batch."""
        return objective.differentiable_loss(self.model, self.guide, *batch, kl_weight=kl_weight)

    def metrics(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        """Scores beyond the bounds (e.g. a classifier's accuracy), logged per epoch on
        validation data and reported by ``pyro-vae evaluate``."""
        return {}

    def figures(self, x: torch.Tensor, labels: torch.Tensor | None, image_shape: Any,
                directory: Path) -> list[Path]:
        """Figures particular to this family, drawn at the end of training and by
        ``pyro-vae plot``; ``x`` and ``labels`` are validation images and their classes
        (None when unknown)."""
        return []
