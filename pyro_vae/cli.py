"""The ``pyro-vae`` command line: a thin layer of click over the library.

Each model family in the registry becomes a ``pyro-vae fit NAME`` command whose options
are generated from its config dataclass and from ``TrainConfig``, so a new family needs no
change here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
from click.core import ParameterSource

from . import distributed, plots, text
from .threads import use_threads
from .ais import STARTS
from .evaluation import (ais_arrays, evaluate_ais, evaluate_bdmc, evaluate_run, evaluation_path, format_summary,
                         nonempty_split, split_data, write_evaluation)
from .data import DATASETS, default_data_dir, random_rows
from .config import MAX_SEED, is_nested
from .errors import ConfigError, Flag, Interrupted, PyroVAEError
from .runs import atomic_write, check_writable, write_json, write_npy, write_npz
from .models import MODELS
from .models.base import OBSERVATIONS
from .objectives import objective_spec
from .metrics import cluster_accuracy
from .train import TrainConfig, load_run, resolve, resume as resume_run, start as start_run

#: what ``fit --resume`` may change: neither changes the weights trained
RESUME_CHANGES = ("epochs", "eval_every")
RUNTIME_OPTIONS = ("run_dir", "data_dir", "device", "download", "resume", "overwrite", "quiet", "backend", "threads")


class Group(click.Group):
    """A click group that prints library errors as one line, in the words of the command
    line, and exits with status 1; a stopped training run prints a plain line and exits
    with the shell's status for its signal (130 for Ctrl-C, 143 for SIGTERM); a file
    system error (full disk, no permission) is one line too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Interrupted as e:
            click.echo(e.cli_message(), err=True)
            ctx.exit(e.exit_code)
        except PyroVAEError as e:
            raise click.ClickException(e.cli_message()) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(128 + signal.SIGINT)
        except OSError as e:
            where = f" {e.filename}" if e.filename else ""
            raise click.ClickException(f"cannot read or write{where}: {e.strerror or e}") from None


def _tuple_of_ints(value: str, name: str) -> tuple[int, ...]:
    """Comma-separated sizes of the option ``name`` (a field's name), each a positive integer."""
    hint = f"'{Flag(name).cli()}'"
    try:
        sizes = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 200,200, got {value!r}",
                                 param_hint=hint) from None
    if any(s < 1 for s in sizes):
        raise click.BadParameter(f"layer sizes must be positive, got {value!r}", param_hint=hint)
    return sizes


#: joins a nested config's field to the field holding it in an option's name (m1__z_dim)
NESTED = "__"


def _options_from_dataclass(cls: type, prefix: str = "", help_prefix: str = "") -> list[click.Option]:
    """One ``--field-name`` option per dataclass field, typed from its annotation, with the
    help text and choices that the field's metadata carries (``config.option``); the fields
    of a nested config (``config.nested``) become ``--outer-field-name`` options."""
    hints = typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        hint, name = hints[f.name], prefix + f.name
        help_text, choices = f.metadata.get("help"), f.metadata.get("choices")
        if is_nested(f):
            options += _options_from_dataclass(hint, name + NESTED, f"{help_prefix}{help_text}: ")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args and typing.get_origin(hint) is not tuple else hint
        flag = "--" + name.replace(NESTED, "-").replace("_", "-")
        help_text = help_prefix + help_text if help_text else None
        if base is bool:
            options.append(click.Option([f"{flag}/--no-{flag[2:]}", name], default=f.default,
                                        show_default=True, help=help_text))
            continue
        if choices:
            kind: Any = click.Choice(choices)
        elif typing.get_origin(hint) is tuple:
            kind = click.STRING
        else:
            kind = {int: click.INT, float: click.FLOAT, str: click.STRING}[base]
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        options.append(click.Option([flag, name], type=kind, default=shown,
                                    show_default=default is not None, help=help_text))
    return options


