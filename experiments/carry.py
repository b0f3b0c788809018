"""Carry a training run across machines that do not outlive a session.

A run directory lives on one machine; a run that needs more wall time than a session gives
it (the IWAE paper's 3,280 passes) is carried in the repository instead, in pieces:

    python experiments/carry.py stop RUN_DIR            # SIGTERM the fit training RUN_DIR, wait until it saved
    python experiments/carry.py save RUN_DIR NAME       # what --resume needs -> experiments/results/NAME/carry/
    (commit experiments/results/NAME/carry/; next session, on a fresh machine:)
    python experiments/carry.py restore NAME RUN_DIR    # carry/ -> RUN_DIR, each file checked against its hash
    pyro-vae fit MODEL --run-dir RUN_DIR --resume       # continues exactly where the piece stopped
    python experiments/carry.py drop NAME               # once the run is finished and its results are in

What is carried: the run's config.json, metrics.jsonl, checkpoint.pt (model, optimizer,
generator states, history: all that ``--resume`` reads), best.pt when the run keeps one,
and the pieces record ``RUN_DIR.pieces`` beside the run when there is one, with a
MANIFEST.json of their sizes and SHA-256 hashes and the epoch reached. A resumed run is
exact (the batches and binarization of an epoch depend only on the seed and the epoch, and
the generator states are in the checkpoint), so the pieces add up to the uninterrupted run.
A carried file may be 20 MB at most, so that the repository stays small; ``save`` refuses a
larger one, and ``restore`` refuses a run directory that already holds a checkpoint of a
later epoch than the carried one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import click

RESULTS = Path(__file__).resolve().parent / "results"
FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "best.pt")
NEEDED = ("config.json", "metrics.jsonl", "checkpoint.pt")
MAX_BYTES = 20 * 2**20


def carry_dir(name: str, results: Path = RESULTS) -> Path:
    return results / name / "carry"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _epochs(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _pieces(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".pieces")


def _training(run_dir: Path) -> bool:
    """Whether a process holds ``run_dir``'s lock (the advisory flock fit takes)."""
    import fcntl

    lock = run_dir / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def stop(run_dir: Path, timeout: float = 600.0) -> None:
    """SIGTERM the process that holds ``run_dir``'s lock (fit saves its state mid-epoch and
    exits) and wait until the lock is free; nothing to do when no process holds it."""
    if not _training(run_dir):
        return
    lock = run_dir / ".lock"
    pid = lock.read_text().strip()
    if not pid.isdigit():
        raise click.ClickException(f"{lock} is held but names no process; stop the run by hand")
    os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _training(run_dir):
            return
        time.sleep(0.5)
    raise click.ClickException(f"process {pid} still holds {lock} after {timeout:.0f} s")


def save(run_dir: Path, name: str, results: Path = RESULTS) -> Path:
    """Copy what ``--resume`` needs from ``run_dir`` into ``results/NAME/carry/`` (replacing
    an earlier carry of the same run), with its manifest. The run must not be training."""
    missing = [f for f in NEEDED if not (run_dir / f).is_file()]
    if missing:
        raise click.ClickException(f"{run_dir} has no {', '.join(missing)}: nothing that --resume could continue")
    if _training(run_dir):
        raise click.ClickException(f"{run_dir} is being trained; `carry.py stop {run_dir}` first")
    sources = [run_dir / f for f in FILES if (run_dir / f).is_file()]
    if _pieces(run_dir).is_file():
        sources.append(_pieces(run_dir))
    big = [f"{p.name} ({p.stat().st_size / 2**20:.1f} MB)" for p in sources if p.stat().st_size > MAX_BYTES]
    if big:
        raise click.ClickException(f"{', '.join(big)} over the {MAX_BYTES // 2**20} MB a carried file may have")
    target = carry_dir(name, results)
    staging = target.with_name("carry.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = {"run": run_dir.name, "epochs": _epochs(run_dir), "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {}}
    for source in sources:
        copy = staging / ("pieces" if source == _pieces(run_dir) else source.name)
        shutil.copy2(source, copy)
        manifest["files"][copy.name] = {"bytes": copy.stat().st_size, "sha256": _sha256(copy)}
    (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # the old carry or the new one, never half of each
    return target


def restore(name: str, run_dir: Path, results: Path = RESULTS) -> int:
    """Copy ``results/NAME/carry/`` into ``run_dir`` after checking every file against the
    manifest; returns the epoch the run reached. Refuses a run directory whose own
    checkpoint has gone further."""
    source = carry_dir(name, results)
    manifest_path = source / "MANIFEST.json"
    if not manifest_path.is_file():
        raise click.ClickException(f"{source} holds no carried run (no MANIFEST.json)")
    manifest = json.loads(manifest_path.read_text())
    for file, meta in manifest["files"].items():
        path = source / file
        if not path.is_file() or path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise click.ClickException(f"{path} is missing or does not match its manifest; the carry is damaged")
    if (run_dir / "checkpoint.pt").exists() and _epochs(run_dir) > manifest["epochs"]:
        raise click.ClickException(f"{run_dir} has reached epoch {_epochs(run_dir)}, past the carried "
                                   f"{manifest['epochs']}: it is the newer state, nothing restored")
    run_dir.mkdir(parents=True, exist_ok=True)
    for file in manifest["files"]:
        shutil.copy2(source / file, _pieces(run_dir) if file == "pieces" else run_dir / file)
    return int(manifest["epochs"])


def drop(name: str, results: Path = RESULTS) -> None:
    """Remove the carry folder of a finished run."""
    shutil.rmtree(carry_dir(name, results), ignore_errors=True)


@click.group()
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=RESULTS, show_default=True,
              help="the folder of the results, whose NAME/carry/ holds a carried run")
@click.pass_context
def main(ctx: click.Context, results: Path) -> None:
    """Carry a run across sessions: stop, save, restore, drop."""
    ctx.obj = results


@main.command("stop")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait for the run to save and exit")
def stop_command(run_dir: Path, timeout: float) -> None:
    """SIGTERM the fit that trains RUN_DIR and wait until it has saved and exited."""
    stop(run_dir, timeout)


@main.command("save")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("name")
@click.pass_obj
def save_command(results: Path, run_dir: Path, name: str) -> None:
    """Copy what --resume needs from RUN_DIR into RESULTS/NAME/carry/."""
    target = save(run_dir, name, results)
    click.echo(f"carried {run_dir} at epoch {_epochs(run_dir)} into {target}")


@main.command("restore")
@click.argument("name")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.pass_obj
def restore_command(results: Path, name: str, run_dir: Path) -> None:
    """Copy RESULTS/NAME/carry/ into RUN_DIR, checked against its manifest."""
    epochs = restore(name, run_dir, results)
    click.echo(f"restored {run_dir} at epoch {epochs}: continue with `pyro-vae fit MODEL --run-dir {run_dir} --resume`")


@main.command("drop")
@click.argument("name")
@click.pass_obj
def drop_command(results: Path, name: str) -> None:
    """Remove RESULTS/NAME/carry/ (once the run is finished and its results are in)."""
    drop(name, results)


if __name__ == "__main__":
    sys.exit(main())
