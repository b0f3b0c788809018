"""The training loop: SVI over a named ELBO flavour, with checkpoints, metrics and figures.

``fit`` is the one place where training happens; the CLI is a thin layer over it. The loss
is Pyro's ``differentiable_loss`` and the step a plain torch optimizer step, so learning
rate schedules and gradient clipping are the torch ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pyro
import torch

from . import plots
from .data import BINARIZATIONS, Dataset, load_dataset, random_rows
from .errors import ConfigError, RunError, TrainingDiverged
from .models import build_model, config_from_dict, model_class
from .objectives import OBJECTIVES, UNSCALED_OBJECTIVES, make_objective
from .runs import RunDir, load_model_state

Log = Callable[[str], None]


@dataclass
class TrainConfig:
    """How to train. The model's shape lives in its own config (e.g. ``VAEConfig``)."""

    dataset: str = "mnist"
    binarize: str | None = None  # None: the dataset's default (dynamic for MNIST)
    valid_fraction: float = 0.1  # held out of an array dataset that has no validation split
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay: float = 1.0  # learning rate multiplied by this after every epoch
    objective: str | None = None  # None: the model's default ELBO flavour
    particles: int | None = None  # None: the model's default (1; 5 for the IWAE preset)
    alpha: float = 0.5  # the Renyi bound's alpha, for objective "renyi"
    beta: float = 1.0  # weight of the KL term (beta-VAE)
    kl_warmup: float = 0.0  # epochs over which the KL weight rises linearly from 0 to beta
    grad_clip: float | None = None  # max global gradient norm
    seed: int = 0
    eval_size: int = 10_000  # images of train and of validation scored after each epoch

    def load_data(self, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
        """The dataset this config trains on, binarized and split as it says."""
        return load_dataset(self.dataset, data_dir, self.binarize, self.valid_fraction, download, self.seed)

    def check(self) -> None:
        """Reject values that cannot work, with the option's name in the message."""
        rules = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (0 < self.lr_decay <= 1, "--lr-decay must lie in (0, 1]"),
            (self.particles is None or self.particles >= 1, "--particles must be at least 1"),
            (self.objective != "renyi" or 0 < self.alpha < 1, "--alpha must lie in (0, 1) for --objective renyi"),
            (self.beta > 0, "--beta must be positive"),
            (self.kl_warmup >= 0, "--kl-warmup must be non-negative"),
            (self.grad_clip is None or self.grad_clip > 0, "--grad-clip must be positive"),
            (self.eval_size >= 1, "--eval-size must be at least 1"),
            (self.binarize is None or self.binarize in BINARIZATIONS,
             f"--binarize must be one of {', '.join(BINARIZATIONS)}"),
            (self.objective is None or self.objective in OBJECTIVES,
             f"--objective must be one of {', '.join(OBJECTIVES)}"),
            (self.objective not in UNSCALED_OBJECTIVES or (self.beta == 1 and self.kl_warmup == 0),
             f"--objective {self.objective} is a single importance-weighted bound: a KL weight "
             "inside its logsumexp would make it bound nothing, so --beta and --kl-warmup "
             "cannot be used with it"),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)


@dataclass
class Run:
    """A trained (or training) model with its run directory and history."""

    dir: RunDir
    model_name: str
    model: Any
    train: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    data_info: dict[str, Any] = field(default_factory=dict)


