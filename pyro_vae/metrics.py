"""Scores of a trained model beyond its bounds: a classifier's accuracy and calibration,
a clustering's accuracy against the labels.

They take predictions and labels as tensors, so the families, the command line and the
experiments score the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

CALIBRATION_BINS = 15


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Accuracy, error, and the expected calibration error (Guo et al. 2017): predictions
    binned by confidence into ``bins`` equal-width bins, ECE = sum_b n_b/N |acc_b - conf_b|.
    ``calibration`` holds each bin's count, accuracy and mean confidence (the reliability
    diagram)."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    which = (confidence * bins).long().clamp(max=bins - 1)
    count = torch.bincount(which, minlength=bins).float()
    acc = torch.bincount(which, weights=correct, minlength=bins) / count.clamp(min=1)
    conf = torch.bincount(which, weights=confidence, minlength=bins) / count.clamp(min=1)
    ece = ((count / len(labels)) * (acc - conf).abs()).sum().item()
    accuracy = correct.mean().item()
    return {"accuracy": accuracy, "error": 1 - accuracy, "ece": ece,
            "calibration": {"count": count.tolist(), "accuracy": acc.tolist(), "confidence": conf.tolist()}}


def cluster_accuracy(assignment: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of points whose label is the majority label of their cluster (the usual
    unsupervised clustering accuracy when there are at least as many clusters as classes)."""
    majority: dict[int, int] = {}
    for c in assignment.unique().tolist():
        majority[c] = Counter(labels[assignment == c].tolist()).most_common(1)[0][0]
    mapped = torch.tensor([majority[c] for c in assignment.tolist()])
    return (mapped == labels.cpu()).float().mean().item()


def add_bits_per_dim(summary: dict[str, Any], dims: int) -> None:
    """Beside each bound and estimate in nats per image, the same in bits per dimension,
    -value / (D ln 2): the unit of the grey and colour image literature. Only for
    likelihoods of discrete data (log-masses, not densities)."""
    for entry in [summary["elbo"], summary["log_px"], *summary["iwae"].values(),
                  *([summary["jackknife"]] if "jackknife" in summary else [])]:
        entry["bits_per_dim"] = -entry["mean"] / (dims * math.log(2))
