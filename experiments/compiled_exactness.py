"""How far the compiled training step is from eager code, at the default network sizes.

    python experiments/compiled_exactness.py [--out DIR]

For every family and objective that ``fit`` compiles (all but dreg), one step on a batch
of 100 random binary 28x28 images from the same generator state, eager and through
``CompiledLoss`` (traced on a first batch, then verified and run on a second): the loss
difference and the largest gradient difference relative to each parameter tensor's
largest entry (the measure the compiled path verifies against, ``compiled.TOLERANCE``).
The unit tests check the same on tiny networks; this is the default-size figure the
README quotes. Writes exactness.json into --out.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pyro
import torch

from pyro_vae import MODELS, CompiledLoss, build_model, make_objective
from pyro_vae.compiled import TOLERANCE, traceable_pyro


def step(model: torch.nn.Module, loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def measure(name: str, objective: str) -> dict:
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), {})
    obj = make_objective(objective, 5 if objective in ("iwae", "renyi") else 1)
    compiled = CompiledLoss(model, obj, 1.0)
    xs = torch.bernoulli(torch.full((3, 100, 784), 0.2))
    ys = torch.randint(0, 10, (3, 100))
    batches = [(x, x[:50], y[:50], 2.0) if model.has_classes else (x,) for x, y in zip(xs, ys)]
    with pyro.validation_enabled(False):
        compiled(batches[0], 1.0)  # traced
        compiled(batches[1], 1.0)  # verified
        state = torch.get_rng_state()
        with traceable_pyro():
            eager_loss, eager = step(model, model.training_loss(obj, batches[2], 1.0))
        torch.set_rng_state(state)
        traced_loss, traced = step(model, compiled(batches[2], 1.0))
    relative = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(traced, eager) if b.abs().max() > 0)
    return {"family": name, "objective": objective, "compiled": compiled.compiled.enabled,
            "loss": eager_loss, "loss_difference": abs(traced_loss - eager_loss),
            "largest_relative_gradient_difference": relative, "exact": relative == 0 and traced_loss == eager_loss}


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("experiments/results/compiled-exactness"), show_default=True)
def main(out: Path) -> None:
    rows = []
    for name in sorted(MODELS):
        for objective in MODELS[name].objectives:
            if objective == "dreg":
                continue
            row = measure(name, objective)
            rows.append(row)
            click.echo(f"{name:6} {objective:10} compiled {row['compiled']!s:5}  loss {row['loss']:12.3f}  "
                       f"difference {row['loss_difference']:.2e}  gradients {row['largest_relative_gradient_difference']:.1e}"
                       f" of their largest entry (tolerance {TOLERANCE:.0e})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "exactness.json").write_text(json.dumps(rows, indent=2) + "\n")
    click.echo(f"wrote {out / 'exactness.json'}")


if __name__ == "__main__":
    main()
