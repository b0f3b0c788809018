"""Families that stand on another trained run: M1+M2 takes its M1 from a VAE run.

The model (``models.m1m2``) only models; this module, part of the training layer, trains
or finds that run, checks that it suits, and copies its weights in. ``fit`` asks
``stacking(name)`` for the family's stages and calls them at three points: ``prepare``
before the data load (it may train the other run, with the ``fit`` it is handed, so that
this module needs no import of the loop), ``check_data`` once the data are loaded, and
``load`` once the model is built. A family without an entry gets ``Stacking()``, whose
stages do nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import Dataset
from .errors import ConfigError, DataError, Flag, PyroVAEError
from .models import M1M2Config, VAEConfig
from .runs import RunDir, load_model_state

#: the families whose pair is a VAE's, and so can serve as M1
M1_FAMILIES = ("vae", "iwae")


class Stacking:
    """The stages of a family that needs nothing from another run: each does nothing."""

    def prepare(self, config: Any, train: Any, run_dir: Path, fit: Callable[..., Any], **runtime: Any) -> Any:
        """The family's config completed before the model is built, once ``run_dir`` is
        known to be free; ``runtime`` holds ``fit``'s data_dir, device, download, log and
        progress."""
        return config

    def check_data(self, config: Any, data: Dataset) -> None:
        """Refuse data that the other run was not trained on."""

    def load(self, model: Any) -> None:
        """Copy the other run's weights into a newly built model."""


class M1Stacking(Stacking):
    """M1+M2's M1: the VAE run ``m1_run``, trained first into ``RUN_DIR-m1`` when none is given."""

    def prepare(self, config: M1M2Config, train: Any, run_dir: Path, fit: Callable[..., Any],
                **runtime: Any) -> M1M2Config:
        """M1's config ``m1`` from ``m1_run``, after training M1 into ``RUN_DIR-m1`` when
        no run is given (continuing it there if an earlier attempt stopped): a plain VAE
        with the ``m1`` options, on the same data, batches, learning rate and seed, for
        ``m1_epochs``. An ``m1`` option set to other than its default must agree with the run."""
        if config.m1_run is None:
            m1_dir = run_dir.with_name(run_dir.name + "-m1")
            m1_train = dataclasses.replace(train, epochs=config.m1_epochs, objective=None, particles=None,
                                           beta=1.0, kl_warmup=0.0)
            if not _finished(m1_dir, config.m1_epochs):
                log = runtime.get("log")
                if log:
                    log(f"training M1 (a VAE, {config.m1_epochs} epochs) into {m1_dir} first")
                fit("vae", config.m1, m1_train, m1_dir, resume=True, **runtime)
            config = dataclasses.replace(config, m1_run=str(m1_dir))
        m1 = _open_m1(config.m1_run)
        if m1["train"].get("dataset") != train.dataset:
            raise DataError(f"{{m1_run}} was trained on {m1['train'].get('dataset')}, not {train.dataset}: "
                            "M1 must be trained on the data M2 learns from", m1_run=Flag("m1_run", config.m1_run))
        recorded, defaults, taken = m1["model_config"], VAEConfig(), {}
        for f in dataclasses.fields(VAEConfig):
            if f.name not in recorded:
                continue
            asked = getattr(config.m1, f.name)
            value = _json_value(recorded[f.name], asked)
            if asked != getattr(defaults, f.name) and asked != value:
                raise ConfigError(f"{{asked}} contradicts {{m1_run}}, whose M1 has {f.name} {value!r}: M1's options "
                                  "are read from its run; leave them out", asked=Flag(f"m1.{f.name}", asked),
                                  m1_run=Flag("m1_run", config.m1_run))
            taken[f.name] = value
        return dataclasses.replace(config, m1=dataclasses.replace(config.m1, **taken))

    def check_data(self, config: M1M2Config, data: Dataset) -> None:
        """M1's run (while it exists) must have trained on these data, binarized the same way."""
        run = config.m1_run
        if run is None or not RunDir(run).is_run():
            return
        seen = _open_m1(run)["data"]
        ours = {"name": data.name, "x_dim": data.x_dim, "binarize": data.binarize,
                "image_shape": list(data.image_shape) if data.image_shape else None}
        for key, value in ours.items():
            if key in seen and seen[key] != value:
                raise DataError(f"{{m1_run}} was trained on data with {key} {seen[key]!r}; these have "
                                f"{value!r}: M1 must be trained on the data M2 learns from",
                                m1_run=Flag("m1_run", run))

    def load(self, model: Any) -> None:
        """M1's weights from its run's last checkpoint."""
        run = RunDir.open(model.config.m1_run)
        state = run.load_checkpoint(map_location=model.device)
        load_model_state(model.m1, state["model"], run.path)


STACKING: dict[str, Stacking] = {"m1m2": M1Stacking()}


def stacking(model_name: str) -> Stacking:
    """The stages of ``model_name``: its entry in ``STACKING``, else stages that do nothing."""
    return STACKING.get(model_name, Stacking())


def _finished(path: Path, epochs: int) -> bool:
    """Whether ``path`` holds a run whose last checkpoint has ``epochs`` epochs or more."""
    run = RunDir(path)
    if not run.has_checkpoint():
        return False
    return run.load_checkpoint(map_location="cpu").get("epoch", 0) >= epochs


def _open_m1(path: str) -> dict[str, Any]:
    """The config of the run at ``path``, refused unless it is a VAE run with a readable checkpoint."""
    where = Flag("m1_run", path)
    try:
        run = RunDir.open(path)
        config = run.config()
    except PyroVAEError as e:
        raise ConfigError(f"{{m1_run}}: {e}", m1_run=where) from None
    if config["model"] not in M1_FAMILIES:
        raise ConfigError(f"{{m1_run}} is a {config['model']} run; M1 must be a {' or '.join(M1_FAMILIES)} run",
                          m1_run=where)
    if not run.has_checkpoint():
        raise ConfigError("{m1_run} has no checkpoint yet: train it for at least one epoch", m1_run=where)
    try:
        run.load_checkpoint()  # a damaged one is refused now, before this run's folder is made
    except PyroVAEError as e:
        raise ConfigError(f"{{m1_run}}: {e}", m1_run=where) from None
    return config


def _json_value(value: Any, like: Any) -> Any:
    """A config value read from JSON (lists for tuples) in the type of ``like``."""
    return tuple(value) if isinstance(like, tuple) and isinstance(value, list) else value
