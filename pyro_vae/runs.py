"""Run directories: what a training run leaves on disk, and how it is read back.

    RUN/config.json      model name, model config, training config
    RUN/metrics.jsonl    one JSON object per epoch
    RUN/checkpoint.pt    latest full state (model, optimizer, RNG, history): resume from it
    RUN/best.pt          model weights at the best validation bound
    RUN/figures/         plots
    RUN/eval-*.json      results of ``pyro-vae evaluate``

Checkpoints are written atomically (temporary file, then rename) and read with
``torch.load(weights_only=True)``, so no code runs from a crafted file. A config.json of an
earlier layout is read through ``upgrade_config``, the one place that knows those layouts.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, Flag, RunError

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None  # type: ignore[assignment]

CHECKPOINT_FORMAT = 1


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | Path) -> None:
    """Refuse early a path that cannot be written (its nearest existing folder is read-only,
    or a file stands where a folder should be), so that no expensive work is lost to it."""
    folder = Path(path).absolute()
    if folder.is_file():
        folder = folder.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise RunError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pyro_vae-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunError(f"cannot write {path}: {folder} is not writable ({e.strerror})") from None


class RunDir:
    """A run directory on disk."""

    LOCK = ".lock"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: Any = None

    def is_run(self) -> bool:
        return (self.path / "config.json").is_file()

    def has_checkpoint(self) -> bool:
        return (self.path / "checkpoint.pt").is_file()

    @staticmethod
    def check_free(path: str | Path, overwrite: bool = False) -> None:
        """Refuse a path that already holds something: runs are never overwritten unless
        ``overwrite`` is given, and then only a run directory (a folder with config.json)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunError(f"{path} is a file; the run directory must be a folder")
        if not path.exists() or not any(p.name != RunDir.LOCK for p in path.iterdir()):
            return
        run = RunDir(path)
        if overwrite and run.is_run():
            return
        if overwrite:
            raise RunError(f"{path} holds files but is not a run directory (no config.json); "
                           "it is not overwritten: pick another {run_dir}", run_dir=Flag("run_dir"))
        if run.is_run() and not run.has_checkpoint():
            raise RunError(f"{path} holds a run that stopped before its first checkpoint; start it afresh "
                           "with {overwrite}, or pick another {run_dir}",
                           overwrite=Flag("overwrite", True, cli="--overwrite"), run_dir=Flag("run_dir"))
        raise RunError(f"{path} already exists and is not empty; pick another {{run_dir}}, continue that "
                       "run with {resume}, or replace it with {overwrite}", run_dir=Flag("run_dir"),
                       resume=Flag("resume", True, cli="--resume"),
                       overwrite=Flag("overwrite", True, cli="--overwrite"))

    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any], overwrite: bool = False) -> RunDir:
        """Make a new run directory (``overwrite``: in place of an old run, whose files
        are removed) and write its config. The directory comes back locked."""
        cls.check_free(path, overwrite)
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.lock()
        try:
            cls.check_free(path, overwrite)  # again, now that no one else can start in it
            for item in run.path.iterdir():
                if item.name != cls.LOCK:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
            run.write_json("config.json", config)
        except BaseException:
            run.unlock()
            raise
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (it must hold config.json)."""
        run = cls(path)
        if not run.is_run():
            raise RunError(f"{run.path} is not a run directory (no config.json in it)")
        return run

    def lock(self) -> None:
        """Hold the run's lock file, so that no second process trains it at the same time.
        An advisory ``flock``: the system releases it when the process ends, however it
        ends, so a crash never leaves a run locked. Stale temporary files of an earlier,
        killed process are removed once it is held."""
        handle = open(self.path / self.LOCK, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise RunError(f"{self.path} is being trained by another process"
                               + (f" (pid {holder})" if holder else "") + "; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        if self.figures.is_dir():
            for tmp in self.figures.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the flock
            self._lock = None

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def config(self) -> dict[str, Any]:
        """config.json, with its top-level entries checked (the configs inside them are
        checked where they are built)."""
        path = self.path / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read {path}: {e}") from None
        entries = {"model": str, "model_config": dict, "train": dict, "data": dict}
        bad = [k for k, kind in entries.items() if not isinstance(config, dict) or not isinstance(config.get(k), kind)]
        data = config.get("data") if isinstance(config, dict) else None
        if not bad and not (isinstance(data.get("x_dim"), int) and data["x_dim"] > 0):
            bad.append("data.x_dim")
        shape = data.get("image_shape") if not bad else None
        if not bad and shape is not None and not (isinstance(shape, list) and len(shape) in (2, 3)
                                                  and all(isinstance(n, int) and n > 0 for n in shape)):
            bad.append("data.image_shape")
        if bad:
            raise RunError(f"{path} is damaged: {', '.join(bad)} missing or of the wrong type; restore it "
                           "from a copy, or retrain")
        return upgrade_config(config)

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as ``name`` in the run, atomically."""
        path = self.path / name
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
        return path

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl, and the same as metrics.csv (one column per key), from the
        full history (so a resumed run has no duplicates)."""
        text = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(self.path / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))
        columns = list(dict.fromkeys(k for row in history for k in row))

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(history)

        atomic_write(self.path / "metrics.csv", write_csv)

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def save_checkpoint(self, state: dict[str, Any], name: str = "checkpoint.pt") -> None:
        state = {"format": CHECKPOINT_FORMAT, **state}
        atomic_write(self.path / name, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, name: str = "checkpoint.pt", map_location: Any = "cpu",
                        required: dict[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
        """The checkpoint ``name``, read without running code, with the entries of
        ``required`` (default: the model's weights) checked for presence and kind."""
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(
                f"no checkpoint {name} in {self.path}: the run saved none yet (it stopped before its "
                "first epoch ended: start it afresh with {overwrite}), or the file was removed",
                overwrite=Flag("overwrite", True, cli="--overwrite"))
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises RuntimeError, OSError, UnpicklingError, ... here
            raise CheckpointError(
                f"{path} is truncated or corrupt, or holds more than tensors, and cannot be read "
                f"({(str(e).splitlines() or [type(e).__name__])[0]}); delete it, or retrain"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path} is not a pyro_vae checkpoint of format {CHECKPOINT_FORMAT}"
            )
        bad = [key for key, kind in (required or {"model": dict}).items()
               if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]
        if bad:
            raise CheckpointError(
                f"{path} lacks {', '.join(bad)} (or holds the wrong kind of value there), which "
                + ("a full training state has: was best.pt (weights only) copied over it? "
                   if name == "checkpoint.pt" else "")
                + "restore the file, or retrain")
        return state


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json of any earlier layout in today's. The one place that knows them:

    - ``data.image_shape`` of grey images as [H, W] (before colour images): now [1, H, W];
    - options missing from ``model_config`` or ``train`` (the network and likelihood
      options, ``layout``, ...: added after the run was trained) are left out here and take
      their defaults when the configs are built (``config_from_dict``); those defaults are
      what such runs did.
    """
    shape = config["data"].get("image_shape")
    if shape is not None and len(shape) == 2:
        config["data"]["image_shape"] = [1, *shape]
    return config


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """``load_state_dict`` with an error that names the run instead of a wall of keys."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(
            f"the checkpoint in {where} does not match the model built from its config.json "
            f"({first}); was config.json edited, or the checkpoint copied from another run?"
        ) from None
