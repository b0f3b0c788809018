"""How far the importance-weighted bounds sit from AIS, on one trained run.

    python experiments/bounds_vs_ais.py RUN --out DIR [--images N] [--ks ...] [--steps ...]
        [--chains C] [--leapfrog L] [--bdmc M]

On N fixed test images (a seeded random subset, keyed by their rows as the evaluator's):
the ELBO, IWAE-k for each k up to K = max(ks), the jackknife estimate of order 1 from the
same K draws, and AIS from the guide at each T; on M images simulated from the model, BDMC
at each T (forward and reverse AIS: the gap bounds, in expectation, AIS's error on data
like the model's). Compute is counted in evaluations of the model's networks per image:
K for IWAE-K (one pass of the decoder per draw), C (1 + (T - 1) L) for AIS (each a forward
and a backward pass of log p(x, z), so about twice the arithmetic of an IWAE draw).
Writes DIR/results.json, DIR/table.md and DIR/bounds-vs-ais.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from pyro_vae.ais import ais, bdmc
from pyro_vae.bounds import estimate_bounds
from pyro_vae.evaluation import split_data
from pyro_vae.train import load_run


def _mean_se(v: torch.Tensor) -> dict[str, float]:
    return {"mean": v.mean().item(), "data_se": v.std().item() / math.sqrt(v.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000, 5000])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--leapfrog", type=int, default=10)
    parser.add_argument("--bdmc", type=int, default=20)
    parser.add_argument("--start", default="guide")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(args.run)
    m = run.model
    x, _, index = split_data(run, "test", args.images, seed=0)
    K = max(args.ks)
    begin = time.perf_counter()
    est = estimate_bounds(m.model, m.guide, x, K, ks=sorted(set(args.ks) - {K}), index=index, seed=0)
    results: dict = {"run": args.run, "images": len(x), "chains": args.chains, "leapfrog": args.leapfrog,
                     "start": args.start, "bdmc_images": args.bdmc, "iw_seconds": time.perf_counter() - begin,
                     "elbo": _mean_se(est.elbo), "iwae": {}, "ais": {}, "bdmc": {}}
    for k in sorted(args.ks):
        v = est.log_px if k == K else est.iwae[k]
        results["iwae"][k] = {**_mean_se(v), "evaluations": k}
    results["jackknife"] = {**_mean_se(est.jackknife), "evaluations": K}
    results["pareto_k_share_above_0.7"] = (est.k_hat > 0.7).double().mean().item()
    print(f"ELBO {results['elbo']['mean']:.2f}  IWAE-{K} {est.log_px.mean():.2f}  jackknife "
          f"{est.jackknife.mean():.2f} ({results['iw_seconds']:.0f} s)", flush=True)
    for steps in args.steps:
        begin = time.perf_counter()
        a = ais(m.model, m.guide, x, steps, chains=args.chains, leapfrog=args.leapfrog, start=args.start, seed=0,
                index=index)
        results["ais"][steps] = {**_mean_se(a.log_px), "evaluations": a.gradient_evaluations,
                                 "minus_iwae_K": (a.log_px - est.log_px).mean().item(),
                                 "minus_jackknife": (a.log_px - est.jackknife).mean().item(),
                                 "acceptance": a.acceptance.mean().item(), "seconds": time.perf_counter() - begin}
        print(f"AIS T={steps}: {a.log_px.mean():.2f} ({results['ais'][steps]['seconds']:.0f} s)", flush=True)
        begin = time.perf_counter()
        b = bdmc(m.model, m.guide, x, args.bdmc, steps, chains=args.chains, leapfrog=args.leapfrog,
                 start=args.start, seed=0)
        results["bdmc"][steps] = {**b.summary(), "seconds": time.perf_counter() - begin}
        print(f"BDMC T={steps}: gap {b.gap.mean():.2f} ({results['bdmc'][steps]['seconds']:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, out / "table.md")
    figure(results, out / "bounds-vs-ais.png", title=Path(args.run).name)


def write_table(r: dict, path: Path) -> None:
    lines = [f"{r['images']} test images; AIS from the {r['start']}, {r['chains']} chains, {r['leapfrog']} leapfrog "
             f"steps; BDMC on {r['bdmc_images']} images simulated from the model.", "",
             "| estimate | network evaluations per image | log p(x) (nats/image) | data s.e. | BDMC gap (simulated) |",
             "|---|---|---|---|---|", f"| ELBO | 1 | {r['elbo']['mean']:.2f} | {r['elbo']['data_se']:.2f} | |"]
    for k, v in r["iwae"].items():
        lines.append(f"| IWAE-{k} | {v['evaluations']} | {v['mean']:.2f} | {v['data_se']:.2f} | |")
    j = r["jackknife"]
    lines.append(f"| jackknife (K = {j['evaluations']}) | {j['evaluations']} | {j['mean']:.2f} | {j['data_se']:.2f} | |")
    for t, v in r["ais"].items():
        gap = r["bdmc"][t]["gap"]["mean"]
        lines.append(f"| AIS, T = {t} | {v['evaluations']} | {v['mean']:.2f} | {v['data_se']:.2f} | {gap:.2f} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def figure(r: dict, path: Path, title: str = "") -> None:
    fig = Figure(figsize=(11, 4))
    ax = fig.add_subplot(1, 2, 1)
    ks = list(r["iwae"])
    ax.plot([r["iwae"][k]["evaluations"] for k in ks], [r["iwae"][k]["mean"] for k in ks], "o-", label="IWAE-k")
    ts = list(r["ais"])
    ax.plot([r["ais"][t]["evaluations"] for t in ts], [r["ais"][t]["mean"] for t in ts], "s-", label="AIS (T)")
    for t in ts:
        ax.annotate(f"T={t}", (r["ais"][t]["evaluations"], r["ais"][t]["mean"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    j = r["jackknife"]
    ax.plot([j["evaluations"]], [j["mean"]], "D", label="jackknife (from IWAE-K's draws)")
    ax.axhline(r["elbo"]["mean"], color="grey", ls=":", label="ELBO")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("estimate of log p(x) (nats per image, mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    right = fig.add_subplot(1, 2, 2)
    right.plot([int(t) for t in ts], [r["bdmc"][t]["gap"]["mean"] for t in ts], "o-")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("AIS distributions T")
    right.set_ylabel("BDMC gap: upper - lower (nats per image)")
    right.set_title(f"BDMC on {r['bdmc_images']} images simulated from the model", fontsize=9)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
