"""The training loop: SVI over a named ELBO flavour, with checkpoints, metrics and figures.

``resolve`` turns what a user asks for into a checked ``RunConfig``, ``start`` trains one
into a new run directory, ``resume`` continues one, and ``fit`` is the first two (or the
third) in one call; the CLI is a thin layer over them. The loss is Pyro's
``differentiable_loss`` and the step a plain torch optimizer step, so learning rate
schedules and gradient clipping are the torch ones.

Under ``torchrun`` (``distributed.init``) every process runs this same loop on its share
of each batch (``World.shard``: ``batch_size`` is the batch of a step, shared among the
processes) and the gradients are summed before the step, so the weights follow the
single-process run's to float rounding. Rank 0 alone writes the run directory and scores
the epochs; the others compute.
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
from .distributed import PeerLost, World, current as current_world
from .keyed import fold
from .config import MAX_SEED, check_fields, config_from_dict, option
from .data import BINARIZATIONS, DATASETS, DEFAULT_MAX_LENGTH, LAYOUTS, Dataset, is_text_source, load_dataset, random_rows
from .text import MIN_WORDS
from .errors import ConfigError, DataError, Flag, Interrupted, RunError, TrainingDiverged
from .models import Family, model_class
from .models.base import objective_bound  # noqa: F401  (a public name of this module before it moved)
from .objectives import OBJECTIVES, make_objective, objective_spec
from .compiled import CompiledLoss, rng_state, set_rng_state
from .runs import RunDir, check_writable, load_model_state
from .stacking import stacking

#: each learning-rate schedule with the eps of its Adam (Burda et al. used 1e-4)
ADAM_EPS = {"exponential": 1e-8, "burda": 1e-4}
LR_SCHEDULES = tuple(ADAM_EPS)
#: with ``--figures every``, curves.png is redrawn after an epoch at most this often (drawing
#: it is slow next to a short epoch), and always after the last epoch and when training stops
CURVES_SECONDS = 30.0
#: when the figures are drawn (``TrainConfig.figures``)
FIGURE_TIMES = ("every", "end", "none")
BURDA_STAGES = 8  # Burda et al. 2016: 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7
KL_SCHEDULES = ("linear", "sigmoid", "cyclical")
SIGMOID_SLOPE = 10.0  # the sigmoid warm-up runs from sigmoid(-5) to sigmoid(5) of beta

Log = Callable[[str], None]


@dataclass
class TrainConfig:
    """How to train. The model's shape lives in its own config (e.g. ``VAEConfig``)."""

    dataset: str = option("mnist", "a dataset name (" + ", ".join(DATASETS) + "), a .npy/.npz file of "
                          "images (N, H, W), (N, H, W, C), (N, C, H, W) or vectors (N, D), or a text corpus: "
                          "a .txt file of one sentence per line, or a folder of train.txt, valid.txt, test.txt")
    binarize: str | None = option(None, "dynamic: Bernoulli draw per epoch; threshold: > 0.5; none: data as "
                                  "they are (default: the dataset's for --likelihood bernoulli, else none)",
                                  BINARIZATIONS)
    layout: str = option("auto", "how a 4-d user array is laid out: channels last (nhwc) or first (nchw)",
                         LAYOUTS)
    valid_fraction: float = option(0.1, "share of an array dataset or text file held out for validation",
                                   above=0, below=1)
    vocab_size: int | None = option(None, "text: keep at most this many of the training split's most frequent "
                                    "words (default: all), besides <pad> <bos> <eos> <unk>", at_least=MIN_WORDS)
    min_count: int = option(1, "text: keep only words seen at least this often in the training split; the "
                            "others read as <unk>", at_least=1)
    max_length: int = option(DEFAULT_MAX_LENGTH, "text: sentences of more words than this are left out of every "
                             "split (how many is said when the data load)", at_least=1)
    train_size: int | None = option(None, "train on this many items of the training split, drawn at random with "
                                    "--seed (default: all); a text corpus's vocabulary is still the whole "
                                    "split's", at_least=1)
    epochs: int = option(100, "passes over the training split", at_least=1)
    batch_size: int = option(100, "images per step", at_least=1)
    lr: float = option(1e-3, "Adam's learning rate", above=0)
    lr_decay: float = option(1.0, "multiply the learning rate by this after every epoch", above=0, at_most=1)
    lr_schedule: str = option("exponential", "exponential: --lr times --lr-decay^epoch; burda: Burda et al. "
                              "2016's, 3^i epochs at --lr x 10^(-i/7) for i = 0..7 (3,280 in all; the last "
                              "rate after), with Adam's eps 1e-4", LR_SCHEDULES)
    adam_beta1: float | None = option(None, "Adam's beta1, the decay of its running mean of the gradient "
                                      "(default: the family's, torch's 0.9 but for the GAN's 0.5; beta2 stays "
                                      "the family's, 0.999)", at_least=0, below=1)
    objective: str | None = option(None, "ELBO flavour (default: the model's own)", OBJECTIVES)
    particles: int | None = option(None, "samples per datapoint in the objective (default: the model's, 1; "
                                   "5 for iwae)", at_least=1)
    alpha: float = option(0.5, "alpha of --objective renyi, in (0, 1): 0 would be IWAE, 1 the ELBO")
    insomnia: float = option(1.0, "--objective rws: the guide's gradient is this share of the wake phase's "
                             "(its own draws, reweighted) and the rest of the sleep phase's (the model's draws); "
                             "0 = sleep only", at_least=0, at_most=1)
    beta: float = option(1.0, "weight of the KL term", above=0)
    kl_warmup: float = option(0.0, "epochs of KL warm-up from 0 to beta (its shape: --kl-schedule)", at_least=0)
    kl_schedule: str = option("linear", "the KL weight's schedule. linear: from 0 to beta over --kl-warmup epochs; "
                              "sigmoid: a logistic curve over them (Bowman et al. 2016); cyclical: Fu et al. "
                              "2019, --kl-cycles cycles over the run, each rising linearly from 0 to beta in its "
                              "first half and staying at beta in the second", KL_SCHEDULES)
    kl_cycles: int = option(4, "cycles of --kl-schedule cyclical", at_least=1)
    grad_clip: float | None = option(None, "clip the global gradient norm to this", above=0)
    seed: int = option(0, "seed of the weights, the batches and the binarization", at_least=0, at_most=MAX_SEED)
    eval_size: int = option(10_000, "train and validation images scored after each epoch", at_least=1)
    eval_every: int = option(1, "score those images every N epochs and after the last (the others log their "
                             "training objective only; best.pt is chosen among the scored epochs): on long "
                             "runs the steps then dominate. The weights trained are the same for every N",
                             at_least=1)
    figures: str = option("end", "when the figures are drawn. every: the curves after an epoch (at most every "
                          f"{CURVES_SECONDS:.0f} s) and each grid of samples as its epoch ends; end: the same "
                          "figures, drawn when training ends or is stopped (the samples are taken as their "
                          "epoch ends), so the epochs spend no time on them; none: no figures", FIGURE_TIMES)
    compile: bool = option(True, "trace the Pyro objective once per batch shape and run the trace: the same "
                           "loss and gradients without Pyro's per-step Python (falls back to eager code, "
                           "saying why, where it cannot apply)")

    def load_data(self, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
        """The dataset this config trains on, binarized and split as it says (and its
        training split cut to ``train_size`` items)."""
        data = load_dataset(self.dataset, data_dir, self.binarize, self.valid_fraction, download, self.seed,
                            self.layout, self.vocab_size, self.min_count, self.max_length)
        if self.train_size is not None:
            rows = random_rows(len(data.splits["train"]), self.train_size, self.seed).sort().values
            data.splits["train"] = data.splits["train"][rows]
            if "train" in data.labels:
                data.labels["train"] = data.labels["train"][rows]
            data.note = "; ".join(n for n in (data.note, f"training on {len(rows)} items of the training split "
                                              f"(--train-size {self.train_size})") if n)
        return data

    def check(self) -> None:
        """Reject values that cannot work, with the option's name in the message: the
        fields' declared ranges, a decay beside the schedule that sets every rate, and what
        the objective cannot use."""
        check_fields(self)
        if self.lr_schedule == "burda" and self.lr_decay != 1:
            raise ConfigError(f"{{lr_decay}} must be 1 with {{schedule}} (the schedule sets every epoch's rate), "
                              f"got {self.lr_decay!r}", lr_decay=Flag("lr_decay"),
                              schedule=Flag("lr_schedule", "burda"))
        if self.objective is not None:
            annealed = self.kl_warmup if self.kl_schedule != "cyclical" else 1.0
            objective_spec(self.objective).check(self.alpha, self.beta, annealed, self.particles, self.insomnia)


@dataclass
class Run:
    """A trained (or training) model with its run directory and history."""

    dir: RunDir
    config: RunConfig
    model: Any
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def train(self) -> TrainConfig:
        return self.config.train

    @property
    def data_info(self) -> dict[str, Any]:
        """The data record of config.json."""
        return self.config.data.to_json()

    def load_data(self, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
        """The run's dataset, refused if it is no longer of the shape the model was built for
        (a file replaced under the run)."""
        data = self.train.load_data(data_dir, download)
        if data.x_dim != self.model.x_dim:
            raise DataError(f"{data.name} now has {data.x_dim} values per item, but the model of {self.dir.path} "
                            f"was built for {self.model.x_dim}: the dataset changed since the run was trained")
        if data.vocab != self.config.data.vocab:
            raise DataError(f"{data.name} now gives another vocabulary than the one saved with {self.dir.path}: "
                            "the corpus changed since the run was trained")
        return data


def adam_betas(train: TrainConfig, model: Family) -> tuple[float, float]:
    """Adam's betas for this run: ``--adam-beta1`` where given, else the family's."""
    beta1, beta2 = model.adam_betas
    return (beta1 if train.adam_beta1 is None else train.adam_beta1), beta2


def make_optimizer(parameters: Iterable[torch.nn.Parameter], lr: float, eps: float = 1e-8,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The training loop's Adam, fused: one kernel over all parameters instead of a Python
    loop over them, a visible share of a small model's step. ``betas``: the run's
    (``adam_betas``; torch's defaults unless the family or ``--adam-beta1`` says otherwise)."""
    return torch.optim.Adam(parameters, lr=lr, eps=eps, betas=betas, fused=True)


def burda_stage(epoch: int) -> int:
    """The stage i of Burda et al.'s schedule that 0-based ``epoch`` falls in: stage i
    lasts 3^i epochs, i = 0..7, and the last stage goes on after its 3^7."""
    stage, end = 0, 1
    while epoch >= end and stage < BURDA_STAGES - 1:
        stage += 1
        end += 3**stage
    return stage


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> Any:
    """The per-epoch learning-rate schedule that ``--lr-schedule`` names."""
    if train.lr_schedule == "burda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 10 ** (-burda_stage(epoch) / 7))
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=train.lr_decay)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown {{device}} {name!r}; use cpu, cuda, cuda:N or auto", device=Flag("device"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("{cuda} was asked for but torch sees no CUDA device; use {cpu}",
                          cuda=Flag("device", name), cpu=Flag("device", "cpu"))
    return torch.device(name)


@contextlib.contextmanager
def fixed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with its own seeded RNG, leaving the training RNG stream untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        yield


#: what a checkpoint to resume from must hold, and of which kind
FULL_STATE = {"model": dict, "optimizer": dict, "scheduler": dict, "rng": dict, "epoch": int, "batch": int,
              "step": int, "loss_sum": (int, float), "history": list}


@dataclass(frozen=True)
class DataInfo:
    """The data a run trains on, as config.json records them: the dataset's name, values
    per item, binarization and image shape (C, H, W), None for vectors; for text, the kind
    and the vocabulary (its words by id: saved with the run). The model is built for this
    shape, and a dataset that no longer has it is refused."""

    name: str
    x_dim: int
    binarize: str | None
    image_shape: tuple[int, ...] | None = None
    kind: str = "image"
    vocab: tuple[str, ...] | None = None

    @classmethod
    def of(cls, data: Dataset) -> DataInfo:
        return cls(data.name, data.x_dim, data.binarize, tuple(data.image_shape) if data.image_shape else None,
                   data.kind, data.vocab)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the model is built for: (C, H, W) for images, else (D,)."""
        return self.image_shape or (self.x_dim,)

    def to_json(self) -> dict[str, Any]:
        record = {"name": self.name, "x_dim": self.x_dim, "binarize": self.binarize,
                  "image_shape": list(self.image_shape) if self.image_shape else None}
        if self.kind != "image":  # the records of image runs stay as they were
            record.update(kind=self.kind, vocab=list(self.vocab) if self.vocab is not None else None)
        return record


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is trained from: the family's name and config, the training config
    and (once the data are loaded) the data record. ``resolve`` makes one from what a user
    asks for; config.json holds ``to_json()``, and ``read`` gets it back."""

    model: str
    model_config: Any  # the family's config dataclass
    train: TrainConfig
    data: DataInfo | None = None

    def build_model(self) -> Family:
        """A new model of the family for the run's data (its own copy of the config)."""
        return model_class(self.model)(self.data.shape, dataclasses.replace(self.model_config))

    def to_json(self) -> dict[str, Any]:
        """The config.json of the run."""
        return {"model": self.model, "model_config": dataclasses.asdict(self.model_config),
                "train": dataclasses.asdict(self.train), "data": self.data.to_json()}

    @classmethod
    def read(cls, run: RunDir) -> RunConfig:
        """A run's config.json (``RunDir.config`` reads the older layouts) with its model
        and training configs typed and checked for type, for a message that names the file
        rather than a traceback later. The values are not checked again: a finished run
        loads as it was trained."""
        config = run.config()
        where = str(run.path / "config.json")
        family = config_from_dict(model_class(config["model"]).Config, config["model_config"], where)
        data = config["data"]
        info = DataInfo(data.get("name", ""), data["x_dim"], data.get("binarize"),
                        tuple(data["image_shape"]) if data.get("image_shape") else None,
                        data.get("kind", "image"), tuple(data["vocab"]) if data.get("vocab") is not None else None)
        return cls(config["model"], family, config_from_dict(TrainConfig, config["train"], where), info)


def resolve(name: str, model_config: Any = None, train: TrainConfig | None = None) -> RunConfig:
    """The run config for training family ``name``: ``model_config`` is its config
    dataclass or a dict of its fields (missing ones take their defaults), ``train`` a
    ``TrainConfig``. Fills in what depends on the family (the objective: a flow guide
    trains on trace where the family's default is meanfield; the particles; binarization
    none for a grey-level likelihood, which scores the grey levels; a dataset file by its
    absolute path) and checks everything once: both configs, and the objective against the
    family and its guide. Touches no file; the data record is added once they are loaded."""
    cls = model_class(name)
    if dataclasses.is_dataclass(model_config):
        model_config = dataclasses.asdict(model_config)
    family = config_from_dict(cls.Config, model_config or {})
    cls.check_config(family)
    train = train or TrainConfig()
    objective = train.objective or objective_spec(cls.default_objective).for_guide(family.guide)
    default_particles = objective_spec(objective).default_particles or cls.default_particles
    train = dataclasses.replace(
        train,
        objective=objective,
        particles=default_particles if train.particles is None else train.particles,
        binarize="none" if train.binarize is None and family.likelihood != "bernoulli" else train.binarize,
        dataset=str(Path(train.dataset).resolve())
        if train.dataset not in DATASETS and (train.dataset.endswith((".npy", ".npz")) or is_text_source(train.dataset))
        else train.dataset)
    train.check()
    if train.objective not in cls.objectives:
        spec = objective_spec(train.objective)
        why = (" (it needs a reparameterized guide without enumerated sites)"
               if spec.needs_reparameterized_guide and cls.enumerates_in_guide else "")
        raise ConfigError(f"{name} cannot be trained with {{objective}}{why}; "
                          f"use one of {', '.join(cls.objectives)}", objective=Flag("objective", train.objective))
    spec = objective_spec(train.objective)
    spec.check_guide(family.guide)
    if cls.global_latents(family) and not spec.trains_global_latents:
        raise ConfigError("{objective} weighs each datapoint's draws on their own and has no place for latents "
                          "shared by the batch (the weights of {bayesian}); use {meanfield} or trace",
                          objective=Flag("objective", train.objective), bayesian=Flag("bayesian"),
                          meanfield=Flag("objective", "meanfield"))
    return RunConfig(name, family, train)


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
    overwrite: bool = False,
    resume: bool = False,
) -> Run:
    """Train a new model of family ``model_name`` and save everything into ``run_dir``.

    ``model_config`` is the family's config dataclass or a dict of its fields; ``train``
    the ``TrainConfig``. ``log`` receives one line per epoch; ``progress`` shows a bar.
    ``overwrite`` replaces a run already in ``run_dir``: only a pyro_vae run that holds
    nothing but the files pyro_vae writes, and only those are removed
    (``RunDir.check_free``); ``resume`` continues the run in ``run_dir`` where it stopped, up to
    ``train.epochs``, if it has a checkpoint, and starts it otherwise: a notebook cell
    that can be run again.
    """
    if resume and run_dir is not None and RunDir(run_dir).has_checkpoint():
        return _continue(run_dir, epochs=train.epochs if train else None, model_name=model_name,
                         data_dir=data_dir, device=device, download=download, log=log, progress=progress)
    return start(resolve(model_name, model_config, train), run_dir, data_dir=data_dir, device=device,
                 download=download, log=log, progress=progress, overwrite=overwrite or resume)


def start(
    config: RunConfig,
    run_dir: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    device: str = "auto",
    download: bool = True,
    log: Log | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Run:
    """Train a new run of ``config`` (from ``resolve``) into ``run_dir`` (default:
    runs/NAME-DATE-TIME); the other arguments are ``fit``'s."""
    world = current_world()
    _check_shares(world, config.train.batch_size)
    run_dir = Path(run_dir or Path("runs") / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    with world.together():
        if world.main:
            RunDir.check_free(run_dir, overwrite)  # before the data load: fail fast
            check_writable(run_dir)
    dev = world.device(resolve_device(device))
    stages = stacking(config.model)
    # M1+M2 trains or reads its M1 here, which can change the defaults that follow from its config
    prepared = stages.prepare(config.model_config, config.train, run_dir, fit, data_dir=data_dir, device=device,
                              download=download, log=log, progress=progress)
    config = resolve(config.model, prepared, config.train)
    data = world.main_first(lambda: config.train.load_data(data_dir, download))
    if data.note and log and world.main:
        log(data.note)
    config = dataclasses.replace(config, data=DataInfo.of(data))
    pyro.set_rng_seed(config.train.seed)  # before the weights are initialised
    model = config.build_model()
    model.check_data(data, config.train.seed)
    stages.check_data(model.config, data)
    stages.load(model)
    with world.together():
        run = RunDir.create(run_dir, config.to_json(), overwrite) if world.main else RunDir(run_dir)
    return _train(run, lambda: Session.start(run, config, model, data, dev, log, progress, world), None)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    eval_every: int | None = None,
    model_name: str | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    download: bool = True,
    log: Log | None = None,
    progress: bool = False,
) -> Run:
    """Continue a run from its last checkpoint, exactly as if it had not stopped;
    ``epochs`` may raise the number of epochs to train for and ``eval_every`` change how
    often the epochs are scored (neither changes the weights trained), and ``model_name``,
    when given, must be the run's."""
    run = RunDir.open(run_dir)
    config = RunConfig.read(run)
    if model_name is not None and config.model != model_name:
        raise ConfigError(f"{run.path} is a {config.model} run, not {model_name}")
    changes = {k: v for k, v in (("epochs", epochs), ("eval_every", eval_every)) if v is not None}
    if changes:
        train = dataclasses.replace(config.train, **changes)
        train.check()
        config = dataclasses.replace(config, train=train)
    train = config.train
    world = current_world()
    _check_shares(world, train.batch_size)
    dev = world.device(resolve_device(device))
    checkpoint = run.load_checkpoint(map_location=dev, required=FULL_STATE)
    if checkpoint["epoch"] >= train.epochs:
        raise RunError(
            f"{run.path} has already trained {checkpoint['epoch']} epochs (asked for {train.epochs}); "
            f"pass {{epochs}} with N > {checkpoint['epoch']} to train longer", epochs=Flag("epochs", "N"))
    with world.together():
        if world.main:
            check_writable(run.path)
    data = world.main_first(lambda: train.load_data(data_dir, download))
    model = config.build_model()
    model.check_data(data, train.seed)
    stacking(config.model).check_data(model.config, data)
    with world.together():
        if world.main:
            run.lock()

    def open_session() -> Session:
        if world.main:
            run.write_json("config.json", config.to_json())
        return Session.start(run, config, model, data, dev, log, progress, world)

    return _train(run, open_session, checkpoint)


@dataclass
class TrainState:
    """Where a run stands, saved in every checkpoint: epochs and batches (of the current
    epoch) done, optimizer steps done, the objective summed over this epoch's steps, and
    the per-epoch history. Together with the weights, the optimizer, the scheduler and the
    RNG it is all a resumed run needs to continue exactly."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, session: Session) -> None:
        """Write the full checkpoint of the session at this state (every process calls it;
        rank 0 writes, with each process's RNG state)."""
        rngs = session.world.gather(rng_state(session.device))
        if not session.world.main:
            return
        session.run.save_checkpoint({
            "model": session.model.state_dict(), "optimizer": session.optimizer.state_dict(),
            "scheduler": session.scheduler.state_dict(), "rng": rngs[0],
            **({"process_rngs": rngs} if len(rngs) > 1 else {}),
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "loss_sum": self.loss_sum,
            "history": self.history,
        })

    @classmethod
    def load(cls, checkpoint: dict[str, Any], session: Session) -> TrainState:
        """Restore the weights, optimizer, scheduler and RNG of ``checkpoint`` into the
        session, and return the state it was saved at."""
        load_model_state(session.model, checkpoint["model"], session.run.path)
        session.optimizer.load_state_dict(checkpoint["optimizer"])
        session.scheduler.load_state_dict(checkpoint["scheduler"])
        state = cls(checkpoint["epoch"], checkpoint["batch"], checkpoint["step"], checkpoint["loss_sum"],
                    list(checkpoint["history"]))
        world = session.world
        rngs = checkpoint.get("process_rngs") or [checkpoint["rng"]]
        if len(rngs) == world.size:
            set_rng_state(rngs[world.rank], session.device)  # the same processes: exactly as it was
        else:
            set_rng_state(checkpoint["rng"], session.device)
            _fork_process_rng(session, state.step)
        return state


@dataclass
class Session:
    """What one training session works with: the run, its data and model, the objective
    and optimizer, and the fixed images scored after every epoch."""

    run: RunDir
    config: RunConfig
    train: TrainConfig
    model: Family
    data: Dataset
    device: torch.device
    objective: Any
    step_loss: CompiledLoss  # the objective of one step, compiled unless --no-compile
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    train_eval: torch.Tensor
    valid_eval: torch.Tensor
    valid_labels: torch.Tensor | None
    image_shape: tuple[int, ...] | None
    log: Log
    progress: bool
    world: World = field(default_factory=World)
    board: Any = None  # TensorBoard writer, when tensorboard is installed
    curves_drawn: float = -math.inf  # time.monotonic() of the last curves.png
    #: figures taken but not drawn yet (``--figures end``), by file name
    pending: dict[str, Callable[[], Any]] = field(default_factory=dict)

    @classmethod
    def start(cls, run: RunDir, config: RunConfig, model: Family, data: Dataset, device: torch.device,
              log: Log | None, progress: bool, world: World | None = None) -> Session:
        train = config.train
        world = world or World()
        model.to(device)
        optimizer = make_optimizer(model.parameters(), train.lr, eps=ADAM_EPS[train.lr_schedule],
                                   betas=adam_betas(train, model))
        # the same random images at every epoch
        rows = {name: random_rows(len(data.split(name)), train.eval_size, train.seed) for name in ("train", "valid")}
        objective = make_objective(train.objective, train.particles, train.alpha, train.insomnia)
        log = log if log and world.main else lambda message: None
        return cls(
            run=run, config=config, train=train, model=model, data=data, device=device,
            objective=objective, step_loss=CompiledLoss(model, objective, train.beta, log, train.compile),
            optimizer=optimizer,
            scheduler=make_scheduler(optimizer, train),
            steps_per_epoch=model.steps_per_epoch(data, train.batch_size),
            train_eval=data.eval_data("train")[rows["train"]].to(device),
            valid_eval=data.eval_data("valid")[rows["valid"]].to(device),
            valid_labels=data.labels["valid"][rows["valid"]].to(device) if "valid" in data.labels else None,
            image_shape=config.data.image_shape,
            log=log, progress=progress and world.main,
            world=world, board=_tensorboard(run.path / "tensorboard") if world.main else None,
        )

    def kl_weight(self, step: int) -> float:
        """The KL weight of 0-based ``step`` under ``kl_schedule`` (see ``TrainConfig``)."""
        return kl_weight(self.train, step, self.steps_per_epoch)


def kl_weight(train: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """beta, reached over the first ``kl_warmup`` epochs linearly or along a sigmoid, or
    Fu et al.'s cyclical schedule: ``kl_cycles`` equal cycles over all the run's steps,
    each rising linearly from 0 (at its first step) to beta half-way and then flat."""
    beta = train.beta
    if train.kl_schedule == "cyclical":
        period = train.epochs * steps_per_epoch / train.kl_cycles
        return beta * min(1.0, (step % period) / (period / 2))
    warmup_steps = train.kl_warmup * steps_per_epoch
    if not warmup_steps:
        return beta
    if train.kl_schedule == "sigmoid":
        if step + 1 >= warmup_steps:
            return beta
        return beta / (1 + math.exp(-SIGMOID_SLOPE * ((step + 1) / warmup_steps - 0.5)))
    return beta * min(1.0, (step + 1) / warmup_steps)


def _check_shares(world: World, batch_size: int) -> None:
    """Refuse a batch too small to give every process a row."""
    if batch_size < world.size:
        raise ConfigError(f"{{batch_size}} is the batch of one step, shared by the {world.size} processes: "
                          f"it must be at least {world.size}, one image each", batch_size=Flag("batch_size"))


def _fork_process_rng(s: Session, step: int) -> None:
    """Give processes other than rank 0 generator streams of their own (rank 0 keeps the
    run's, which is the single-process stream), keyed by the seed, the step and the rank."""
    if s.world.rank:
        torch.manual_seed(fold(s.train.seed, step, s.world.rank))
        if s.device.type == "cuda":
            torch.cuda.manual_seed(fold(s.train.seed, step, s.world.rank))


def _train(run: RunDir, open_session: Callable[[], Session], checkpoint: dict[str, Any] | None) -> Run:
    """Start the session and train from ``checkpoint`` (None: from the start) to the
    configured number of epochs, holding the run's lock throughout."""
    s = None
    try:
        s = open_session()
        train = s.train
        if checkpoint is None:
            s.model.init_from_data(s.data, train.seed)
            state = TrainState()
            _sample_figure(s, 0)
            _fork_process_rng(s, 0)
        else:
            state = TrainState.load(checkpoint, s)
            s.log(f"resuming {s.run.path} at epoch {state.epoch + 1}"
                  + (f", batch {state.batch + 1}" if state.batch else ""))
        first_step = state.step
        best = max((row["valid_bound"] for row in state.history if "valid_bound" in row), default=-math.inf)
        stopped = False
        with _deferred_interrupt() as interrupted:
            while state.epoch < train.epochs and not stopped:
                start_time = time.perf_counter()
                s.model.train()
                kl_weight, stopped = _epoch_steps(s, state, first_step, interrupted)
                if stopped:
                    break
                row = s.world.broadcast(_score_epoch(s, state, kl_weight, start_time))
                state.history.append(row)
                state.epoch, state.batch, state.loss_sum = state.epoch + 1, 0, 0.0
                state.save(s)
                if s.world.main:
                    s.run.write_metrics(state.history)
                    if row.get("valid_bound", -math.inf) > best:
                        s.run.save_checkpoint({"model": s.model.state_dict(), "epoch": state.epoch}, "best.pt")
                    _report_epoch(s, state, row)
                best = max(best, row.get("valid_bound", -math.inf))
        if stopped:
            state.save(s)
            if s.world.main:
                _closing_figures(s, state, finished=False)
            name = signal.Signals(interrupted.signum).name
            raise Interrupted(
                f"stopped by {name} at epoch {state.epoch + 1}, after batch {state.batch}; the state is saved: "
                f"continue with {{resume}}", interrupted.signum,
                resume=Flag("resume", True, cli=f"pyro-vae fit {s.config.model} --run-dir {s.run.path} --resume"))
        if s.world.main:
            _closing_figures(s, state, finished=True)
        return Run(s.run, s.config, s.model, state.history)
    except PeerLost as e:
        raise PeerLost(f"{e}; stopped, and the last checkpoint in {run.path} is as it was: continue with "
                       "{resume}", resume=Flag("resume", True, cli="--resume")) from None
    finally:
        if s is not None and s.board is not None:
            s.board.close()
        run.unlock()


def _epoch_steps(s: Session, state: TrainState, first_step: int, interrupted: _Stop) -> tuple[float, bool]:
    """The rest of the current epoch's steps, until a stop is asked for (Ctrl-C or SIGTERM,
    in any process: all stop after the same step); returns the last KL weight and whether
    it stopped early."""
    train = s.train
    kl_weight = train.beta
    params = list(s.model.parameters())
    batches = s.model.training_batches(s.data, train.batch_size, state.epoch, train.seed, s.device,
                                       start=state.batch)
    s.step_loss.compiled.recheck()  # each trace verified against eager code once an epoch
    bar = click.progressbar(length=s.steps_per_epoch - state.batch, file=sys.stderr,
                            label=f"epoch {state.epoch + 1}/{train.epochs}")
    with bar if s.progress else contextlib.nullcontext():
        for batch in batches:
            kl_weight = s.kl_weight(state.step)
            rows, shard = batch[0].shape[0], s.world.shard(batch)
            s.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            if shard is not None:
                # Pyro's and torch's argument checks cost time on every step: they run on
                # the first step of each session only, to catch a malformed model early.
                with pyro.validation_enabled(state.step == first_step):
                    loss = s.step_loss(shard, kl_weight)
                loss.backward()
                loss_sum = loss.item()
            # one all-reduce: the gradients, the loss and whether a stop was asked for anywhere
            loss_sum, stops = s.world.reduce_gradients(params, loss_sum, float(interrupted.is_set()))
            if stops and not interrupted.is_set():
                interrupted.signum = signal.SIGTERM  # asked for in another process
            value = loss_sum / rows
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"the loss became {value} at epoch {state.epoch + 1}, batch {state.batch + 1}; stopped. "
                    f"The last good checkpoint (end of epoch {state.history[-1]['epoch'] if state.history else 0}) "
                    f"is kept in {s.run.path}. Try a lower {{lr}} or {{grad_clip}}",
                    lr=Flag("lr"), grad_clip=Flag("grad_clip", 10))
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(s.model.parameters(), train.grad_clip)
            s.optimizer.step()
            state.loss_sum += value
            state.batch += 1
            state.step += 1
            if s.progress:
                bar.update(1)
            if stops:
                return kl_weight, True
    return kl_weight, False


def _score_epoch(s: Session, state: TrainState, kl_weight: float, start_time: float) -> dict[str, Any] | None:
    """The epoch's metrics row: the objective on fixed training and validation images and
    the family's scores (on the epochs ``eval_every`` picks), the training objective and
    timings (on rank 0; None elsewhere). Steps the learning-rate schedule (everywhere)."""
    steps_seconds = time.perf_counter() - start_time
    lr = s.optimizer.param_groups[0]["lr"]
    s.scheduler.step()
    if not s.world.main:
        return None  # rank 0 scores and broadcasts the row
    epoch = state.epoch + 1
    scores: dict[str, Any] = {}
    if epoch % s.train.eval_every == 0 or epoch == s.train.epochs:
        s.model.eval()
        with fixed_rng(s.train.seed + 1, s.device):
            scores = {
                **s.model.epoch_scores(s.objective, s.train_eval, s.valid_eval),
                **{f"valid_{k}": v for k, v in s.model.metrics(s.valid_eval, s.valid_labels).items()
                   if isinstance(v, (int, float))},
            }
    return {
        "epoch": epoch,
        "step": state.step,
        "train_loss": state.loss_sum / state.batch,
        **scores,
        "kl_weight": kl_weight,
        "lr": lr,
        "seconds": time.perf_counter() - start_time,  # the steps and the scores above
        "steps_seconds": steps_seconds,
        "processes": s.world.size,
    }


def _tensorboard(path: Path) -> Any:
    """A TensorBoard writer into ``path``, or None when the tensorboard package is not
    installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def _report_epoch(s: Session, state: TrainState, row: dict[str, Any]) -> None:
    """The epoch's log line, the curves, and samples at the middle and the end."""
    if "valid_bound" in row:
        scores = "".join(f"  {k[6:]} {v:.4f}" for k, v in row.items()
                         if k.startswith("valid_") and k != "valid_bound")
        s.log(f"epoch {row['epoch']}/{s.train.epochs}  train {row['train_bound']:.2f}  "
              f"valid {row['valid_bound']:.2f} nats/image{scores}  ({row['seconds']:.1f} s)")
    else:
        s.log(f"epoch {row['epoch']}/{s.train.epochs}  training objective {-row['train_loss']:.2f} nats/image, "
              f"not scored (every {s.train.eval_every} epochs)  ({row['seconds']:.1f} s)")
    if s.train.figures == "every" and (time.monotonic() - s.curves_drawn >= CURVES_SECONDS
                                       or row["epoch"] == s.train.epochs):
        _draw_curves(s, state)
    if s.board is not None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                s.board.add_scalar(key, value, row["epoch"])
        s.board.flush()
    if row["epoch"] in (s.train.epochs // 2, s.train.epochs):
        _sample_figure(s, row["epoch"])


def _draw_curves(s: Session, state: TrainState) -> None:
    s.model.curves(state.history, s.run.figures / "curves.png", title=s.run.path.name)
    s.curves_drawn = time.monotonic()


def _figure(s: Session, name: str, draw: Callable[[], Any]) -> None:
    """Draw a figure whose content is fixed already: now with ``--figures every``, else
    when training ends or stops (``_closing_figures``)."""
    if s.train.figures == "every":
        draw()
    else:
        s.pending[name] = draw


def _closing_figures(s: Session, state: TrainState, finished: bool) -> None:
    """The figures drawn when training ends (``finished``) or stops: those kept for the
    end, the curves of the whole history, and at the end the reconstructions and the
    family's own figures. The same files whenever they are drawn."""
    if s.train.figures == "none":
        return
    for draw in s.pending.values():
        draw()
    s.pending.clear()
    # with --figures every the last epoch drew the curves already
    if state.history and (s.train.figures == "end" or not finished):
        _draw_curves(s, state)
    if finished:
        _final_figures(s)


def _final_figures(s: Session) -> None:
    """Reconstructions and the family's own figures, at the end of training."""
    if s.image_shape is None:
        return
    if s.model.has_encoder:
        x = s.valid_eval[:50]
        plots.reconstructions(x, s.model.reconstruct(x), s.image_shape, s.run.figures / "reconstructions.png")
    with fixed_rng(s.train.seed, s.device):
        s.model.figures(s.valid_eval, s.valid_labels, s.image_shape, s.run.figures)


class _Stop(threading.Event):
    """Set when a stop was asked for, with the number of the signal that asked."""

    signum: int = signal.SIGINT


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[_Stop]:
    """Turn Ctrl-C (SIGINT) and SIGTERM (what schedulers and ``timeout`` send) into a flag
    that the loop reads between steps, so that the state it saves is never half-way
    through an optimizer update. A second signal stops at once (the checkpoint of the
    last finished epoch stays)."""
    flag = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.signum = signum
        flag.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _sample_figure(s: Session, epoch: int) -> None:
    """Samples from the same prior draws at each point of training, so grids compare."""
    if s.image_shape is None or not s.world.main or s.train.figures == "none":
        return
    s.model.eval()
    with fixed_rng(s.train.seed, s.device):
        images = s.model.sample(s.model.figure_samples)
    label = "before training" if epoch == 0 else f"after epoch {epoch}"
    name = f"samples-epoch{epoch:04d}.png"
    _figure(s, name, lambda: plots.image_grid(images, s.image_shape, s.run.figures / name,
                                             title=f"samples {label}"))


_continue = resume  # for fit, whose argument ``resume`` hides the function


def load_run(path: str | Path, checkpoint: str = "last", device: str = "cpu") -> Run:
    """Rebuild a trained model from its run directory: ``checkpoint`` is ``last`` (the
    latest saved state) or ``best`` (best validation bound)."""
    run = RunDir.open(path)
    config = RunConfig.read(run)
    names = {"last": "checkpoint.pt", "best": "best.pt"}
    if checkpoint not in names:
        raise ConfigError(f"{{checkpoint}} must be last or best, got {checkpoint!r}", checkpoint=Flag("checkpoint"))
    dev = current_world().device(resolve_device(device))
    state = run.load_checkpoint(names[checkpoint], map_location=dev)
    model = config.build_model()
    load_model_state(model, state["model"], run.path)
    model.to(dev).eval()
    try:
        history = run.metrics()
    except ValueError:
        raise RunError(f"{run.path / 'metrics.jsonl'} is damaged (a line is not JSON); restore it, or retrain") from None
    return Run(run, config, model, history)
