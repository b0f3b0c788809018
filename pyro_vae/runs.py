"""Run directories: what a training run leaves on disk, and how it is read back.

    RUN/config.json      model name, model config, training config
    RUN/metrics.jsonl    one JSON object per epoch
    RUN/checkpoint.pt    latest full state (model, optimizer, RNG, history): resume from it
    RUN/best.pt          model weights at the best validation bound
    RUN/figures/         plots
    RUN/eval-*.json      results of ``pyro-vae evaluate`` (and .npz per image, .png)
    RUN/codes-*.npz      ``pyro-vae encode``; RUN/clusters-*.json, .npz ``pyro-vae cluster``

``RUN_ENTRIES`` and ``RUN_FOLDERS`` name all of it, once: ``--overwrite`` removes those
names and nothing else. Every output is written by ``atomic_write`` (a temporary file in
the same folder, then one rename), so a full disk, a kill or an error leaves the old file
or the new one, never a truncated one. Checkpoints are read with
``torch.load(weights_only=True)``, so no code runs from a crafted file.
A config.json of an earlier layout is read through ``upgrade_config``, the one place that
knows those layouts.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, Flag, RunError

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None  # type: ignore[assignment]

CHECKPOINT_FORMAT = 1


#: Shell patterns of every file name that pyro_vae writes at the top of a run directory:
#: its config, metrics, checkpoints, the default outputs of evaluate, encode and cluster,
#: the lock, and the temporary files of ``atomic_write`` and ``check_writable``.
RUN_ENTRIES = ("config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "best.pt", ".lock",
               "eval-*.json", "eval-*.npz", "eval-*.png", "codes-*.npz", "clusters-*.json", "clusters-*.npz",
               ".*.tmp", ".pyro_vae-probe-*")
#: The folders it writes there, each with the patterns of the files it writes into them:
#: the plots and ``pyro-vae sample``'s array; TensorBoard's event files.
RUN_FOLDERS = {"figures": ("*.png", "samples.npy", ".*.tmp", ".pyro_vae-probe-*"),
               "tensorboard": ("events.out.tfevents.*",)}
#: The top-level entries of a config.json that pyro_vae wrote, and their JSON types: how a
#: folder is recognised as a pyro_vae run (``is_run_config``).
CONFIG_ENTRIES: dict[str, type] = {"model": str, "model_config": dict, "train": dict, "data": dict}


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(tmp_path)`` on a new temporary file beside ``path``, then move it onto
    ``path`` in one rename: readers, a kill or a full disk see the old file or the new one,
    never a part. A failed write removes its temporary. The temporary is made with the
    permissions of an ordinary new file (the umask's), which it passes on to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``text`` into ``path``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON into ``path``, atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Arrays into a compressed ``.npz``, atomically (through a file object: given a name,
    numpy would append ``.npz`` to the temporary's)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(path, write)


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """One array into a ``.npy``, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json that pyro_vae wrote: a JSON object whose entries
    ``model`` (a string), ``model_config``, ``train`` and ``data`` (objects) are all there.
    A file of that common name in any other project is not one."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and all(isinstance(config.get(k), kind) for k, kind in CONFIG_ENTRIES.items())


def _ours(entry: Path, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)


def _shown(entry: Path, folder: Path) -> str:
    name = str(entry.relative_to(folder))
    return name + "/" if entry.is_dir() and not entry.is_symlink() else name


def removable_entries(path: Path) -> tuple[list[Path], list[str]]:
    """What ``--overwrite`` would remove from the run directory ``path`` (its files, links
    and folders, each folder after what it holds), and what stands in its way: entries
    whose names pyro_vae does not write there (``RUN_ENTRIES``, ``RUN_FOLDERS``). A link
    counts as a file under its own name, whatever it points to: it is unlinked, never
    followed. The lock is neither: it stays held."""
    remove: list[Path] = []
    foreign: list[str] = []
    for entry in sorted(path.iterdir()):
        if entry.name == RunDir.LOCK:
            continue
        folder = entry.is_dir() and not entry.is_symlink()
        if folder and entry.name in RUN_FOLDERS:
            for item in sorted(entry.iterdir()):
                ours = _ours(item, RUN_FOLDERS[entry.name]) and (item.is_symlink() or item.is_file())
                remove.append(item) if ours else foreign.append(_shown(item, path))
            remove.append(entry)
        elif (entry.is_symlink() or entry.is_file()) and _ours(entry, (*RUN_ENTRIES, *RUN_FOLDERS)):
            remove.append(entry)
        else:
            foreign.append(_shown(entry, path))
    return remove, foreign


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
    def check_free(path: str | Path, overwrite: bool = False) -> list[Path]:
        """Refuse a path that already holds something: runs are never overwritten unless
        ``overwrite`` is given, and then only a pyro_vae run (``is_run_config``) that holds
        nothing but what pyro_vae writes (``RUN_ENTRIES``). Returns what overwriting it
        removes (nothing for a new or empty folder); nothing is removed here."""
        path = Path(path)
        if path.is_symlink() and not path.exists():
            raise RunError(f"{path} is a link to nothing; the run directory must be a folder")
        if path.exists() and not path.is_dir():
            raise RunError(f"{path} is a file; the run directory must be a folder")
        if not path.exists() or not any(p.name != RunDir.LOCK for p in path.iterdir()):
            return []
        run = RunDir(path)
        if overwrite:
            config = path / "config.json"
            if not is_run_config(config):
                why = ("its config.json is not a pyro_vae run's (it lacks one of "
                       + ", ".join(CONFIG_ENTRIES) + ")") if config.exists() else "it holds no config.json"
                raise RunError(f"{path} is not a run directory ({why}), so it is not overwritten and nothing "
                               "was removed: pick another {run_dir}", run_dir=Flag("run_dir"))
            remove, foreign = removable_entries(path)
            if foreign:
                shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
                raise RunError(f"{path} holds a run and also files that pyro_vae did not write ({shown}), so it "
                               "is not overwritten and nothing was removed: move them, or pick another {run_dir}",
                               run_dir=Flag("run_dir"))
            return remove
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
        are removed: only the names pyro_vae writes, links unlinked and never followed)
        and write its config. The directory comes back locked."""
        cls.check_free(path, overwrite)
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.lock()
        try:
            # again, now that no one else can start in it
            for item in cls.check_free(path, overwrite):
                item.rmdir() if item.is_dir() and not item.is_symlink() else item.unlink(missing_ok=True)
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
        killed process are removed once it is held. A link in the lock's place is refused,
        not followed: the pid written into the lock would overwrite its target."""
        where = self.path / self.LOCK
        try:
            fd = os.open(where, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError:
            if where.is_symlink():
                raise RunError(f"{where} is a link, not the lock file pyro_vae makes; remove the link") from None
            raise
        handle = os.fdopen(fd, "r+")
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
        if self.figures.is_dir() and not self.figures.is_symlink():  # a link's target is not the run's
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
        bad = [k for k, kind in CONFIG_ENTRIES.items() if not isinstance(config, dict) or not isinstance(config.get(k), kind)]
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
        return write_json(self.path / name, obj)

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl, and the same as metrics.csv (one column per key), from the
        full history (so a resumed run has no duplicates)."""
        write_text(self.path / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
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