def _values_from_options(cls: type, opts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config dict of ``cls`` from the options ``_options_from_dataclass`` made for it."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if is_nested(f):
            values[f.name] = _values_from_options(hints[f.name], opts, name + NESTED)
        elif typing.get_origin(hints[f.name]) is tuple:
            values[f.name] = _tuple_of_ints(opts[name], name.replace(NESTED, '.'))
        else:
            values[f.name] = opts[name]
    return values


#: options that several commands share, declared once here: (declarations, click settings)
SHARED: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "run_dir": (("run_dir",), dict(type=click.Path(file_okay=False))),  # the argument RUN_DIR
    "split": (("--split",), dict(default="test", show_default=True, type=click.Choice(["train", "valid", "test"]))),
    "limit": (("--limit",), dict(type=click.IntRange(min=1))),
    "checkpoint": (("--checkpoint",), dict(default="last", show_default=True, type=click.Choice(["last", "best"]))),
    "seed": (("--seed",), dict(default=0, show_default=True, type=click.IntRange(0, MAX_SEED))),
    "output": (("--output",), dict(type=click.Path(dir_okay=False))),
    "data_dir": (("--data-dir",), dict(type=click.Path(file_okay=False),
                                       help="dataset folder (default: $PYRO_VAE_DATA or ~/.cache/pyro_vae)")),
    "device": (("--device",), dict(default="auto", show_default=True, help="cpu, cuda, cuda:N or auto")),
    "download": (("--download/--no-download",), dict(default=True, show_default=True,
                                                     help="download missing datasets")),
    "backend": (("--backend",), dict(type=click.Choice(distributed.BACKENDS), default="auto", show_default=True,
                                     help="under torchrun: how the processes talk (auto: nccl for CUDA devices, "
                                          "gloo for CPUs)")),
    "threads": (("--threads",), dict(type=click.IntRange(min=1), default=None,
                                     help="torch threads for this command (default: OMP_NUM_THREADS, else the cores; "
                                          "under torchrun the cores / processes on this machine)")),
}
#: what a command that reads a run's data needs
RUNTIME = ("data_dir", "device", "download")


def shared(*names: str, help: str | None = None) -> Callable[[Any], Any]:
    """A decorator adding the shared options ``names`` to a command, in that order;
    ``help`` (with one name) is that option's help in this command."""
    def add(f: Any) -> Any:
        for name in reversed(names):
            decls, settings = SHARED[name]
            if help is not None:
                settings = {**settings, "help": help}
            f = (click.argument if name == "run_dir" else click.option)(*decls, **settings)(f)
        return f
    return add


def _shared_params(*names: str) -> list[click.Option]:
    """The shared options ``names`` as click parameters, for a command built from a list."""
    return [click.Option(list(SHARED[n][0]), **SHARED[n][1]) for n in names]


@click.group(cls=Group)
@click.version_option(package_name="pyro_vae")
def main() -> None:
    """Variational autoencoders as Pyro model/guide pairs: fit, evaluate, sample."""


@main.group(cls=Group)
def fit() -> None:
    """Train a model family (see each one's --help)."""


