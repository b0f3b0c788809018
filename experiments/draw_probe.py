"""A short probe of DRAW's first training steps on statically binarized MNIST: the loss
per image every 40 steps, with the write and read windows of a fresh decoder state
(centre x, centre y, stride, variance, intensity), for one attention and read size.

    python experiments/draw_probe.py ATTENTION STEPS READ_SIZE
    (e.g. filterbank 121 2, filterbank 121 5, none 121 2; PYRO_VAE_DATA as usual)

The sizes are those of experiments/draw_budget.sh (T = 10, LSTMs of 128, z of 10),
batches of 100 drawn at random, Adam 1e-3, seed 0, compiled steps.
"""

import sys
import time

import pyro
import torch

from pyro_vae import build_model, load_dataset, make_objective
from pyro_vae.compiled import CompiledLoss


def main(attention: str, steps: int, read_size: int) -> None:
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    data = load_dataset("binarized-mnist")
    model = build_model("draw", (1, 28, 28), {"steps": 10, "hidden": 128, "z_dim": 10, "read_size": read_size,
                                               "attention": attention})
    model.init_from_data(data, 0)
    step = CompiledLoss(model, make_objective("meanfield"))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = data.splits["train"]
    start = time.time()
    for i in range(steps):
        batch = x[torch.randint(0, len(x), (100,))]
        optimizer.zero_grad()
        loss = step((batch,), 1.0)
        loss.backward()
        optimizer.step()
        if i % 40 == 0:
            line = f"step {i}: loss {loss.item() / 100:.1f} nats per image"
            if attention == "filterbank":
                with torch.no_grad():
                    h = model.start(1).h
                    for name, att in (("write", model.writer), ("read", model.reader)):
                        line += f"; {name} " + " ".join(f"{v.item():.2f}" for v in att.window(h))
            print(f"{line}  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
