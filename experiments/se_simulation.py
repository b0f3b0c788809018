"""Which Monte Carlo error of log(mean w) covers under heavy tails? A simulation with a
known answer, the one behind the choice in ``pyro_vae.diagnostics.log_mean_exp_se``.

Target N(0, I_2) (normalized, so log p = 0), proposal N(0, c^2 I_2) with c < 1: the weights'
tail is Pareto with shape k = 1 - c^2. For every (K, c), B independent estimates
log(mean of K weights), and four standard errors of each:

- ``delta``: sd(w) / (sqrt K mean w), the sample sd of the raw weights (the old one);
- ``psis_smoothed``: the same with the sd of the PSIS-smoothed weights;
- ``groups``: the spread of log(mean) over 20 disjoint groups of the draws / sqrt(20);
- ``tail_aware``: ``log_mean_exp_se`` (the semi-parametric tail variance for k-hat < 1/2,
  the group spread scaled by the stable-law rate above).

Coverage of the truth (0) by +-1 and +-2 s.e., over the estimates with k-hat <= 0.7.

    python experiments/se_simulation.py [--estimates 1000] [--out experiments/results/calibration/se-simulation.json]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import torch

from pyro_vae.diagnostics import delta_method_se, log_mean_exp_se, psis


def standard_errors(lw: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    smoothed, k = psis(lw)
    K = lw.shape[0]
    shift = lw.max(0).values
    w_smooth = torch.exp(smoothed - shift)
    G = 20
    n = K // G
    groups = (torch.logsumexp(lw[: G * n].view(G, n, -1), 1) - math.log(n)).std(0) / math.sqrt(G)
    return k, {"delta": delta_method_se(lw),
               "psis_smoothed": w_smooth.std(0) / (math.sqrt(K) * torch.exp(lw - shift).mean(0)),
               "groups": groups,
               "tail_aware": log_mean_exp_se(lw, k)}


@click.command()
@click.option("--estimates", default=1000, show_default=True, type=click.IntRange(min=10))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default="experiments/results/calibration/se-simulation.json", show_default=True,
              type=click.Path(dir_okay=False))
def main(estimates: int, seed: int, out: str) -> None:
    """Coverage of four Monte Carlo errors of log(mean w) on Pareto-tailed weights."""
    torch.manual_seed(seed)
    d = 2
    rows = []
    for K in (1000, 5000):
        for c in (0.85, 0.8, 0.75, 0.7, 0.65, 0.6):
            z = torch.randn(K, estimates, d, dtype=torch.float64) * c
            lw = -0.5 * z.pow(2).sum(-1) + 0.5 * (z / c).pow(2).sum(-1) + d * math.log(c)
            est = torch.logsumexp(lw, 0) - math.log(K)
            k, ses = standard_errors(lw)
            ok = k <= 0.7
            row = {"K": K, "c": c, "k": 1 - c**2, "k_hat_median": k.median().item(),
                   "share_k_hat_above_0.7": (~ok).double().mean().item(),
                   "spread": est.std().item(), "bias": est.mean().item()}
            for name, se in ses.items():
                use = ok & torch.isfinite(se)
                z_abs = (est / se).abs()[use]
                row[name] = {"median_se": se[use].median().item(),
                             "coverage_1": (z_abs < 1).double().mean().item(),
                             "coverage_2": (z_abs < 2).double().mean().item()}
            rows.append(row)
            click.echo(f"K={K} k={1 - c**2:.2f} (k-hat {row['k_hat_median']:.2f}): " + ", ".join(
                f"{n} {row[n]['coverage_1']:.2f}/{row[n]['coverage_2']:.3f}" for n in ses))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1) + "\n")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