def _make_fit_command(name: str, cls: type) -> click.Command:
    def callback(**opts: Any) -> None:
        use_threads(opts["threads"])
        with _process_group(opts["backend"], opts["device"]) as world:
            _fit(ctx=click.get_current_context(), world=world, **opts)

    def _fit(ctx: click.Context, world: distributed.World, **opts: Any) -> None:
        log = None if opts["quiet"] else click.echo
        if opts["resume"]:
            resume = Flag("resume", True, cli="--resume")
            if opts["run_dir"] is None:
                raise ConfigError("{resume} needs the {run_dir} of the run to continue", resume=resume,
                                  run_dir=Flag("run_dir"))
            if opts["overwrite"]:
                raise ConfigError("{resume} continues a run and {overwrite} replaces it: pass one of them",
                                  resume=resume, overwrite=Flag("overwrite", True, cli="--overwrite"))
            given = [k for k in opts if k not in RUNTIME_OPTIONS + RESUME_CHANGES
                     and ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE]
            if given:
                names = {f"given{i}": Flag(g.replace(NESTED, ".")) for i, g in enumerate(given)}
                raise ConfigError("a resumed run keeps its saved config; only {epochs} and {eval_every} may "
                                  "change, not " + ", ".join("{" + key + "}" for key in names),
                                  epochs=Flag("epochs"), eval_every=Flag("eval_every"), **names)
            changes = {k: opts[k] for k in RESUME_CHANGES
                       if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
            run = resume_run(opts["run_dir"], **changes, model_name=name, data_dir=opts["data_dir"],
                             device=opts["device"], download=opts["download"], log=log,
                             progress=not opts["quiet"] and sys.stderr.isatty())
        else:
            model_config = _values_from_options(cls.Config, opts)
            train = TrainConfig(**{f.name: opts[f.name] for f in dataclasses.fields(TrainConfig)})
            run = start_run(resolve(name, model_config, train), opts["run_dir"], data_dir=opts["data_dir"],
                            device=opts["device"], download=opts["download"], log=log,
                            progress=not opts["quiet"] and sys.stderr.isatty(), overwrite=opts["overwrite"])
        final = run.history[-1]
        if world.main:
            click.echo(f"done: {run.dir.path}  valid {cls.score_name} {final['valid_bound']:.2f} nats/image; "
                       f"next: pyro-vae evaluate {run.dir.path} {cls.evaluate_hint}")

    params = _options_from_dataclass(cls.Config) + _options_from_dataclass(TrainConfig) + [
        click.Option(["--run-dir"], type=click.Path(file_okay=False),
                     help="where the run goes (default: runs/NAME-DATE-TIME); never overwritten "
                          "without --overwrite"),
        click.Option(["--resume"], is_flag=True, help="continue the run in --run-dir where it stopped"),
        click.Option(["--overwrite"], is_flag=True,
                     help="replace the run in --run-dir (e.g. one that stopped before its first checkpoint): "
                          "only a pyro_vae run holding nothing but its own files, and only those are removed"),
        *_shared_params(*RUNTIME, "backend", "threads"),
        click.Option(["--quiet", "-q"], is_flag=True, help="no progress bar or per-epoch lines"),
    ]
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    particles = objective_spec(cls.default_objective).default_particles or cls.default_particles
    return click.Command(name, callback=callback, params=params,
                         help=f"{doc} Trained by default with the {cls.default_objective} objective"
                              + (f" and {particles} particles." if particles > 1 else "."))


@contextlib.contextmanager
def _process_group(backend: str, device: str) -> Any:
    """Join torchrun's processes for the command (alone: nothing to join), and leave. Rank
    0 prints the errors that every process meets alike; the others exit with their status
    without a word, unless the error is theirs alone (a lost peer)."""
    world = distributed.init(backend, device)
    done = False
    try:
        yield world
        done = True
    except PyroVAEError as e:
        if not world.reports(e):
            raise click.exceptions.Exit(e.exit_code) from None
        raise
    finally:
        distributed.finish(together=done)


for _name, _cls in MODELS.items():
    fit.add_command(_make_fit_command(_name, _cls))


@main.command()
@shared("run_dir")
@click.option("--iw", default=5000, show_default=True, type=click.IntRange(min=1),
              help="importance samples per image (K)")
@shared("split")
@shared("limit", help="score a random subset of this many images")
@shared("checkpoint")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--max-rows", default=2_000, show_default=True, type=click.IntRange(min=1),
              help="(image, sample) pairs through the networks at once: bounds memory")
@shared("seed")
@shared("output", help="JSON file (default: RUN_DIR/eval-SPLIT-iwK[-nN][-best].json)")
@click.option("--compile/--no-compile", default=True, show_default=True,
              help="trace each chunk of the estimate once per shape and run the trace (the same numbers, faster)")
@click.option("--ais", type=click.IntRange(min=1),
              help="also annealed importance sampling of log p(x) per image, with this many distributions (T)")
@click.option("--chains", default=16, show_default=True, type=click.IntRange(min=1),
              help="AIS chains per image (C)")
@click.option("--leapfrog", default=10, show_default=True, type=click.IntRange(min=1),
              help="leapfrog steps per HMC transition of AIS (L)")
@click.option("--ais-start", default="guide", show_default=True, type=click.Choice(STARTS),
              help="where AIS starts: the guide q(z | x), or the model's prior (needed for a flow guide)")
@click.option("--bdmc", type=click.IntRange(min=1),
              help="also BDMC on this many images simulated from the model, at T = --ais (1000 when not given)")
@click.option("--observation", type=click.Choice(OBSERVATIONS),
              help="for a model without a density (gan): score it by this observation model p(x | z); "
                   "gaussian: N(G(z), sigma^2 I), Wu et al. 2017")
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True),
              help="the standard deviation of --observation gaussian")
