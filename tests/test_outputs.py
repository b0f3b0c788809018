"""What pyro_vae writes and removes: --overwrite touches only a recognised run's own files,
and every output is written atomically, so that a full disk leaves the old file whole."""

import builtins
import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure

from pyro_vae import TrainConfig, fit
from pyro_vae.cli import main
from pyro_vae.errors import RunError
from pyro_vae.plots import image_grid
from pyro_vae.runs import RunDir, atomic_write, removable_entries, write_json, write_npy, write_npz

SMALL = {"z_dim": 2, "hidden": (16,)}
FAST = ["--z-dim", "2", "--hidden", "16", "--epochs", "1", "--batch-size", "20", "--eval-size", "50",
        "--device", "cpu", "-q"]


def train(data, run_dir, epochs=1, **kw):
    config = TrainConfig(dataset=str(data), epochs=epochs, batch_size=20, eval_size=50)
    return fit("vae", SMALL, config, run_dir, device="cpu", **kw)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links not followed) and its content."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = ("-> " + os.readlink(p)) if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes())
    return out


# --- --overwrite -------------------------------------------------------------------------

def test_a_foreign_config_json_is_never_overwritten(tiny_npy, tmp_path):
    """A project folder with a config.json of its own and other files: refused in one
    line that says why, and every file and folder is still there."""
    folder = tmp_path / "project"
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "a.jpg").write_bytes(b"jpeg")
    (folder / "config.json").write_text(json.dumps({"model": "resnet", "lr": 0.1}))
    (folder / "thesis.tex").write_text("\\documentclass{book}")
    before = snapshot(folder)
    with pytest.raises(RunError, match="not a run directory.*config.json is not a pyro_vae run's.*nothing was removed"):
        train(tiny_npy, folder, overwrite=True)
    message = one_line_error(invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", folder, "--overwrite", *FAST))
    assert "not a run directory" in message and "--run-dir" in message
    assert snapshot(folder) == before


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "", json.dumps({"model": "vae", "train": {}, "data": {}})])
def test_a_config_json_without_the_runs_schema_is_not_a_run(tmp_path, text):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    (folder / "metrics.jsonl").write_text("")
    with pytest.raises(RunError, match="not a run directory"):
        RunDir.check_free(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.jsonl"]


def test_a_run_with_other_files_beside_it_is_refused_and_kept_whole(tiny_npy, tmp_path):
    run = tmp_path / "run"
    train(tiny_npy, run)
    (run / "thesis.tex").write_text("mine")
    (run / "photos").mkdir()
    (run / "photos" / "a.png").write_bytes(b"png")
    (run / "figures" / "notes.txt").write_text("mine too")
    before = snapshot(run)
    with pytest.raises(RunError) as refused:
        train(tiny_npy, run, overwrite=True)
    assert "\n" not in str(refused.value)
    for name in ("thesis.tex", "photos/", "figures/notes.txt"):
        assert name in str(refused.value)
    assert "nothing was removed" in str(refused.value) and "curves.png" not in str(refused.value)
    assert snapshot(run) == before
    message = one_line_error(invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", run, "--overwrite", *FAST))
    assert "thesis.tex" in message and "--run-dir" in message
    assert snapshot(run) == before


def test_links_inside_a_run_are_unlinked_never_followed(tiny_npy, tmp_path):
    """A run whose figures folder and best.pt are links to files elsewhere: overwriting it
    removes the links and leaves what they point to untouched; a link under a name that
    pyro_vae does not write is in the way, like any other file."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"a figure of mine")
    (elsewhere / "weights.pt").write_bytes(b"my weights")
    (elsewhere / ".keep.png.0a1b2c3d.tmp").write_bytes(b"not the run's temporary")
    run = tmp_path / "run"
    train(tiny_npy, run)
    for name in ("figures", "best.pt"):
        (run / name).rename(tmp_path / f"old-{name}")
    (run / "figures").symlink_to(elsewhere, target_is_directory=True)
    (run / "best.pt").symlink_to(elsewhere / "weights.pt")
    (run / "data").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RunError, match=r"files that pyro_vae did not write \(data\)"):
        train(tiny_npy, run, overwrite=True)
    (run / "data").unlink()
    (run / RunDir.LOCK).rename(tmp_path / "old-lock")
    (run / RunDir.LOCK).symlink_to(elsewhere / "weights.pt")
    with pytest.raises(RunError, match=r"\.lock is a link"):
        train(tiny_npy, run, overwrite=True)
    assert (elsewhere / "weights.pt").read_bytes() == b"my weights"
    (run / RunDir.LOCK).unlink()
    before = snapshot(elsewhere)
    second = train(tiny_npy, run, epochs=2, overwrite=True)
    assert snapshot(elsewhere) == before
    assert not (run / "figures").is_symlink() and (run / "figures" / "curves.png").is_file()
    assert not (run / "best.pt").is_symlink() and len(second.history) == 2


def test_overwrite_removes_every_output_of_the_old_run_and_nothing_else(tiny_npy, tmp_path):
    run = tmp_path / "run"
    train(tiny_npy, run, epochs=2)
    assert invoke("evaluate", run, "--iw", 3, "--split", "valid", "--device", "cpu", "--no-compile").exit_code == 0
    assert invoke("encode", run, "--split", "valid", "--device", "cpu").exit_code == 0
    assert invoke("sample", run, "-n", 4, "--device", "cpu").exit_code == 0
    (run / ".eval-valid-iw3.json.0a1b2c3d.tmp").write_text("{")  # what a kill leaves
    events = run / "tensorboard" / "events.out.tfevents.1700000000.host.1.0"  # with tensorboard installed
    events.parent.mkdir(exist_ok=True)
    events.write_bytes(b"scalars")
    remove, foreign = removable_entries(run)
    assert foreign == [] and {p.name for p in remove} >= {"eval-valid-iw3.json", "eval-valid-iw3.npz",
                                                         "codes-valid.npz", "samples.npy", "figures", events.name}
    train(tiny_npy, run, overwrite=True)
    names = {p.name for p in run.iterdir()} - {"tensorboard"}  # a new one, where tensorboard is installed
    assert names == {"config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "best.pt", "figures", ".lock"}
    assert not (run / "figures" / "samples.npy").exists() and not events.exists()
    (run / "tensorboard").mkdir(exist_ok=True)
    (run / "tensorboard" / "notes.txt").write_text("mine")
    assert removable_entries(run)[1] == ["tensorboard/notes.txt"]


def test_an_empty_folder_or_one_holding_only_the_lock_is_free(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / RunDir.LOCK).write_text("")
    assert RunDir.check_free(tmp_path / "e") == [] and RunDir.check_free(tmp_path / "none", overwrite=True) == []


# --- atomic outputs ----------------------------------------------------------------------

class DiskFull:
    """Files opened for writing under ``folder`` take ``room`` bytes (or characters) in all;
    the write that crosses it writes what fits, then fails with ENOSPC, as a full disk."""

    def __init__(self, monkeypatch, folder: Path, room: int):
        self.folder, self.room = folder.resolve(), room
        real = builtins.open

        def patched(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            inside = isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(self.folder)
            return _Filling(f, self) if inside and any(c in mode for c in "wax+") else f

        monkeypatch.setattr(builtins, "open", patched)
        monkeypatch.setattr(io, "open", patched)


class _Filling:
    def __init__(self, f, disk: DiskFull):
        self._f, self._disk = f, disk

    def write(self, data):
        if len(data) > self._disk.room:
            self._f.write(data[: self._disk.room])
            self._f.flush()
            self._disk.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.room -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def assert_no_debris(folder: Path):
    """No temporary file left, and no empty file: a failed write leaves nothing behind."""
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.name != RunDir.LOCK]


@pytest.mark.parametrize("full", ["at once", "in the summary", "in the estimates"])
def test_evaluate_on_a_full_disk_keeps_the_old_results(tiny_npy, tmp_path, monkeypatch, full):
    """The disk fills at the first byte, halfway through the JSON summary, or halfway
    through the per-image .npz after it: each of the two is the old file or a whole new
    one, and the error is one line."""
    run = tmp_path / "run"
    train(tiny_npy, run)
    args = ("evaluate", run, "--iw", 3, "--split", "valid", "--device", "cpu", "--no-compile")
    assert invoke(*args, "--seed", 1).exit_code == 0
    outputs = [run / "eval-valid-iw3.json", run / "eval-valid-iw3.npz"]
    old = [p.read_bytes() for p in outputs]
    room = {"at once": 0, "in the summary": len(old[0]) // 2, "in the estimates": len(old[0]) + len(old[1]) // 2}
    DiskFull(monkeypatch, run, room[full])
    message = one_line_error(invoke(*args, "--seed", 2))
    monkeypatch.undo()
    assert "No space left on device" in message
    assert_no_debris(run)
    new_json, new_npz = [p.read_bytes() for p in outputs]
    assert new_npz == old[1] and np.load(outputs[1])["log_px"].shape == (20,)
    assert json.loads(new_json)["seed"] == (2 if full == "in the estimates" else 1)


@pytest.mark.parametrize("write, name", [
    (lambda p: write_json(p, {"a": list(range(500))}), "x.json"),
    (lambda p: write_npz(p, a=np.arange(5_000)), "x.npz"),
    (lambda p: write_npy(p, np.arange(5_000)), "x.npy"),
    (lambda p: image_grid(np.random.default_rng(0).random((16, 64)), (8, 8), p), "x.png"),
])
@pytest.mark.parametrize("room", [0, 100, 1_000])
def test_each_writer_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch, write, name, room):
    path = tmp_path / "out" / name
    path.parent.mkdir()
    path.write_bytes(b"the old file")
    DiskFull(monkeypatch, path.parent, room)
    with pytest.raises(OSError) as e:
        write(path)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"the old file" and sorted(path.parent.iterdir()) == [path]


def test_writers_write_the_named_file_in_its_format(tmp_path):
    write_npz(tmp_path / "a.npz", x=np.arange(3))
    write_npy(tmp_path / "b.npy", np.arange(4))
    write_json(tmp_path / "c.json", {"k": 1})
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    from pyro_vae.plots import _save
    _save(fig, tmp_path / "d.png")
    _save(fig, tmp_path / "e.pdf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npy", "c.json", "d.png", "e.pdf"]
    assert np.load(tmp_path / "a.npz")["x"].tolist() == [0, 1, 2] and np.load(tmp_path / "b.npy").tolist() == [0, 1, 2, 3]
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "e.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_write_that_fails_removes_its_temporary_and_files_get_ordinary_permissions(tmp_path):
    def half_then_fail(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    (tmp_path / "x").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x", half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["x"] and (tmp_path / "x").read_text() == "old"
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "y.json", [])
    finally:
        os.umask(umask)
    assert (tmp_path / "y.json").stat().st_mode & 0o777 == 0o644
