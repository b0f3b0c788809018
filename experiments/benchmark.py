"""The performance benchmark: our training steps and evaluator against hand-written plain
PyTorch yardsticks and the machine's own matmul rate, measured side by side in one run.

    python experiments/benchmark.py [--quick] [--device cpu|cuda] [--no-torch-compile] [--steps-only [--only TEXT]]
                                    [--end-to-end] [--out DIR]

1. step: one training step (loss, backward, the loop's fused Adam) of each model/objective
   pair, eager and compiled (``pyro_vae.compiled``: the trace that ``fit`` runs by
   default), against a plain PyTorch step of the same networks and the same math, written
   below, with the same optimizer, run eagerly and through ``torch.compile``
   (``--no-torch-compile`` leaves that out), and Pyro's own ``SVI.step`` with
   ``pyro.optim.Adam`` over the same pair. All run in interleaved rounds (machine noise
   hits them alike); medians after a warm-up round. Trace and compile times beside.
2. eval: log p(x) with K importance samples on the test set, in images x particles per
   second, eager and compiled in alternating blocks of images, against the matmul-bound
   rate: the decoder's dense matmuls alone, timed on the same shapes; peak memory of
   K=5000 and K=50000 evaluations (compiled, as ``evaluate`` runs) in fresh processes.
3. epoch: one epoch of ``fit`` on statically binarized MNIST, with the shares spent on
   the training steps, on producing the batches, and on the end-of-epoch monitoring.
4. end to end: the wall time of ``fit --epochs 1`` and of one more epoch on resume, each
   split into data, steps, scoring, writing (checkpoints, metrics, config), figures and
   the rest, beside a plain PyTorch loop of the same VAE over the same in-memory data that
   scores the same images and saves a checkpoint each epoch (``--end-to-end`` runs this
   part alone).

``--load N`` measures instead how the steps (compiled and plain) and the quickstart's
epoch (``fit vae`` with its defaults) fare on a busy machine: each in a fresh process,
with OpenMP's default wait policy (the old one) and with the command line's policy
(``pyro_vae.threads``: the new one), first on the machine as it is, then beside N
CPU-burning processes that the benchmark starts and stops itself. Writes load.json and
load.md (quiet and loaded side by side, for either policy) into --out.

Writes benchmark.json and benchmark.md (the README's table) into --out. ``--quick`` uses
random weights on toy data and few repeats: a smoke test, not a measurement.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyro
import torch
from pyro.infer import SVI
from torch.distributions import Normal
from torch.nn import functional as F

from pyro_vae import TrainConfig, build_model, estimate_bounds, fit, load_dataset, make_objective, resume
from pyro_vae import train as train_module
from pyro_vae.runs import RunDir, write_json, write_text
from pyro_vae.compiled import Compiled, CompiledLoss
from pyro_vae.pair import own_parameters
from pyro_vae.data import toy_binary_images
from pyro_vae.threads import apply_cli_policy
from pyro_vae.train import make_optimizer

VAE_NETS = {"784-200-200-50 tanh": {}, "784-400-20 tanh": {"hidden": (400,), "z_dim": 20}}


# --- plain PyTorch yardsticks: the same math as the Pyro objectives, written by hand ------

def _gaussian_draws(model: Any, x: torch.Tensor, k: int | None) -> tuple[torch.Tensor, ...]:
    loc, scale = model.encoder(x)
    eps = torch.randn((k, *loc.shape) if k else loc.shape, device=x.device)
    return loc, scale, loc + scale * eps


def _bernoulli_log_lik(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def plain_meanfield(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Negative ELBO, analytic KL to N(0, I), one draw: summed over the batch."""
    loc, scale, z = _gaussian_draws(model, x, None)
    kl = 0.5 * (loc ** 2 + scale ** 2 - 1).sum(-1) - scale.log().sum(-1)
    return -(_bernoulli_log_lik(model.decoder(z), x) - kl).sum()


def plain_iwae(k: int) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """Negative IWAE-k bound summed over the batch."""
    def loss(model: Any, x: torch.Tensor) -> torch.Tensor:
        loc, scale, z = _gaussian_draws(model, x, k)
        log_w = (_bernoulli_log_lik(model.decoder(z), x) + Normal(0.0, 1.0).log_prob(z).sum(-1)
                 - Normal(loc, scale).log_prob(z).sum(-1))
        return -(torch.logsumexp(log_w, 0) - math.log(k)).sum()
    return loss