@shared(*RUNTIME, "backend", "threads")
def evaluate(run_dir: str, iw: int, split: str, limit: int | None, checkpoint: str, batch_size: int,
             max_rows: int, seed: int, output: str | None, compile: bool, ais: int | None, chains: int,
             leapfrog: int, ais_start: str, bdmc: int | None, observation: str | None, sigma: float | None,
             data_dir: str | None, device: str, download: bool, backend: str, threads: int | None) -> None:
    """Estimate ELBO, the IWAE-k sweep and log p(x) per image, with K importance samples.
    Each image's draws are keyed by the seed and its row in the split, so its estimates do
    not depend on --batch-size, --max-rows, --limit or the number of processes. With
    --ais, AIS estimates beside them; with --bdmc, the BDMC bounds on simulated images."""
    use_threads(threads)
    ctx = click.get_current_context()
    if ais is None and bdmc is None:
        for name in ("chains", "leapfrog", "ais_start"):
            if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
                raise ConfigError("{given} sets up AIS: pass {ais} (or {bdmc}) too", given=Flag(name),
                                  ais=Flag("ais", cli="--ais T"), bdmc=Flag("bdmc", cli="--bdmc N"))
    with _process_group(backend, device) as world:
        if world.size > 1 and (ais or bdmc):
            raise ConfigError("{ais} and {bdmc} run in one process: start without torchrun",
                              ais=Flag("ais"), bdmc=Flag("bdmc"))
        run = load_run(run_dir, checkpoint, device)
        run.model.set_observation(observation, sigma)
        out = Path(output) if output else evaluation_path(run, split, iw, limit, checkpoint, ais, bdmc, sigma)
        with world.together():
            if world.main:
                check_writable(out)  # before minutes of work, not after
        x, labels, index = world.main_first(lambda: split_data(run, split, limit, seed, data_dir, download))
        share = len(range(len(x))[world.block(len(x))])
        bar = click.progressbar(length=share, label=f"log p(x), K={iw}", file=sys.stderr)
        with bar if world.main else contextlib.nullcontext():
            summary, est = evaluate_run(run, x, labels, iw, seed=seed, batch_size=batch_size, max_rows=max_rows,
                                        progress=bar.update if world.main else None, index=index, compile=compile,
                                        log=(lambda m: click.echo(m, err=True)) if world.main else None)
        ais_est = bdmc_est = None
        options = dict(chains=chains, leapfrog=leapfrog, start=ais_start, seed=seed, batch_size=batch_size,
                       max_rows=max_rows)
        if ais:
            with click.progressbar(length=len(x), label=f"AIS, T={ais}", file=sys.stderr) as bar:
                summary["ais"], ais_est = evaluate_ais(run, x, ais, index=index, progress=bar.update, **options)
        if bdmc:
            steps = ais or 1000
            with click.progressbar(length=bdmc, label=f"BDMC, T={steps}", file=sys.stderr) as bar:
                summary["bdmc"], bdmc_est = evaluate_bdmc(run, x, bdmc, steps, progress=bar.update, **options)
        if world.main:
            write_evaluation(summary, est, out, checkpoint, split, index, ais_arrays(ais_est, bdmc_est))
            click.echo(format_summary(summary))
            click.echo(f"wrote {out} and per-image estimates in {out.with_suffix('.npz')}")


