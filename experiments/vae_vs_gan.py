"""The VAE against the GAN in numbers, after Wu et al. 2017 ("On the quantitative analysis of
decoder-based generative models"): AIS log-likelihoods under a Gaussian observation model on
uniformly dequantized grey-level MNIST.

    python experiments/vae_vs_gan.py data OUT.npz
        MNIST's grey levels k in {0..255} as (k + u) / 256, u ~ U(0, 1) drawn once (seed 0):
        train / valid / test with their labels (50,000 / 10,000 / 10,000, the library's split).
    python experiments/vae_vs_gan.py score --gan RUN --vae RUN --out DIR [--images N --steps T ...]
        on the VAE run's data (dequantized MNIST): sigma of the GAN's N(G(z), sigma^2 I) chosen on validation images (the one with the
        highest AIS estimate on a grid), then on N test images AIS at each T for both models
        (the VAE scored by its own Gaussian likelihood, whose one scale it learned), BDMC on
        images simulated from each, samples side by side; writes DIR/results.json,
        DIR/table.md and DIR/samples.png.

The two runs are trained by ``pyro-vae fit gan`` and ``pyro-vae fit vae --likelihood
gaussian --gaussian-scale image`` with the same decoder network (PROVENANCE.md has the
commands).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pyro_vae import plots
from pyro_vae.ais import ais, bdmc
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import split_data
from pyro_vae.train import load_run

SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)


def make_data(out: Path, seed: int = 0) -> None:
    data = load_dataset("mnist", None, "none", 0.1, False, 0)
    gen = torch.Generator().manual_seed(seed)
    arrays = {}
    for name in ("train", "valid", "test"):
        k = (data.split(name) * 255).round()
        arrays[name] = ((k + torch.rand(k.shape, generator=gen)) / 256).view(-1, 28, 28).numpy().astype(np.float32)
        arrays[f"{name}_labels"] = data.labels[name].numpy()
    np.savez(out, **arrays)
    print(f"wrote {out}: " + ", ".join(f"{n} {arrays[n].shape[0]}" for n in ("train", "valid", "test")))


def _ais(model, x, steps, args, seed=0):
    return ais(model.model, model.guide, x, steps, chains=args.chains, leapfrog=args.leapfrog, start="prior",
               seed=seed, max_rows=args.max_rows)


def score(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gan, vae = load_run(args.gan), load_run(args.vae)
    results: dict = {"images": args.images, "chains": args.chains, "leapfrog": args.leapfrog, "steps": args.steps,
                     "bdmc_images": args.bdmc, "start": "prior", "gan_run": args.gan, "vae_run": args.vae}
    # the images scored are the VAE run's data, dequantized MNIST (the GAN may have trained on other data)
    valid, _, _ = split_data(vae, "valid", args.sigma_images, seed=1)
    choice = {}
    for sigma in SIGMAS:
        gan.model.set_observation("gaussian", sigma)
        begin = time.perf_counter()
        est = _ais(gan.model, valid, args.sigma_steps, args)
        choice[sigma] = est.log_px.mean().item()
        print(f"sigma {sigma}: AIS T={args.sigma_steps} on {len(valid)} validation images {choice[sigma]:.1f} "
              f"nats ({time.perf_counter() - begin:.0f} s)", flush=True)
    sigma = max(choice, key=choice.get)
    results["sigma_choice"] = {"images": len(valid), "steps": args.sigma_steps, "log_px": {str(k): v for k, v in choice.items()},
                               "sigma": sigma}
    gan.model.set_observation("gaussian", sigma)
    vae_sigma = float(vae.model.likelihood.scale.detach())
    results["vae_sigma"] = vae_sigma
    x, _, index = split_data(vae, "test", args.images, seed=0)
    rows = {}
    for name, run in (("gan", gan), ("vae", vae)):
        entry = rows[name] = {"ais": {}, "bdmc": {}}
        for steps in args.steps:
            begin = time.perf_counter()
            est = ais(run.model.model, run.model.guide, x, steps, chains=args.chains, leapfrog=args.leapfrog,
                      start="prior", seed=0, index=index, max_rows=args.max_rows)
            n = len(x)
            entry["ais"][steps] = {**est.summary(), "data_se": est.log_px.std().item() / math.sqrt(n),
                                   "seconds": time.perf_counter() - begin}
            print(f"{name} AIS T={steps}: {est.log_px.mean().item():.1f} nats ({time.perf_counter() - begin:.0f} s)",
                  flush=True)
            begin = time.perf_counter()
            b = bdmc(run.model.model, run.model.guide, x, args.bdmc, steps, chains=args.chains,
                     leapfrog=args.leapfrog, start="prior", seed=0, max_rows=args.max_rows)
            entry["bdmc"][steps] = {**b.summary(), "seconds": time.perf_counter() - begin}
            print(f"{name} BDMC T={steps}: gap {b.gap.mean().item():.2f} nats ({time.perf_counter() - begin:.0f} s)",
                  flush=True)
    results["models"] = rows
    (out / "results.json").write_text(json.dumps(results, indent=1))
    torch.manual_seed(0)
    samples = torch.cat([gan.model.sample(50).cpu(), vae.model.sample(50).cpu()])
    plots.image_grid(samples, vae.data_info["image_shape"], out / "samples.png", ncol=10,
                     title="GAN samples G(z) (top five rows), VAE means (bottom five), z ~ N(0, I)")
    write_table(results, out / "table.md")


def write_table(results: dict, path: Path) -> None:
    lines = [f"{results['images']} test images of dequantized MNIST; AIS from the prior, {results['chains']} chains, "
             f"{results['leapfrog']} leapfrog steps; BDMC on {results['bdmc_images']} images simulated from each model.",
             "", "| model | sigma | T | AIS log p(x) (nats/image) | data s.e. | BDMC lower | BDMC upper | BDMC gap |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        sigma = results["sigma_choice"]["sigma"] if name == "gan" else results["vae_sigma"]
        for steps, a in entry["ais"].items():
            b = entry["bdmc"][steps]
            lines.append(f"| {name} | {sigma:.3g} | {steps} | {a['log_px']['mean']:.1f} | {a['data_se']:.1f} | "
                         f"{b['lower']['mean']:.1f} | {b['upper']['mean']:.1f} | {b['gap']['mean']:.2f} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("out", type=Path)
    s = sub.add_parser("score")
    s.add_argument("--gan", required=True)
    s.add_argument("--vae", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--images", type=int, default=100)
    s.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    s.add_argument("--chains", type=int, default=16)
    s.add_argument("--leapfrog", type=int, default=10)
    s.add_argument("--bdmc", type=int, default=20)
    s.add_argument("--sigma-images", type=int, default=50)
    s.add_argument("--sigma-steps", type=int, default=100)
    s.add_argument("--max-rows", type=int, default=2000)
    args = parser.parse_args()
    if args.command == "data":
        make_data(args.out)
    else:
        score(args)


if __name__ == "__main__":
    main()
