"""Run directories: what a training run leaves on disk, and how it is read back.

    RUN/config.json      model name, model config, training config
    RUN/metrics.jsonl    one JSON object per epoch
    RUN/checkpoint.pt    latest full state (model, optimizer, RNG, history): resume from it
    RUN/best.pt          model weights at the best validation bound
    RUN/figures/         plots
    RUN/eval-*.json      results of ``pyro-vae evaluate``

Checkpoints are written atomically (temporary file, then rename) and read with
``torch.load(weights_only=True)``, so no code runs from a crafted file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, RunError

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


class RunDir:
    """A run directory on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @staticmethod
    def check_free(path: str | Path) -> None:
        """Refuse a path that already holds something: runs are never overwritten."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunError(
                f"{path} already exists and is not empty; pick another --run-dir, "
                "or continue that run with --resume"
            )

    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any]) -> RunDir:
        """Make a new run directory and write its config."""
        cls.check_free(path)
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_json("config.json", config)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (it must hold config.json)."""
        run = cls(path)
        if not (run.path / "config.json").is_file():
            raise RunError(f"{run.path} is not a run directory (no config.json in it)")
        return run

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def config(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"cannot read {self.path / 'config.json'}: {e}") from None

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
        return path

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from the full history (so a resumed run has no duplicates)."""
        text = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(self.path / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def save_checkpoint(self, state: dict[str, Any], name: str = "checkpoint.pt") -> None:
        state = {"format": CHECKPOINT_FORMAT, **state}
        atomic_write(self.path / name, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, name: str = "checkpoint.pt", map_location: Any = "cpu") -> dict[str, Any]:
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(
                f"no checkpoint {name} in {self.path}: the run saved none yet (it stops before "
                "its first epoch ends), or the file was removed"
            )
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises RuntimeError, OSError, UnpicklingError, ... here
            raise CheckpointError(
                f"{path} is truncated or corrupt, or holds more than tensors, and cannot be read "
                f"({str(e).splitlines()[0]}); delete it, or retrain"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path} is not a pyro_vae checkpoint of format {CHECKPOINT_FORMAT}"
            )
        return state


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