def _write_lines(out: Path, lines: list[str]) -> None:
    """Print ``lines`` and write them to ``out`` (atomically)."""
    check_writable(out)
    body = "\n".join(lines) + "\n"
    click.echo(body, nl=False)
    atomic_write(out, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
    click.echo(f"wrote {out}")


@main.command()
@shared("run_dir")
@click.option("-n", "--num", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--draw", "--binary", "draw", is_flag=True,
              help="draw pixels from the likelihood (0/1 for a Bernoulli) instead of showing its mean")
@click.option("--by-class", is_flag=True, help="models with a label: NUM samples of each class, rows = classes")
@shared("checkpoint", "seed")
@shared("output", help="PNG (default: RUN_DIR/figures/samples.png)")
@shared("device")
def sample(run_dir: str, num: int, draw: bool, by_class: bool, checkpoint: str, seed: int,
           output: str | None, device: str) -> None:
    """Draw images from a trained model: a PNG grid and the raw array (.npy)."""
    run = load_run(run_dir, checkpoint, device)
    torch.manual_seed(seed)
    if run.config.data.kind == "text":
        _write_lines(Path(output) if output else run.dir.path / "samples.txt",
                     text.sample_lines(run.model, text.Vocabulary(run.config.data.vocab), num))
        return
    if by_class:
        if not run.model.has_classes:
            raise ConfigError(f"{run_dir} is a {run.model_name} run, which has no label to sample by "
                              f"({', '.join(n for n, c in MODELS.items() if c.has_classes)} has)")
        images = run.model.sample_by_class(num, draw=draw).cpu()
    else:
        images = run.model.sample(num, draw=draw).cpu()
    out = Path(output) if output else run.dir.figures / "samples.png"
    check_writable(out)
    write_npy(out.with_suffix(".npy"), images.numpy())
    shape = run.data_info.get("image_shape")
    if shape:
        title = f"{num} samples of each class (rows)" if by_class else f"{num} samples"
        plots.image_grid(images, shape, out, title=title, ncol=num if by_class else None)
        click.echo(f"wrote {out} and {out.with_suffix('.npy')}")
    else:
        click.echo(f"wrote {out.with_suffix('.npy')} (the data has no image shape to plot)")


@main.command()
@shared("run_dir")
@click.option("-n", "--num", default=30, show_default=True, type=click.IntRange(min=1))
@shared("split", "checkpoint", "seed")
@shared("output", help="PNG (default: RUN_DIR/figures/reconstructions.png; text: RUN_DIR/reconstructions.txt)")
@click.option("--text", "sentences", multiple=True,
              help="text runs: reconstruct this sentence instead of the split's (repeat for more; the first two "
                   "give the homotopy); words outside the vocabulary read as <unk>")
@shared(*RUNTIME)
def reconstruct(run_dir: str, num: int, split: str, checkpoint: str, seed: int, output: str | None,
                sentences: tuple[str, ...], data_dir: str | None, device: str, download: bool) -> None:
    """Show random images of a split beside their reconstructions; for text, print each
    sentence, the decode of its posterior mean and of three draws, and a homotopy."""
    run = load_run(run_dir, checkpoint, device)
    _needs_encoder(run, "reconstruct")
    if run.config.data.kind == "text":
        vocab = text.Vocabulary(run.config.data.vocab)
        out = Path(output) if output else run.dir.path / "reconstructions.txt"
        check_writable(out)
        if sentences:
            x, unknown = text.encode_text(sentences, vocab)
            if unknown:
                click.echo(f"note: {', '.join(sorted(set(unknown)))} not in the vocabulary: read as <unk>")
        else:
            x = nonempty_split(run.load_data(data_dir, download), split)
            x = x[random_rows(x.shape[0], num, seed)]
        torch.manual_seed(seed)
        _write_lines(out, text.reconstruction_lines(run.model, vocab, x.to(run.model.device)))
        return
    if sentences:
        raise ConfigError("{text} is for text runs; this run's data are images", text=Flag("text"))
    if not run.data_info.get("image_shape"):
        raise ConfigError("this run's data has no image shape, so there is nothing to draw")
    out = Path(output) if output else run.dir.figures / "reconstructions.png"
    check_writable(out)
    x = nonempty_split(run.load_data(data_dir, download), split)
    x = x[random_rows(x.shape[0], num, seed)]
    x = x.to(run.model.device)
    plots.reconstructions(x, run.model.reconstruct(x), run.data_info["image_shape"], out)
    click.echo(f"wrote {out}")


@main.command()
@shared("run_dir")
@shared("checkpoint", "seed", *RUNTIME)
def plot(run_dir: str, checkpoint: str, seed: int, data_dir: str | None, device: str, download: bool) -> None:
    """Redraw a run's figures: bound curves and its family's own (latent manifold for a
    2-D latent space; samples per component and the latent space for the GMVAE)."""
    run = load_run(run_dir, checkpoint, device)
    if not run.history:
        raise ConfigError(f"{run_dir} has no metrics yet")
    written = [run.model.curves(run.history, run.dir.figures / "curves.png", title=run.dir.path.name)]
    shape = run.data_info.get("image_shape")
    if shape:
        data = run.load_data(data_dir, download)
        rows = random_rows(len(data.split("valid")), run.train.eval_size, run.train.seed)
        x = data.eval_data("valid")[rows].to(run.model.device)
        labels = data.labels["valid"][rows] if "valid" in data.labels else None
        torch.manual_seed(seed)
        written += run.model.figures(x, labels, shape, run.dir.figures)
    click.echo("wrote " + ", ".join(map(str, written)))


def _needs_encoder(run: Any, command: str) -> None:
    """Refuse a run whose family has no amortized posterior q(z | x), before anything is read."""
    if not run.model.has_encoder:
        raise ConfigError(f"{run.dir.path} is a {run.model_name} run, which has no encoder q(z | x) to {command} "
                          f"with ({', '.join(n for n, c in MODELS.items() if c.has_encoder)} have one)")


@main.command()
@shared("run_dir")
@shared("split")
@shared("limit", help="encode a random subset of this many images")
@shared("checkpoint", "seed")
@shared("output", help=".npz file (default: RUN_DIR/codes-SPLIT.npz)")
@shared(*RUNTIME)
def encode(run_dir: str, split: str, limit: int | None, checkpoint: str, seed: int, output: str | None,
           data_dir: str | None, device: str, download: bool) -> None:
    """Write the posterior means and scales of q(z | x) for a split to .npz: arrays
    ``loc`` and ``scale`` (images x latent dimensions), ``index`` (rows of the split) and,
    for labelled data, ``labels``: features for downstream use."""
    run = load_run(run_dir, checkpoint, device)
    _needs_encoder(run, "encode")
    out = Path(output) if output else run.dir.path / f"codes-{split}.npz"
    check_writable(out)
    x, labels, index = split_data(run, split, limit, seed, data_dir, download)
    pieces = [run.model.encode(x[i : i + 1000]) for i in range(0, len(x), 1000)]
    loc = torch.cat([p[0] for p in pieces]).cpu().numpy()
    scale = torch.cat([p[1] for p in pieces]).cpu().numpy()
    write_npz(out, index=index.numpy(), loc=loc, scale=scale,
                        **({} if labels is None else {"labels": labels.numpy()}))
    click.echo(f"wrote {out}: {loc.shape[0]} {split} images, {loc.shape[1]} latent dimensions")


@main.command()
@shared("run_dir")
@shared("split")
@click.option("--samples", default=100, show_default=True, type=click.IntRange(min=1),
              help="importance samples per image in the estimate of p(component | x)")
@shared("limit", help="assign a random subset of this many images")
@shared("checkpoint", "seed")
@shared("output", help="JSON file (default: RUN_DIR/clusters-SPLIT.json)")
@shared(*RUNTIME)
def cluster(run_dir: str, split: str, samples: int, limit: int | None, checkpoint: str, seed: int,
            output: str | None, data_dir: str | None, device: str, download: bool) -> None:
    """Assign images to mixture components by their posterior p(component | x); with
    labelled data, the clustering accuracy (each component mapped to its majority label)."""
    run = load_run(run_dir, checkpoint, device)
    if not run.model.has_clusters:
        raise ConfigError(f"{run_dir} is a {run.model_name} run; clustering needs a model with mixture "
                          f"components ({', '.join(n for n, c in MODELS.items() if c.has_clusters)})")
    out = Path(output) if output else run.dir.path / f"clusters-{split}.json"
    check_writable(out)
    x, labels, index = split_data(run, split, limit, seed, data_dir, download)
    torch.manual_seed(seed)
    assignment = run.model.assign(x, samples).cpu()
    sizes = torch.bincount(assignment, minlength=run.model.config.components)
    summary = {"run": str(run.dir.path), "checkpoint": checkpoint, "split": split, "seed": seed,
               "num_images": len(index), "samples": samples, "components": len(sizes),
               "used_components": int((sizes > 0).sum()),
               "accuracy": None if labels is None else cluster_accuracy(assignment, labels),
               "sizes": sizes.tolist()}
    write_json(out, summary)
    write_npz(out.with_suffix(".npz"), index=index.numpy(), assignment=assignment.numpy(),
                        **({} if labels is None else {"labels": labels.numpy()}))
    click.echo(f"{summary['num_images']} {split} images in {summary['used_components']} of "
               f"{summary['components']} components")
    if labels is not None:
        click.echo(f"clustering accuracy (majority label per component): {summary['accuracy']:.4f}")
    click.echo(f"wrote {out} and assignments in {out.with_suffix('.npz')}")


@main.command(help="Fetch a dataset now, for use offline later.\n\n\b\n" + "\n".join(
    f"{name:16} {spec.description}" for name, spec in DATASETS.items()))
@click.argument("dataset", type=click.Choice(list(DATASETS)))
@shared("data_dir", help="where to put it (default: $PYRO_VAE_DATA or ~/.cache/pyro_vae)")
def download(dataset: str, data_dir: str | None) -> None:
    """Fetch a dataset now, for use offline later (help lists the registry)."""
    root = Path(data_dir) if data_dir else default_data_dir()
    data = DATASETS[dataset].download(root)
    sizes = ", ".join(f"{k} {v.shape[0]}" for k, v in data.splits.items())
    click.echo(f"{dataset} ready in {root} ({sizes})")


if __name__ == "__main__":
    main()
