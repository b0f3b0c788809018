"""Are the error bars on log p(x) honest? Repeated evaluations of the same images with
different seeds, against the standard errors each evaluation reports.

    python experiments/calibration.py RUN [RUN ...] [--iw 5000 --limit 100 --repeats 10]
    python experiments/calibration.py --quick --out DIR     # two tiny runs, seconds

For every run, R evaluations of the same random test images (seeds 0..R-1), each with K
importance samples, and per image:

- the empirical spread of the IWAE-K estimate over the repeats against the standard error
  each repeat reported: the tail-aware one (``pyro_vae.diagnostics.log_mean_exp_se``,
  reported only where k-hat <= 0.7) and the plain delta method;
- the coverage of the +-1 and +-2 SE intervals around each repeat's estimate, of the
  images' mean over the repeats (the truth is unknown);
- the Pareto k-hat of every image and repeat (histogram);
- the bias of IWAE-k for k up to K against the jackknife (JVI) estimate and against the
  IWAE-(R K) bound from all R K draws of an image pooled.

Then the same on the linear-Gaussian model of the tests, whose log p(x) is exact, with the
exact posterior mean and a guide narrower than the posterior (``--exact-width`` times its
marginal sd): coverage of the truth itself, and the biases against the truth.

Writes DIR/calibration.json and one figure per run (DIR/NAME.png).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import pyro
import torch
from matplotlib.figure import Figure

from pyro_vae import TrainConfig, estimate_bounds, fit, load_run
from pyro_vae.bounds import BoundEstimates
from pyro_vae.data import toy_binary_images
from pyro_vae.diagnostics import K_HAT_UNRELIABLE
from pyro_vae.exact import linear_gaussian
from pyro_vae.evaluation import split_data

NOMINAL = {"1": 0.6827, "2": 0.9545}


def repeat(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, repeats: int,
           max_rows: int, label: str) -> list[BoundEstimates]:
    """R evaluations of the same rows with seeds 0..R-1."""
    out = []
    with click.progressbar(length=repeats * len(x), label=label, file=sys.stderr) as bar:
        for r in range(repeats):
            pyro.set_rng_seed(r)
            out.append(estimate_bounds(model, guide, x, num_particles, max_rows=max_rows, progress=bar.update))
    return out


def _share(mask: torch.Tensor) -> float | None:
    return mask.double().mean().item() if mask.numel() else None


def analyse(ests: list[BoundEstimates], truth: torch.Tensor | None = None) -> dict[str, Any]:
    """Calibration of the reported errors over R repeats (rows: repeats, columns: images)."""
    K = ests[0].num_particles
    R = len(ests)
    est = torch.stack([e.log_px for e in ests]).double()  # (R, N)
    jk = torch.stack([e.jackknife for e in ests]).double()
    k_hat = torch.stack([e.k_hat for e in ests]).double()
    se_new = torch.stack([e.log_px_se for e in ests]).double()
    se_delta = torch.stack([e.log_px_se_delta for e in ests]).double()
    trusted = ~torch.stack([e.unreliable for e in ests])
    centre = est.mean(0) if truth is None else truth.double()
    spread = est.std(0)  # per image, over repeats
    record: dict[str, Any] = {
        "num_images": est.shape[1], "num_particles": K, "repeats": R,
        "against": "mean over repeats" if truth is None else "exact log p(x)",
        "pareto_k": {"median": k_hat.median().item(), "share_above_0.5": _share(k_hat > 0.5),
                     "share_above_0.7": _share(k_hat > 0.7), "share_above_1": _share(k_hat > 1),
                     "values": k_hat.flatten().tolist()},
        "spread_over_repeats": {"median": spread.median().item(), "max": spread.max().item()},
    }

    def calibration(se: torch.Tensor, use: torch.Tensor, values: torch.Tensor = est) -> dict[str, Any]:
        use = use & torch.isfinite(se)
        dev = (values - (values.mean(0) if truth is None else centre)).abs()
        ratio = spread / se.where(use, torch.nan).nanmedian(0).values  # per image
        ratio = ratio[torch.isfinite(ratio)]
        out = {"entries": int(use.sum()), "share_of_entries": _share(use),
               "coverage": {m: _share((dev < float(m) * se)[use]) for m in NOMINAL},
               "spread_over_reported": None if not ratio.numel() else
               {"median": ratio.median().item(), "max": ratio.max().item(),
                "values": ratio.tolist()}}
        return out

    everywhere = torch.ones_like(trusted)
    record["delta_method"] = calibration(se_delta, everywhere)
    record["tail_aware"] = calibration(se_new, trusted)
    # what it would say if not withheld (finite for k-hat < 1)
    record["tail_aware_unflagged_too"] = calibration(se_new, everywhere)
    record["jackknife"] = {"spread_median": jk.std(0).median().item(),
                           **calibration(se_new, trusted, jk)}
    # the dataset mean over the images: its spread over repeats against the reported mc_se
    means = est.mean(1)
    n = est.shape[1]
    record["dataset_mean"] = {
        "spread_over_repeats": means.std().item(), "values": means.tolist(),
        "reported_mc_se_delta": (se_delta.pow(2).sum(1).sqrt() / n).median().item(),
        "reported_mc_se": [e.summary()["log_px"]["mc_se"] for e in ests],
    }
    # biases: IWAE-k for every k in the sweep, JVI, against the reference(s)
    pooled = (torch.logsumexp(est, 0) - math.log(R)) if R > 1 else est[0]  # IWAE-(R K) per image
    iwae = {k: torch.stack([e.iwae[k] for e in ests]).double().mean(0) for k in ests[0].iwae}
    refs = {"jackknife": jk.mean(0), f"iwae_{R * K}_pooled": pooled}
    if truth is not None:
        refs = {"truth": centre, **refs}
    record["mean"] = {"iwae_K": est.mean().item(), "jackknife": jk.mean().item(),
                      f"iwae_{R * K}_pooled": pooled.mean().item(),
                      **({"truth": centre.mean().item()} if truth is not None else {})}
    record["bias"] = {name: {"iwae": {str(k): (v - ref).mean().item() for k, v in iwae.items()},
                             "jackknife": (jk.mean(0) - ref).mean().item(),
                             "jackknife_se": (jk - ref).mean(1).std().item() / math.sqrt(R) if R > 1 else None}
                      for name, ref in refs.items()}
    return record


def exact_bias(ests: list[BoundEstimates], truth: torch.Tensor) -> dict[str, float]:
    """Mean error of IWAE-K and of the jackknife estimate against the exact log p(x), over
    images and repeats, with their standard errors (spread over those R N estimates)."""
    out = {}
    for name, values in (("iwae", [e.log_px for e in ests]), ("jackknife", [e.jackknife for e in ests])):
        err = (torch.stack(values).double() - truth.double()).flatten()
        out[name], out[name + "_se"] = err.mean().item(), err.std().item() / math.sqrt(err.numel())
    return out


def figure(record: dict[str, Any], title: str, path: Path) -> Path:
    """Spread vs reported error, coverage, k-hat histogram, bias against k."""
    fig = Figure(figsize=(15, 3.8))
    ax = [fig.add_subplot(1, 4, i + 1) for i in range(4)]
    for key, label, colour in (("delta_method", "delta method", "tab:red"),
                               ("tail_aware_unflagged_too", "tail-aware (k-hat < 1, flagged too)", "tab:blue")):
        r = record[key]["spread_over_reported"]
        if r:
            ax[0].hist(np.log10(r["values"]), bins=20, alpha=0.5, color=colour, label=label)
    ax[0].axvline(0, color="k", lw=1)
    ax[0].set_xlabel("log10(spread over repeats / reported s.e.), per image")
    ax[0].set_ylabel("images")
    ax[0].legend(fontsize=7)
    ax[0].set_title("1 = honest", fontsize=9)
    names = [("delta_method", "delta"), ("tail_aware", "tail-aware,\nk-hat <= 0.7"),
             ("tail_aware_unflagged_too", "tail-aware,\nk-hat < 1 too")]
    for j, m in enumerate(NOMINAL):
        vals = [record[key]["coverage"][m] for key, _ in names]
        xs = np.arange(len(names)) + 0.38 * j
        ax[1].bar(xs, [v if v is not None else 0 for v in vals], width=0.36, label=f"+-{m} s.e.")
        ax[1].axhline(NOMINAL[m], color="k", lw=1, ls=":" if m == "1" else "--")
        for xv, v in zip(xs, vals):
            if v is None:
                ax[1].text(xv, 0.02, "none", ha="center", fontsize=7, rotation=90)
    ax[1].set_xticks(np.arange(len(names)) + 0.19, [label for _, label in names], fontsize=7)
    ax[1].set_ylim(0, 1)
    ax[1].set_title(f"coverage of the {record['against']}", fontsize=9)
    ax[1].legend(fontsize=7)
    ax[2].hist(record["pareto_k"]["values"], bins=30, color="tab:gray")
    for v in (0.5, 0.7):
        ax[2].axvline(v, color="k", ls="--", lw=1)
    ax[2].set_xlabel("Pareto k-hat (images x repeats)")
    ax[2].set_title(f"{100 * record['pareto_k']['share_above_0.7']:.0f}% above 0.7", fontsize=9)
    for name, style in zip(record["bias"], ("o-", "s--", "^:")):
        b = record["bias"][name]
        ks = [int(k) for k in b["iwae"]]
        line, = ax[3].plot(ks, list(b["iwae"].values()), style, ms=3, label=f"IWAE-k minus {name}")
        ax[3].axhline(b["jackknife"], color=line.get_color(), lw=1, alpha=0.6)
    ax[3].set_xscale("log")
    ax[3].set_xlabel("k")
    ax[3].set_ylabel("nats per image")
    ax[3].set_title(f"bias; lines: jackknife (K={record['num_particles']}) minus each", fontsize=9)
    ax[3].set_yscale("symlog", linthresh=0.01)
    ax[3].legend(fontsize=7)
    ax[3].grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def exact_model(num_points: int, width: float, seed: int = 1):
    """The tests' linear-Gaussian model (D = 5, d = 2), exact posterior mean, guide sd =
    ``width`` times the posterior's marginal sd; returns model, guide, data, log p(x), k."""
    lg = linear_gaussian(seed, width)
    x = lg.marginal.sample(torch.Size([num_points]))
    return lg.model, lg.guide, x, lg.marginal.log_prob(x), lg.k