def plain_gmvae(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Negative ELBO with the mixture prior's component summed out, Monte Carlo KL."""
    loc, scale, z = _gaussian_draws(model, x, None)
    prior = model.mixture
    log_pz = torch.logsumexp(torch.log_softmax(prior.logits, -1)
                             + Normal(prior.loc, prior.scale).log_prob(z.unsqueeze(-2)).sum(-1), -1)
    return -(_bernoulli_log_lik(model.decoder(z), x) + log_pz - Normal(loc, scale).log_prob(z).sum(-1)).sum()


def plain_ssvae_unlabelled(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Negative unlabelled M2 bound: sum_y q(y|x) ELBO(x, y) + H(q(y|x)), y enumerated by
    hand, one draw of z per label, Monte Carlo KL for z (as TraceEnum_ELBO computes it)."""
    c = model.config.classes
    log_q = torch.log_softmax(model.classifier(x), -1)  # (B, C)
    onehot = torch.eye(c, device=x.device).unsqueeze(1).expand(c, x.shape[0], c)
    xy = torch.cat([x.expand(c, *x.shape), onehot], -1)
    loc, scale, z = _gaussian_draws(model, xy, None)
    logits = model.decoder(torch.cat([z, onehot], -1))
    elbo_y = (_bernoulli_log_lik(logits, x) + Normal(0.0, 1.0).log_prob(z).sum(-1)
              - Normal(loc, scale).log_prob(z).sum(-1) - math.log(c))  # (C, B)
    q = log_q.exp().T
    return -((q * (elbo_y - log_q.T)).sum(0)).sum()


def plain_draw(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Negative DRAW ELBO (Bernoulli canvas), the analytic KL of every step, one draw per
    step: the recurrence written out over the family's modules, without Pyro."""
    s = model.start(x.shape[0])
    enc, kl = (s.h, s.c), 0.0
    for _ in range(model.config.steps):
        enc = model.encoder(torch.cat([model.read(x, x - torch.sigmoid(s.canvas), s.h), s.h], -1), enc)
        loc, scale = model.q_loc(enc[0]), F.softplus(model.q_scale(enc[0])) + 1e-6
        z = loc + scale * torch.randn_like(loc)
        kl = kl + 0.5 * (loc ** 2 + scale ** 2 - 1).sum(-1) - scale.log().sum(-1)
        h, c = model.decoder(z, (s.h, s.c))
        s = type(s)(h, c, s.canvas + model.write(h))
    return -(_bernoulli_log_lik(s.canvas, x) - kl).sum()


#: the DRAW of the binarized-MNIST runs (experiments/draw_budget.sh): T = 10, LSTMs of 128, z of 10
DRAW_SIZES = {"steps": 10, "hidden": 128, "z_dim": 10}


def step_pairs(quick: bool) -> list[dict[str, Any]]:
    """(label, model, our objective, plain loss) for the step benchmark."""
    pairs = []
    for net, config in VAE_NETS.items():
        pairs.append({"name": f"VAE meanfield, {net}", "model": ("vae", config), "objective": ("meanfield", 1),
                      "plain": plain_meanfield})
    for k in (5, 50):
        pairs.append({"name": f"IWAE k={k}, 784-200-200-50 tanh", "model": ("vae", {}), "objective": ("iwae", k),
                      "plain": plain_iwae(k)})
    pairs.append({"name": "GMVAE enum, 10 components", "model": ("gmvae", {}), "objective": ("enum", 1),
                  "plain": plain_gmvae})
    pairs.append({"name": "SSVAE unlabelled, y enumerated", "model": ("ssvae", {}), "objective": ("enum", 1),
                  "plain": plain_ssvae_unlabelled})
    for attention in ("none", "filterbank"):
        pairs.append({"name": f"DRAW {attention}, T=10 LSTM 128 z 10",
                      "model": ("draw", {**DRAW_SIZES, "attention": attention}), "shape": (1, 28, 28),
                      "objective": ("meanfield", 1), "plain": plain_draw})
    return pairs[:1] + pairs[4:6] if quick else pairs


def _sync_for(device: torch.device) -> Callable[[], None]:
    """What makes a timer see the device's queued work finished (nothing to do on CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _timed_step(loss_fn: Callable[[], Any], optimizer: torch.optim.Optimizer | None, sync: Callable[[], None]) -> float:
    """One step's time: loss, backward and the optimizer's step; without an optimizer,
    ``loss_fn`` is the whole step (Pyro's ``SVI.step``)."""
    start = time.perf_counter()
    loss = loss_fn()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return time.perf_counter() - start


SIDES = ("ours", "compiled", "svi", "plain", "plain_compiled")


def _torch_compiled(loss: Callable[[], torch.Tensor]) -> tuple[Callable[[], torch.Tensor] | None, float, str]:
    """``loss`` through torch.compile (inductor), its first call timed as the compile
    time; None and the reason where it fails (no C++ compiler, say)."""
    compiled = torch.compile(loss)
    start = time.perf_counter()
    try:
        compiled().backward()
    except Exception as e:  # the yardstick is optional: say why it is missing
        return None, 0.0, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    return compiled, time.perf_counter() - start, ""


def bench_steps(device: torch.device, rounds: int, steps: int, quick: bool, echo: Callable[[str], None],
                torch_compile: bool = True, only: str | None = None) -> list[dict]:
    """Median step time of ours (eager and compiled) and of the plain step (eager and
    through torch.compile) for every pair (those whose name contains ``only``, if given),
    interleaved rounds."""
    sync = _sync_for(device)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((100, 784), 0.2, device=device))
    entries = []
    for pair in [p for p in step_pairs(quick) if only is None or only in p["name"]]:
        name, config = pair["model"]
        ours = build_model(name, pair.get("shape", 784), config).to(device)
        traced, plain, plain_c, with_svi = (copy.deepcopy(ours) for _ in range(4))
        objective = make_objective(*pair["objective"])
        compiled = Compiled(traced, "step")

        def own(m: Any, o: Any) -> torch.Tensor:  # as the library's loop runs the pair
            with own_parameters():
                return o.differentiable_loss(m.model, m.guide, x)

        svi = SVI(with_svi.model, with_svi.guide, pyro.optim.Adam({"lr": 1e-4}), make_objective(*pair["objective"]))
        fns = {
            "ours": (lambda m=ours, o=objective: own(m, o), ours),
            "compiled": (lambda m=traced, o=objective, c=compiled: c(lambda x: own(m, o), (x,)), traced),
            "svi": (lambda svi=svi: svi.step(x), None),
            "plain": (lambda m=plain, f=pair["plain"]: f(m, x), plain),
        }
        entry = {"pair": pair, "times": {side: [] for side in SIDES}, "compile_s": None, "why": ""}
        with pyro.validation_enabled(False):
            fns["compiled"][0]().backward()  # traced here, verified in the warm-up round
        entry["trace_s"] = compiled.trace_seconds
        if torch_compile:
            fn, entry["compile_s"], entry["why"] = _torch_compiled(lambda m=plain_c, f=pair["plain"]: f(m, x))
            if fn is not None:
                fns["plain_compiled"] = (fn, plain_c)
        entry["run"] = {side: (fn, m and make_optimizer(m.parameters(), 1e-4)) for side, (fn, m) in fns.items()}
        entry["compiled"] = compiled
        entries.append(entry)
    with pyro.validation_enabled(False):
        for r in range(rounds + 1):  # round 0 warms up
            for entry in entries:
                for side, run in entry["run"].items():
                    for _ in range(steps):
                        t = _timed_step(*run, sync)
                        if r:
                            entry["times"][side].append(t)
    results = []
    for entry in entries:
        ms = {side: 1e3 * statistics.median(t) if t else None for side, t in entry["times"].items()}
        if not entry["compiled"].enabled:
            ms["compiled"] = None
        ratio = lambda a, b: ms[a] / ms[b] if ms[a] and ms[b] else None  # noqa: E731
        result = {"name": entry["pair"]["name"], "ours_ms": ms["ours"], "compiled_ms": ms["compiled"],
                  "plain_ms": ms["plain"], "plain_compiled_ms": ms["plain_compiled"], "svi_ms": ms["svi"],
                  "svi_vs_compiled": ratio("svi", "compiled"), "svi_vs_ours": ratio("svi", "ours"),
                  "ratio": ratio("ours", "plain"), "compiled_ratio": ratio("compiled", "plain"),
                  "compiled_vs_plain_compiled": ratio("compiled", "plain_compiled"),
                  "trace_seconds": entry["trace_s"], "torch_compile_seconds": entry["compile_s"],
                  "torch_compile_failed": entry["why"] or None, "compiled_off": entry["compiled"].reason or None,
                  "repeats": len(entry["times"]["ours"])}
        results.append(result)
        fmt = lambda v, unit=" ms": "-" if v is None else f"{v:.2f}{unit}"  # noqa: E731
        echo(f"step  {result['name']:40} ours {fmt(ms['ours'])}, compiled {fmt(ms['compiled'])}; plain "
             f"{fmt(ms['plain'])}, torch.compile'd {fmt(ms['plain_compiled'])}; ratios "
             f"{fmt(result['ratio'], 'x')}, compiled {fmt(result['compiled_ratio'], 'x')} "
             f"({fmt(result['compiled_vs_plain_compiled'], 'x')} of torch.compile'd); trace {entry['trace_s']:.2f} s"
             + (f", torch.compile {entry['compile_s']:.1f} s" if entry["compile_s"] else "")
             + (f" (torch.compile failed: {entry['why']})" if entry["why"] else "")
             + f"; Pyro's SVI {fmt(ms['svi'])} ({fmt(result['svi_vs_compiled'], 'x')} of compiled)")
    return results


# --- evaluation -----------------------------------------------------------------------------

def decoder_flops(model: Any) -> int:
    """Multiply-adds x 2 of the decoder's linear layers for one (image, particle) pair."""
    return sum(2 * m.in_features * m.out_features for m in model.decoder.modules() if isinstance(m, torch.nn.Linear))


def matmul_rate(model: Any, device: torch.device, rows: int, repeats: int) -> float:
    """(image, particle) pairs per second that the decoder's matmuls alone allow: the
    layers' weight shapes multiplied on ``rows`` random inputs, median of ``repeats``."""
    sync = _sync_for(device)
    weights = [m.weight.detach().T.contiguous() for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, w.shape[0], device=device) for w in weights]
    times = []
    with torch.no_grad():
        for r in range(repeats + 1):
            sync()
            start = time.perf_counter()
            for a, w in zip(inputs, weights):
                a @ w
            sync()
            if r:
                times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def peak_memory_mb(particles: int, images: int, device: str) -> float:
    """Peak resident memory (CPU) or peak allocated GPU memory of a fresh process that
    evaluates ``images`` test images with ``particles`` importance samples."""
    out = subprocess.run([sys.executable, __file__, "--memory-probe", str(particles), "--probe-images",
                          str(images), "--device", device], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_probe(particles: int, images: int, device: torch.device) -> None:
    model = build_model("vae", 784, {}).to(device)
    x = torch.bernoulli(torch.full((images, 784), 0.2, device=device))
    if particles:  # 0: the process's own footprint, for reference
        estimate_bounds(model.model, model.guide, x, particles, compile=True)
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2 ** 20)
    else:  # the high-water mark of this process's own memory (ru_maxrss would include the parent's)
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        print(int(hwm.split()[1]) / 1024)


def bench_eval(device: torch.device, x: torch.Tensor, particles: int, memory_images: int,
               memory_particles: tuple[int, ...], echo: Callable[[str], None], blocks: int = 10) -> dict[str, Any]:
    """Our estimator's rate on ``x``, eager and compiled in alternating blocks of images
    (each mode sees every image once), against the matmul-bound rate, and peak memory."""
    sync = _sync_for(device)
    torch.manual_seed(0)
    model = build_model("vae", 784, {}).to(device)
    bound = matmul_rate(model, device, rows=2000, repeats=20)  # before: the machine as the run finds it
    seconds = {"eager": 0.0, "compiled": 0.0}
    size = -(-x.shape[0] // blocks)
    for i, start in enumerate(range(0, x.shape[0], size)):
        for mode in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            sync()
            t = time.perf_counter()
            estimate_bounds(model.model, model.guide, x[start : start + size], particles, seed=i,
                            compile=mode == "compiled")
            sync()
            seconds[mode] += time.perf_counter() - t
    bound = max(bound, matmul_rate(model, device, rows=2000, repeats=20))  # and after
    rate = {mode: x.shape[0] * particles / s for mode, s in seconds.items()}
    result = {"images": x.shape[0], "particles": particles, "blocks": blocks,
              "seconds": seconds["eager"], "rate": rate["eager"], "share_of_matmul_rate": rate["eager"] / bound,
              "compiled_seconds": seconds["compiled"], "compiled_rate": rate["compiled"],
              "compiled_share_of_matmul_rate": rate["compiled"] / bound, "matmul_rate": bound,
              "decoder_flops_per_pair": decoder_flops(model),
              "peak_memory_mb": {str(k): peak_memory_mb(k, memory_images, device.type) for k in (0, *memory_particles)}}
    echo(f"eval  {x.shape[0]} images x K={particles}: eager {seconds['eager']:.1f} s, {rate['eager']:,.0f} pairs/s "
         f"({rate['eager'] / bound:.0%}); compiled {seconds['compiled']:.1f} s, {rate['compiled']:,.0f} pairs/s "
         f"({rate['compiled'] / bound:.0%} of the matmul bound, {bound:,.0f} pairs/s); peak memory "
         + ", ".join(f"K={k}: {v:.0f} MB" for k, v in result["peak_memory_mb"].items()) + " (K=0: no evaluation)")
    return result


# --- epoch ----------------------------------------------------------------------------------

def bench_epoch(device: torch.device, dataset: str, data_dir: str | None, echo: Callable[[str], None]) -> dict[str, Any]:
    """One epoch of ``fit`` for the VAE, its end-of-epoch scoring by the loop's own clock;
    then, on the same model and data, the batches alone and the steps alone on batches
    made beforehand."""
    sync = _sync_for(device)
    train = TrainConfig(dataset=dataset, epochs=1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = fit("vae", {}, train, Path(tmp) / "run", data_dir=data_dir, device=device.type, download=False)
        wall = time.perf_counter() - start
    row = run.history[0]
    epoch = row["seconds"]
    model, data = run.model, train.load_data(data_dir, download=False)
    start = time.perf_counter()
    batches = list(model.training_batches(data, train.batch_size, 1, train.seed, device))
    sync()
    data_seconds = time.perf_counter() - start
    objective = make_objective("meanfield", 1)
    optimizer = make_optimizer(model.parameters(), train.lr)
    step_loss = CompiledLoss(model, objective, 1.0, enabled=train.compile)  # as the loop runs it
    with pyro.validation_enabled(False):
        start = time.perf_counter()
        for batch in batches:
            _timed_step(lambda b=batch: step_loss(b, 1.0), optimizer, lambda: None)
        sync()
        step_seconds = time.perf_counter() - start
    result = {"dataset": Path(dataset).name, "steps": len(batches), "epoch_seconds": epoch, "fit_wall_seconds": wall,
              "loop_steps_seconds": row["steps_seconds"], "scoring_seconds": epoch - row["steps_seconds"],
              "steps_seconds": step_seconds, "batches_seconds": data_seconds,
              "batches_share": data_seconds / epoch,
              "scoring_share": (epoch - row["steps_seconds"]) / epoch}
    echo(f"epoch {result['dataset']}: {epoch:.2f} s, of which scoring {result['scoring_seconds']:.2f} s; "
         f"{len(batches)} steps alone {step_seconds:.2f} s, batches alone {data_seconds:.3f} s; batches "
         f"{result['batches_share']:.1%}, scoring {result['scoring_share']:.1%}")
    return result


# --- end to end ---------------------------------------------------------------------------

#: the parts of a ``fit`` call and the functions whose time makes each (none calls another)
FIT_PARTS = {
    "data": [(TrainConfig, "load_data")],
    "steps": [(train_module, "_epoch_steps")],
    "scoring": [(train_module, "_score_epoch")],
    "writing": [(RunDir, "save_checkpoint"), (RunDir, "write_metrics"), (RunDir, "write_json")],
    "figures": [(train_module, "_sample_figure"), (train_module, "_closing_figures")],
    "report": [(train_module, "_report_epoch")],  # the log line, TensorBoard, samples taken
}
CORE = ("steps", "scoring", "writing")


@contextlib.contextmanager
def timed_parts(parts: dict[str, list[tuple[Any, str]]],
                sync: Callable[[], None]) -> Iterator[tuple[dict[str, float], list[tuple[str, float, float]]]]:
    """Seconds spent in each part's functions while the block runs (they are wrapped with a
    clock, and put back after; a part called inside another counts as its own, not the
    caller's), and each call as (part, start, end)."""
    seconds = dict.fromkeys(parts, 0.0)
    calls: list[tuple[str, float, float]] = []
    inner = [0.0]  # time of the parts called inside the call under way
    saved = []
    for key, targets in parts.items():
        for owner, name in targets:
            original = getattr(owner, name)

            def timed(*args: Any, _f: Callable = original, _key: str = key, **kwargs: Any) -> Any:
                outer, inner[0] = inner[0], 0.0
                start = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    sync()
                    end = time.perf_counter()
                    seconds[_key] += end - start - inner[0]
                    inner[0] = outer + end - start
                    calls.append((_key, start, end))

            setattr(owner, name, timed)
            saved.append((owner, name, original))
    try:
        yield seconds, calls
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _split(wall: float, seconds: dict[str, float], calls: list[tuple[str, float, float]]) -> dict[str, Any]:
    """A call's wall time and its parts, the rest as "other", and the wall time over the
    steps, scoring and writing; and each epoch in the loop (from its first step to the
    end of its report) over the steps, scoring and writing inside it."""
    epochs = []
    for begin in (start for key, start, _ in calls if key == "steps"):
        end = min(e for key, start, e in calls if key == "report" and start > begin)
        core = sum(e - start for key, start, e in calls if key in CORE and begin <= start and e <= end)
        epochs.append({"seconds": end - begin, "core": core, "over_core": (end - begin) / core})
    return {"wall": wall, **seconds, "other": wall - sum(seconds.values()),
            "wall_over_core": wall / sum(seconds[k] for k in CORE), "epochs": epochs}


def plain_epoch(model: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor, scored: list[torch.Tensor],
                batch_size: int, epoch: int, path: Path, sync: Callable[[], None]) -> dict[str, float]:
    """One epoch of a plain PyTorch loop of the VAE on in-memory binary images ``x``: the
    shuffled batches, the steps (``plain_meanfield``, the loop's Adam), the ELBO on the
    ``scored`` images, and ``torch.save`` of the model and optimizer; seconds of each."""
    clock = {"start": time.perf_counter()}

    def lap(key: str) -> None:
        sync()
        now = time.perf_counter()
        clock[key], clock["start"] = now - clock["start"], now

    batches = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))].split(batch_size)
    lap("data")
    for batch in batches:
        loss = plain_meanfield(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    lap("steps")
    with torch.no_grad():
        [sum(-plain_meanfield(model, chunk).item() for chunk in images.split(1000)) / len(images) for images in scored]
    lap("scoring")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}, path)
    lap("writing")
    del clock["start"]
    wall = sum(clock.values())
    return {"wall": wall, **clock, "wall_over_core": wall / (clock["steps"] + clock["scoring"] + clock["writing"])}


