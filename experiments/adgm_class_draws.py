"""How an ADGM's predictions depend on the draws of the auxiliary latent a they average.

    python experiments/adgm_class_draws.py RUN... [--draws 1,4,16,100] [--out FILE]

Each RUN is a trained ``pyro-vae fit adgm`` run. Its classifier q(y | x) = E q(y | a, x)
over a ~ q(a | x) is estimated with each number of draws in ``--draws`` (``--class-draws``
of the run is what ``evaluate`` used) and, for comparison, with a plugged in at the mean
of q(a | x). For each it prints the test accuracy and ECE (test images binarized as
``evaluate`` binarizes them; fixed seed per run) and writes them as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from pyro_vae.errors import PyroVAEError
from pyro_vae.metrics import calibration
from pyro_vae.train import load_run


@torch.no_grad()
def scores(model, x: torch.Tensor, labels: torch.Tensor, draws: list[int], seed: int = 0) -> dict:
    """Accuracy and ECE of q(y | x) with each number of draws of a, and with a at its mean."""
    out, chunks = {}, [x[i : i + 1000] for i in range(0, len(x), 1000)]
    for k in draws:
        model.config.class_draws = k
        torch.manual_seed(seed)
        probs = torch.cat([model.classify(c) for c in chunks])
        out[str(k)] = {key: calibration(probs, labels)[key] for key in ("accuracy", "ece")}
    probs = torch.cat([torch.softmax(model.logits_given_aux(c, model.aux_encoder(c)[0]), -1) for c in chunks])
    out["mean"] = {key: calibration(probs, labels)[key] for key in ("accuracy", "ece")}
    return out


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--draws", default="1,4,16,100", show_default=True, help="numbers of draws of a, comma separated")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON file")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="dataset folder (default: $PYRO_VAE_DATA or ~/.cache/pyro_vae)")
def main(runs: tuple[Path, ...], draws: str, out: Path | None, data_dir: str | None) -> None:
    try:
        counts = [int(k) for k in draws.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {draws!r}", param_hint="--draws")
    if min(counts) < 1:
        raise click.BadParameter("every number of draws must be at least 1", param_hint="--draws")
    result = {}
    for run in runs:
        try:
            loaded = load_run(run)
            data = loaded.load_data(data_dir, download=False)
        except PyroVAEError as e:  # not a run, a damaged checkpoint, data gone: one line
            raise click.UsageError(f"{run}: {e}") from None
        if loaded.model_name != "adgm":
            raise click.UsageError(f"{run} is a {loaded.model_name} run; this measures adgm runs")
        result[run.name] = scores(loaded.model, data.eval_data("test"), data.labels["test"], counts)
        click.echo(run.name + "  " + "  ".join(f"{k}: {v['accuracy']:.4f} (ECE {v['ece']:.3f})"
                                              for k, v in result[run.name].items()))
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