def quick_runs(folder: Path) -> list[str]:
    """A tiny VAE and GMVAE trained for a few epochs on toy images (seconds)."""
    images, _ = toy_binary_images(300, seed=0)
    data = folder / "toy.npz"
    np.savez(data, train=images[:200], test=images[200:])
    train = TrainConfig(dataset=str(data), epochs=3, batch_size=20, lr=3e-3, eval_size=100)
    small = {"z_dim": 2, "hidden": (16,)}
    return [str(fit(name, small, train, folder / name, device="cpu").dir.path) for name in ("vae", "gmvae")]


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its per-entry lists (for the printed summary)."""
    return {k: (_strip(v) if isinstance(v, dict) else v) for k, v in record.items() if k != "values"}


@click.command()
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--iw", default=5000, show_default=True, type=click.IntRange(min=25), help="importance samples K")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=2),
              help="random test images per run")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=2), help="evaluations R")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test"]))
@click.option("--exact-points", default=100, show_default=True, type=click.IntRange(min=2),
              help="datapoints of the linear-Gaussian model (0 skips it)")
@click.option("--exact-width", default=0.75, show_default=True, type=float,
              help="guide sd / posterior marginal sd on the linear-Gaussian model")
@click.option("--max-rows", default=2_000, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--out", default="experiments/results/calibration", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="two tiny runs trained on the spot, K=200, 20 images, R=3")
def main(runs: tuple[str, ...], iw: int, limit: int, repeats: int, split: str, exact_points: int,
         exact_width: float, max_rows: int, device: str, data_dir: str | None, out: str, quick: bool) -> None:
    """Calibration of the Monte Carlo errors of log p(x) over repeated evaluations."""
    out_dir = Path(out)
    records: list[dict[str, Any]] = []
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            runs, iw, limit, repeats, exact_points = tuple(quick_runs(Path(tmp))), 200, 20, 3, 20
        if not runs and not exact_points:
            raise click.UsageError("name at least one run directory, or pass --quick")
        for path in runs:
            run = load_run(path, "last", device)
            x, _, index = split_data(run, split, limit, 0, data_dir)
            start = time.perf_counter()
            ests = repeat(run.model.model, run.model.guide, x, iw, repeats, max_rows, f"{path}: K={iw} x{repeats}")
            record = {"run": str(run.dir.path), "model": run.model_name, "split": split,
                      "rows": index.tolist(), "seconds": time.perf_counter() - start, **analyse(ests)}
            records.append(record)
            name = Path(path).name
            written.append(figure(record, f"{name} ({run.model_name}): {record['num_images']} {split} images, "
                                          f"K={iw}, {repeats} repeats", out_dir / f"{name}.png"))
        if exact_points:
            model, guide, x, truth, k_true = exact_model(exact_points, exact_width)
            start = time.perf_counter()
            ests = repeat(model, guide, x, iw, repeats, max(max_rows, 100_000), f"exact model: K={iw} x{repeats}")
            record = {"run": "linear-gaussian", "model": "exact", "guide_width": exact_width,
                      "k_true": k_true, "seconds": time.perf_counter() - start, **analyse(ests, truth)}
            by_k = {}
            for k in sorted({k for k in (10, 100, 1000) if k < iw} | {iw}):
                ests_k = ests if k == iw else repeat(model, guide, x, k, repeats, max(max_rows, 100_000),
                                                     f"exact model: K={k} x{repeats}")
                by_k[str(k)] = exact_bias(ests_k, truth)
            record["bias_against_truth_by_K"] = by_k
            records.append(record)
            written.append(figure(record, f"linear-Gaussian model, guide {exact_width} x posterior width "
                                          f"(true k = {k_true:.2f}), K={iw}, {repeats} repeats",
                                  out_dir / "exact.png"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calibration.json").write_text(json.dumps(records, indent=1) + "\n")
    written.append(out_dir / "calibration.json")
    for r in records:
        s = _strip(r)
        click.echo(f"{r['run']}: k-hat median {s['pareto_k']['median']:.2f}, >0.7 {s['pareto_k']['share_above_0.7']:.0%}; "
                   f"coverage +-1/+-2 s.e. delta {s['delta_method']['coverage']}, "
                   f"tail-aware {s['tail_aware']['coverage']} ({s['tail_aware']['entries']} trusted entries); "
                   f"bias {json.dumps({k: {'iwae_K': v['iwae'][str(r['num_particles'])], 'jackknife': v['jackknife']} for k, v in s['bias'].items()})}")
    click.echo("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