def bench_end_to_end(device: torch.device, dataset: str, data_dir: str | None,
                     echo: Callable[[str], None]) -> dict[str, Any]:
    """``fit`` of the VAE for one epoch, then ``resume`` for a second, each split into its
    parts; then two epochs of the plain loop on the same data, model shape and scored
    images."""
    sync = _sync_for(device)
    train = TrainConfig(dataset=dataset, epochs=1)
    result: dict[str, Any] = {"dataset": Path(dataset).name, "figures": train.figures}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        for name, call in (("fit", lambda: fit("vae", {}, train, run_dir, data_dir=data_dir, device=device.type,
                                               download=False)),
                           ("resume", lambda: resume(run_dir, epochs=2, data_dir=data_dir, device=device.type,
                                                     download=False))):
            with timed_parts(FIT_PARTS, sync) as (seconds, calls):
                start = time.perf_counter()
                run = call()
                sync()
                wall = time.perf_counter() - start
            result[name] = _split(wall, seconds, calls)
        steps = run.history[-1]["step"] - run.history[0]["step"]
        data = train.load_data(data_dir, download=False)
        x = data.train_batches(len(data.splits["train"]), 0, train.seed, device)
        x = next(x)  # the binarized training images, in memory
        rows = {s: torch.randperm(len(data.split(s)), generator=torch.Generator().manual_seed(train.seed))[
            : train.eval_size] for s in ("train", "valid")}
        scored = [data.eval_data(s)[rows[s]].to(device) for s in ("train", "valid")]
        torch.manual_seed(train.seed)
        model = build_model("vae", data.x_dim, {}).to(device)
        optimizer = make_optimizer(model.parameters(), train.lr)
        result["plain"] = [plain_epoch(model, optimizer, x, scored, train.batch_size, epoch, Path(tmp) / "plain.pt",
                                       sync) for epoch in range(2)]
    result["steps_per_epoch"] = steps
    for name in ("fit", "resume"):
        r = result[name]
        echo(f"end to end, {name}: {r['wall']:.2f} s = data {r['data']:.2f} + steps {r['steps']:.2f} + scoring "
             f"{r['scoring']:.2f} + writing {r['writing']:.2f} + figures {r['figures']:.2f} + report {r['report']:.2f} + other "
             f"{r['other']:.2f} s; {r['wall_over_core']:.2f}x the steps, scoring and writing; the epoch in the "
             f"loop {r['epochs'][-1]['seconds']:.2f} s, {r['epochs'][-1]['over_core']:.2f}x its steps, scoring "
             "and writing")
    for epoch, r in enumerate(result["plain"], 1):
        echo(f"end to end, plain loop epoch {epoch}: {r['wall']:.2f} s = batches {r['data']:.3f} + steps "
             f"{r['steps']:.2f} + scoring {r['scoring']:.2f} + checkpoint {r['writing']:.3f} s")
    return result