def make_optimizer(parameters: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The training loop's Adam. Fused: one kernel over all parameters instead of a Python
    loop over them, which took 1.0 of a VAE step's ~6 ms on CPU (0.4 ms fused)."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


@contextlib.contextmanager
def fixed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with its own seeded RNG, leaving the training RNG stream untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def objective_bound(objective: Any, model: Any, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Minus the objective at KL weight 1 on ``x``, in nats per image."""
    total = 0.0
    with pyro.validation_enabled(False):  # the model was checked on its first training step
        for i in range(0, x.shape[0], batch_size):
            total += objective.loss(model.model, model.guide, x[i : i + batch_size])
    return -total / x.shape[0]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _train_config(values: dict[str, Any]) -> TrainConfig:
    return config_from_dict(TrainConfig, values)


def fit(
    model_name: str,
    model_config: dict[str, Any] | Any = None,
    train: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    device: str = "auto",
    download: bool = True,
    log: Log | None = None,
    progress: bool = False,
) -> Run:
    """Train a new model of family ``model_name`` and save everything into ``run_dir``.

    ``model_config`` is the family's config dataclass or a dict of its fields; ``train``
    the ``TrainConfig``. ``log`` receives one line per epoch; ``progress`` shows a bar.
    """
    cls = model_class(model_name)
    if dataclasses.is_dataclass(model_config):
        model_config = dataclasses.asdict(model_config)
    model_config = dataclasses.asdict(config_from_dict(cls.Config, model_config or {}))
    train = train or TrainConfig()
    if train.objective is None:
        train = dataclasses.replace(train, objective=cls.default_objective)
    if train.particles is None:
        train = dataclasses.replace(train, particles=cls.default_particles)
    train.check()
    if train.objective not in cls.objectives:
        raise ConfigError(f"{model_name} cannot be trained with --objective {train.objective}; "
                          f"use one of {', '.join(cls.objectives)}")
    run_dir = Path(run_dir or Path("runs") / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    RunDir.check_free(run_dir)  # before the data loads: fail fast
    dev = resolve_device(device)
    if train.dataset.endswith((".npy", ".npz")):
        train = dataclasses.replace(train, dataset=str(Path(train.dataset).resolve()))
    data = train.load_data(data_dir, download)
    pyro.set_rng_seed(train.seed)  # before the weights are initialised
    model = build_model(model_name, data.x_dim, model_config)
    model.check_data(data, train.seed)
    config = {
        "model": model_name,
        "model_config": model_config,
        "train": dataclasses.asdict(train),
        "data": {"name": data.name, "x_dim": data.x_dim, "binarize": data.binarize,
                 "image_shape": list(data.image_shape) if data.image_shape else None},
    }
    run = RunDir.create(run_dir, config)
    return _train(run, config, model, data, dev, None, log, progress)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    model_name: str | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    download: bool = True,
    log: Log | None = None,
    progress: bool = False,
) -> Run:
    """Continue a run from its last checkpoint, exactly as if it had not stopped;
    ``epochs`` may raise the number of epochs to train for, and ``model_name``, when
    given, must be the run's."""
    run = RunDir.open(run_dir)
    config = run.config()
    if model_name is not None and config["model"] != model_name:
        raise ConfigError(f"{run.path} is a {config['model']} run, not {model_name}")
    train = _train_config(config["train"])
    if epochs is not None:
        train = dataclasses.replace(train, epochs=epochs)
        train.check()
        config["train"]["epochs"] = epochs
    dev = resolve_device(device)
    state = run.load_checkpoint(map_location=dev)
    data = train.load_data(data_dir, download)
    model = build_model(config["model"], data.x_dim, config["model_config"])
    if state["epoch"] >= train.epochs:
        raise RunError(
            f"{run.path} has already trained {state['epoch']} epochs (asked for {train.epochs}); "
            f"pass --epochs N with N > {state['epoch']} to train longer"
        )
    run.write_json("config.json", config)
    return _train(run, config, model, data, dev, state, log, progress)


def _train(run: RunDir, config: dict[str, Any], model: Any, data: Dataset, device: torch.device,
           state: dict[str, Any] | None, log: Log | None, progress: bool) -> Run:
    train = _train_config(config["train"])
    log = log or (lambda message: None)
    model.to(device)
    objective = make_objective(train.objective, train.particles, train.alpha)
    optimizer = make_optimizer(model.parameters(), train.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=train.lr_decay)
    steps_per_epoch = model.steps_per_epoch(data, train.batch_size)
    warmup_steps = train.kl_warmup * steps_per_epoch
    # the same random images at every epoch
    rows = {name: random_rows(len(data.split(name)), train.eval_size, train.seed) for name in ("train", "valid")}
    train_eval, valid_eval = (data.eval_data(name)[rows[name]].to(device) for name in ("train", "valid"))
    valid_labels = data.labels["valid"][rows["valid"]].to(device) if "valid" in data.labels else None
    image_shape = tuple(config["data"]["image_shape"] or ()) or None

    if state is None:
        model.init_from_data(data, train.seed)
        state = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "history": []}
        _sample_figure(model, run, image_shape, train.seed, device, 0)
    else:
        load_model_state(model, state["model"], run.path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], device)
        log(f"resuming {run.path} at epoch {state['epoch'] + 1}"
            + (f", batch {state['batch'] + 1}" if state["batch"] else ""))
    # the loop's position: epoch and batch done, steps done, objective summed this epoch
    pos = {k: state[k] for k in ("epoch", "batch", "step", "loss_sum")}
    history: list[dict[str, Any]] = list(state["history"])
    best = max((row["valid_bound"] for row in history), default=-math.inf)

    def checkpoint() -> None:
        run.save_checkpoint({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(device),
            **pos, "history": history,
        })

    def train_steps(interrupted: threading.Event) -> float:
        """The rest of the current epoch's steps (until Ctrl-C); returns the last KL weight."""
        kl_weight = train.beta
        batches = model.training_batches(data, train.batch_size, pos["epoch"], train.seed, device, start=pos["batch"])
        bar = click.progressbar(length=steps_per_epoch - pos["batch"], file=sys.stderr,
                                label=f"epoch {pos['epoch'] + 1}/{train.epochs}")
        with bar if progress else contextlib.nullcontext():
            for batch in batches:
                if warmup_steps:
                    kl_weight = train.beta * min(1.0, (pos["step"] + 1) / warmup_steps)
                # Pyro's and torch's argument checks cost time on every step: they run on
                # the first step of each session only, to catch a malformed model early.
                with pyro.validation_enabled(pos["step"] == state["step"]):
                    loss = model.training_loss(objective, batch, kl_weight)
                value = loss.item() / batch[0].shape[0]
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"the loss became {value} at epoch {pos['epoch'] + 1}, batch {pos['batch'] + 1}; "
                        f"stopped. The last good checkpoint (end of epoch {history[-1]['epoch'] if history else 0}) "
                        f"is kept in {run.path}. Try a lower --lr or --grad-clip 10"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
                optimizer.step()
                pos["loss_sum"] += value
                pos["batch"] += 1
                pos["step"] += 1
                if progress:
                    bar.update(1)
                if interrupted.is_set():
                    break
        return kl_weight

    with _deferred_interrupt() as interrupted:
        while pos["epoch"] < train.epochs and not interrupted.is_set():
            start_time = time.perf_counter()
            model.train()
            kl_weight = train_steps(interrupted)
            if interrupted.is_set():
                break
            steps_seconds = time.perf_counter() - start_time
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            model.eval()
            with fixed_rng(train.seed + 1, device):
                row = {
                    "epoch": pos["epoch"] + 1,
                    "step": pos["step"],
                    "train_loss": pos["loss_sum"] / pos["batch"],
                    "train_bound": objective_bound(objective, model, train_eval),
                    "valid_bound": objective_bound(objective, model, valid_eval),
                    **{f"valid_{k}": v for k, v in model.metrics(valid_eval, valid_labels).items()
                       if isinstance(v, (int, float))},
                    "kl_weight": kl_weight,
                    "lr": lr,
                    "seconds": time.perf_counter() - start_time,  # the steps and the scores above
                    "steps_seconds": steps_seconds,
                }
            history.append(row)
            pos.update(epoch=pos["epoch"] + 1, batch=0, loss_sum=0.0)
            run.write_metrics(history)
            checkpoint()
            if row["valid_bound"] > best:
                best = row["valid_bound"]
                run.save_checkpoint({"model": model.state_dict(), "epoch": pos["epoch"]}, "best.pt")
            scores = "".join(f"  {k[6:]} {v:.4f}" for k, v in row.items()
                             if k.startswith("valid_") and k != "valid_bound")
            log(f"epoch {row['epoch']}/{train.epochs}  train {row['train_bound']:.2f}  "
                f"valid {row['valid_bound']:.2f} nats/image{scores}  ({row['seconds']:.1f} s)")
            plots.bound_curves(history, run.figures / "curves.png", title=run.path.name)
            if row["epoch"] in (train.epochs // 2, train.epochs):
                _sample_figure(model, run, image_shape, train.seed, device, row["epoch"])
    if interrupted.is_set():
        checkpoint()
        raise RunError(
            f"interrupted at epoch {pos['epoch'] + 1}, after batch {pos['batch']}; the state is saved: "
            f"continue with `pyro-vae fit {config['model']} --run-dir {run.path} --resume`"
        )
    if image_shape is not None:
        x = valid_eval[:50]
        plots.reconstructions(x, model.reconstruct(x), image_shape, run.figures / "reconstructions.png")
        with fixed_rng(train.seed, device):
            model.figures(valid_eval, valid_labels, image_shape, run.figures)
    return Run(run, config["model"], model, train, history, config["data"])


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """Turn Ctrl-C into a flag that the loop reads between steps, so that the state it
    saves is never half-way through an optimizer update. A second Ctrl-C stops at once
    (the checkpoint of the last finished epoch stays)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _sample_figure(model: Any, run: RunDir, image_shape: tuple[int, ...] | None, seed: int,
                   device: torch.device, epoch: int) -> None:
    """Samples from the same prior draws at each point of training, so grids compare."""
    if image_shape is None:
        return
    model.eval()
    with fixed_rng(seed, device):
        images = model.sample(64)
    label = "before training" if epoch == 0 else f"after epoch {epoch}"
    plots.image_grid(images, image_shape, run.figures / f"samples-epoch{epoch:04d}.png",
                     title=f"samples {label}")


def load_run(path: str | Path, checkpoint: str = "last", device: str = "cpu") -> Run:
    """Rebuild a trained model from its run directory: ``checkpoint`` is ``last`` (the
    latest saved state) or ``best`` (best validation bound)."""
    run = RunDir.open(path)
    config = run.config()
    names = {"last": "checkpoint.pt", "best": "best.pt"}
    if checkpoint not in names:
        raise ConfigError(f"--checkpoint must be last or best, got {checkpoint!r}")
    dev = resolve_device(device)
    state = run.load_checkpoint(names[checkpoint], map_location=dev)
    model = build_model(config["model"], config["data"]["x_dim"], config["model_config"])
    load_model_state(model, state["model"], run.path)
    model.to(dev).eval()
    history = run.metrics()
    return Run(run, config["model"], model, _train_config(config["train"]), history, config["data"])