def end_to_end_table(e: dict[str, Any]) -> str:
    """The end-to-end rows: ours (fit, then resume) and the plain loop's two epochs."""
    cell = lambda r, key: f"{r[key]:.2f}" if key in r else "-"  # noqa: E731
    lines = [f"End to end on {e['dataset']} (VAE 784-200-200-50, {e['steps_per_epoch']} steps an epoch, "
             f"--figures {e['figures']}), seconds:", "",
             "| run | wall | data | steps | scoring | writing | figures | report | other | wall / (steps + scoring + writing) "
             "| the epoch in the loop / its (steps + scoring + writing) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = [("fit --epochs 1", e["fit"]), ("resume, one more epoch", e["resume"]),
            *((f"plain PyTorch loop, epoch {i}", r) for i, r in enumerate(e["plain"], 1))]
    for label, r in rows:
        epoch = r["epochs"][-1] if "epochs" in r else {"seconds": r["wall"], "over_core": r["wall_over_core"]}
        lines.append(f"| {label} | " + " | ".join(cell(r, k) for k in ("wall", "data", "steps", "scoring", "writing",
                                                                    "figures", "report", "other"))
                     + f" | {r['wall_over_core']:.2f}x | {epoch['seconds']:.2f} s, {epoch['over_core']:.2f}x |")
    lines += ["", "The plain loop's data are in memory already; its epoch is all of its wall time. The first "
              "fit pays the process's first-use imports (in other) and, on a first start, the parsing of the "
              "data (in data); the figures are drawn when training ends (--figures end)."]
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    """The README's performance table. The epoch row gives the parts measured directly
    (batches alone, the scoring's own clock); the steps alone are timed separately and
    their difference to the loop is within the machine's noise."""
    ms = lambda v: "-" if v is None else f"{v:.2f} ms"  # noqa: E731
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines = ["| measurement | ours, eager | ours, compiled | yardstick | ratio eager | ratio compiled |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in results["step"]:
        plain_c = f"; {ms(s['plain_compiled_ms'])} torch.compile'd" if s.get("plain_compiled_ms") else ""
        vs_c = f" ({ratio(s['compiled_vs_plain_compiled'])} of torch.compile'd)" if s.get("plain_compiled_ms") else ""
        lines.append(f"| step: {s['name']} | {ms(s['ours_ms'])} | {ms(s['compiled_ms'])} | "
                     f"{ms(s['plain_ms'])} plain{plain_c} | {ratio(s['ratio'])} | {ratio(s['compiled_ratio'])}{vs_c} |")
    if "eval" not in results:
        return "\n".join(lines + ["", svi_table(results)])
    e = results["eval"]
    lines.append(f"| log p(x), {e['images']} images x K={e['particles']} | {e['rate']:,.0f} pairs/s "
                 f"({e['seconds']:.1f} s) | {e['compiled_rate']:,.0f} pairs/s ({e['compiled_seconds']:.1f} s) | "
                 f"{e['matmul_rate']:,.0f} pairs/s matmul bound | {e['share_of_matmul_rate']:.0%} | "
                 f"{e['compiled_share_of_matmul_rate']:.0%} |")
    base = e["peak_memory_mb"]["0"]
    for k, mb in e["peak_memory_mb"].items():
        if k != "0":
            lines.append(f"| peak memory, K={k} | | {mb:,.0f} MB | {base:,.0f} MB without evaluating | | |")
    p = results["epoch"]
    lines.append(f"| epoch of {p['dataset']} ({p['steps']} steps) | | {p['epoch_seconds']:.2f} s "
                 f"({p['loop_steps_seconds']:.2f} s in the steps loop) | {p['steps_seconds']:.2f} s steps alone | "
                 f"batches {p['batches_share']:.1%}, end-of-epoch scoring {p['scoring_share']:.1%} | |")
    return "\n".join(lines + ["", svi_table(results)])


def svi_table(results: dict[str, Any]) -> str:
    """Pyro's own loop (``SVI`` with ``pyro.optim.Adam``) over the same pairs, beside the
    library's eager and compiled steps."""
    ms = lambda v: "-" if v is None else f"{v:.2f} ms"  # noqa: E731
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines = ["| step | Pyro's SVI + pyro.optim | ours, eager | ours, compiled | SVI / eager | SVI / compiled |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in results["step"]:
        lines.append(f"| {s['name']} | {ms(s.get('svi_ms'))} | {ms(s['ours_ms'])} | {ms(s['compiled_ms'])} | "
                     f"{ratio(s.get('svi_vs_ours'))} | {ratio(s.get('svi_vs_compiled'))} |")
    return "\n".join(lines) + "\n"


# --- a busy machine -------------------------------------------------------------------------

#: a CPU burner: spins until its deadline or until the process that started it is gone
BURNER = """import os, sys, time
parent, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while os.getppid() == parent and time.monotonic() < deadline:
    for _ in range(100_000):
        pass
"""
#: the variables that set OpenMP's waiting and thread count: the old policy runs without them
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def burners(n: int, seconds: float) -> Iterator[list[subprocess.Popen]]:
    """``n`` processes that keep a core busy each, stopped on leaving the block; each also
    stops by itself after ``seconds`` or when this process dies, so none outlives the run."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", BURNER, str(os.getpid()), str(seconds)]))
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def policy_environments() -> dict[str, dict[str, str]]:
    """The environment of the measured processes: ``old``, this one without the OpenMP
    variables (torch's and OpenMP's defaults, which the command line keeps, with
    ``apply_cli_policy``); ``new``, that one with ``OMP_WAIT_POLICY=PASSIVE``, the policy
    a user on a busy machine may choose."""
    old = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    apply_cli_policy(old)
    return {"old": old, "new": {**old, "OMP_WAIT_POLICY": "PASSIVE"}}


def _probe(env: dict[str, str], args: list[str], timeout: float) -> dict[str, Any]:
    """Steps and epoch measured in a fresh process with environment ``env``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.json"
        subprocess.run([sys.executable, __file__, "--policy-probe", str(path), *args], env=env, check=True,
                       timeout=timeout)
        return json.loads(path.read_text())


def bench_load(load: int, args: list[str], seconds: float, echo: Callable[[str], None]) -> dict[str, Any]:
    """The probe (steps and epoch) for the old and the new policy, quiet and beside
    ``load`` burners, in that order of conditions; policies alternate within each."""
    envs = policy_environments()
    result: dict[str, Any] = {"load": load, "cores": len(os.sched_getaffinity(0)),
                              "policies": {name: {k: env.get(k) for k in OPENMP_VARIABLES} for name, env in envs.items()},
                              "runs": {}}
    for condition, n in (("quiet", 0), ("loaded", load)):
        with burners(n, seconds):
            for name in ("old", "new") if condition == "quiet" else ("new", "old"):
                probe = _probe(envs[name], args, seconds)
                result["runs"][f"{name}-{condition}"] = probe
                echo(f"load  {name} policy, {condition} ({n} burners): epoch {probe['epoch']['epoch_seconds']:.2f} s; "
                     + ", ".join(f"{s['name']} {s['compiled_ms'] or s['ours_ms']:.2f} ms" for s in probe["step"]))
    return result


def load_markdown(result: dict[str, Any]) -> str:
    """The loaded mode's table: each measurement quiet and loaded, for either policy, and
    the loaded / quiet ratios; the last column compares the policies on the quiet machine."""
    runs = result["runs"]
    lines = [f"| measurement | old policy: quiet | loaded ({result['load']} burners) | loaded / quiet | "
             "new policy: quiet | loaded | loaded / quiet | new / old, quiet |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def row(label: str, get: Callable[[dict], float | None], unit: str) -> str:
        v = {k: get(r) for k, r in runs.items()}
        cells = []
        for name in ("old", "new"):
            q, l = v[f"{name}-quiet"], v[f"{name}-loaded"]
            cells += [f"{q:.2f} {unit}" if q else "-", f"{l:.2f} {unit}" if l else "-",
                      f"{l / q:.2f}x" if q and l else "-"]
        q_old, q_new = v["old-quiet"], v["new-quiet"]
        cells.append(f"{q_new / q_old:.2f}x" if q_old and q_new else "-")
        return f"| {label} | " + " | ".join(cells) + " |"

    lines.append(row(f"epoch of {runs['old-quiet']['epoch']['dataset']}", lambda r: r["epoch"]["epoch_seconds"], "s"))
    for i, step in enumerate(runs["old-quiet"]["step"]):
        lines.append(row(f"step: {step['name']}, compiled", lambda r, i=i: r["step"][i]["compiled_ms"], "ms"))
        lines.append(row(f"step: {step['name']}, plain", lambda r, i=i: r["step"][i]["plain_ms"], "ms"))
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--quick", is_flag=True, help="toy data, random weights, few repeats: a smoke test")
@click.option("--device", default="cpu", show_default=True)
@click.option("--rounds", default=10, show_default=True, help="interleaved rounds of the step benchmark")
@click.option("--steps", default=5, show_default=True, help="timed steps per pair and round")
@click.option("--iw", "particles", default=5000, show_default=True, help="importance samples of the evaluation")
@click.option("--torch-compile/--no-torch-compile", default=None,
              help="time the plain steps through torch.compile too (default: yes, except with --quick)")
@click.option("--data-dir", default=None, help="dataset folder (default: $PYRO_VAE_DATA)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("experiments/results/benchmark"),
              show_default=True)
@click.option("--steps-only", is_flag=True, help="only the step benchmark (no evaluation, no epoch)")
@click.option("--only", default=None, help="with --steps-only: only the step pairs whose name contains this text")
@click.option("--end-to-end", "end_to_end_only", is_flag=True,
              help="only the end-to-end epochs (fit, resume, the plain loop), into end-to-end.json and .md")
@click.option("--load", type=click.IntRange(min=1), default=None,
              help="the steps and the epoch with the old and the new thread policy, quiet and beside this many "
                   "CPU-burning processes (writes load.json, load.md)")
@click.option("--load-seconds", default=3600.0, show_default=True,
              help="time bound of each burner and each measured process of --load")
@click.option("--policy-probe", type=click.Path(dir_okay=False), default=None, hidden=True)
@click.option("--memory-probe", type=int, default=None, hidden=True)
@click.option("--probe-images", type=int, default=200, hidden=True)
def main(quick: bool, device: str, rounds: int, steps: int, particles: int, torch_compile: bool | None,
         data_dir: str | None, out: Path, steps_only: bool, end_to_end_only: bool, load: int | None,
         load_seconds: float, policy_probe: str | None, memory_probe: int | None, probe_images: int,
         only: str | None = None) -> None:
    dev = torch.device(device)
    if memory_probe is not None:
        _memory_probe(memory_probe, probe_images, dev)
        return
    if load is not None:
        args = ["--device", device, "--rounds", str(rounds), "--steps", str(steps)] + (["--quick"] if quick else []) \
            + (["--data-dir", data_dir] if data_dir else [])
        result = bench_load(load, args, load_seconds, click.echo)
        out.mkdir(parents=True, exist_ok=True)
        (out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "load.md").write_text(load_markdown(result))
        click.echo(f"wrote {out / 'load.json'} and {out / 'load.md'}")
        return
    if policy_probe is not None:  # one process of --load: steps (no torch.compile) and the quickstart's epoch
        if quick:
            rounds, steps = 1, 2
        probe: dict[str, Any] = {"threads": torch.get_num_threads(),
                                 "step": bench_steps(dev, rounds, steps, quick, click.echo, torch_compile=False)}
        with tempfile.TemporaryDirectory() as tmp:
            dataset = TrainConfig().dataset
            if quick:
                dataset = str(Path(tmp) / "toy.npy")
                np.save(dataset, toy_binary_images(400, 28, 1)[0])
            probe["epoch"] = bench_epoch(dev, dataset, data_dir, click.echo)
        Path(policy_probe).write_text(json.dumps(probe))
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device here")
    results: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "pyro": pyro.__version__,
                               "threads": torch.get_num_threads(), "quick": quick}
    if end_to_end_only:
        write_end_to_end(results, run_end_to_end(dev, quick, data_dir, click.echo), out)
        return
    if quick:
        rounds, steps = 1, 2
    results["step"] = bench_steps(dev, rounds, steps, quick, click.echo,
                                  not quick if torch_compile is None else torch_compile, only if steps_only else None)
    if steps_only:
        pass
    elif quick:
        x = torch.as_tensor(toy_binary_images(50, 28, 0)[0], dtype=torch.float32).reshape(50, 784).to(dev)
        results["eval"] = bench_eval(dev, x, 50, 20, (50, 500), click.echo)
        with tempfile.TemporaryDirectory() as tmp:
            np_path = Path(tmp) / "toy.npy"
            np.save(np_path, toy_binary_images(400, 28, 1)[0])
            results["epoch"] = bench_epoch(dev, str(np_path), data_dir, click.echo)
    else:
        x = load_dataset("mnist", data_dir, None, download=False).eval_data("test").to(dev)
        results["eval"] = bench_eval(dev, x, particles, 200, (5000, 50000), click.echo)
        results["epoch"] = bench_epoch(dev, "binarized-mnist", data_dir, click.echo)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown(results))
    click.echo(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    if not steps_only:
        write_end_to_end(results, run_end_to_end(dev, quick, data_dir, click.echo), out)


def run_end_to_end(device: torch.device, quick: bool, data_dir: str | None, echo: Callable[[str], None]) -> dict:
    """The end-to-end section on binarized MNIST (``quick``: 400 toy images)."""
    if not quick:
        return bench_end_to_end(device, "binarized-mnist", data_dir, echo)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "toy.npy"
        np.save(path, toy_binary_images(400, 28, 1)[0])
        return bench_end_to_end(device, str(path), data_dir, echo)


def write_end_to_end(results: dict[str, Any], end_to_end: dict[str, Any], out: Path) -> None:
    """end-to-end.json (the run's settings and the section) and end-to-end.md (its table)."""
    write_json(out / "end-to-end.json", {**{k: v for k, v in results.items() if k not in ("step", "eval", "epoch")},
                                         "end_to_end": end_to_end})
    write_text(out / "end-to-end.md", end_to_end_table(end_to_end))
    click.echo(f"wrote {out / 'end-to-end.json'} and {out / 'end-to-end.md'}")


if __name__ == "__main__":
    main()
