"""Several processes: fit and evaluate on 2 CPU processes (gloo), started here as torchrun
would start them (its environment variables), each with one thread and a deadline.

The training comparison needs the same draws in 1 and 2 processes, which per-process
generators cannot give: a 2-process step draws the noise of its two half-batches from two
streams. So those runs draw no noise at all (the standard normal of every reparameterized
site is patched to 0, in every process alike): what is compared is then everything but
the draws, namely the sharding, the summed gradients, clipping, the optimizer, the
schedule, the checkpoints and the resume. Evaluation needs no patch: its draws are keyed.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributions.normal

from pyro_vae import distributed
from pyro_vae.errors import ConfigError
from pyro_vae.runs import RunDir
from pyro_vae.train import FULL_STATE, TrainConfig, fit

from helpers import REPO, invoke

FIT = ["--z-dim", "2", "--hidden", "16", "--batch-size", "16", "--lr", "3e-3", "--grad-clip", "5",
       "--eval-size", "40", "--device", "cpu", "-q"]
NO_NOISE = ("import torch, torch.distributions.normal as n; "
            "n._standard_normal = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device); ")
DEADLINE = 120  # seconds any spawned process may take


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args, world_size=2, no_noise=False, timeout=20):
    """``pyro-vae ARGS`` in ``world_size`` processes, as torchrun starts them."""
    port = _free_port()
    code = (NO_NOISE if no_noise else "") + "from pyro_vae.cli import main; main(prog_name='pyro-vae')"
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
               "PYRO_VAE_DIST_TIMEOUT": str(timeout), "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, deadline=DEADLINE):
    """(exit code, stdout + stderr) of each process, killing any that outlives the deadline."""
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process ran past {deadline} s")
        out.append((p.returncode, stdout + stderr))
    return out


def run_ranks(args, **kw):
    results = finish(start_ranks(args, **kw))
    for code, text in results:
        assert code == 0, text
    return results


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return RunDir(run).load_checkpoint()["model"]


def assert_same_training(a: Path, b: Path) -> None:
    for (name, x), y in zip(weights(a).items(), weights(b).values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "processes"}
                          for r in rows]
    for row_a, row_b in zip(strip(RunDir(a).metrics()), strip(RunDir(b).metrics()), strict=True):
        assert row_a.keys() == row_b.keys()
        np.testing.assert_allclose(list(row_a.values()), list(row_b.values()), rtol=1e-4)


def test_two_processes_train_as_one_and_resume_on_one_or_two(tiny_npy, tmp_path, monkeypatch):
    """180 training images in steps of 16 (the last of 4): 2 processes of 8 rows reach the
    weights of 1 process of 16, write the same files, and the run continues on 1 or 2."""
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal",
                        lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    one, two = tmp_path / "one", tmp_path / "two"
    assert invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", one, "--epochs", 2, *FIT).exit_code == 0
    (rank0, out0), (rank1, out1) = run_ranks(["fit", "vae", "--dataset", tiny_npy, "--run-dir", two,
                                               "--epochs", 2, *FIT], no_noise=True)
    assert "done:" in out0 and "done:" not in out1  # rank 0 alone reports
    assert files(one) == files(two)
    assert_same_training(one, two)
    assert RunDir(two).metrics()[-1]["processes"] == 2

    # continued on 1 process and on 2, to epoch 3: the same run as one trained throughout
    for name in ("on1", "on2"):
        shutil.copytree(two, tmp_path / name)
    assert invoke("fit", "vae", "--run-dir", tmp_path / "on1", "--resume", "--epochs", 3, "-q").exit_code == 0
    run_ranks(["fit", "vae", "--run-dir", tmp_path / "on2", "--resume", "--epochs", 3, "-q"], no_noise=True)
    assert invoke("fit", "vae", "--run-dir", one, "--resume", "--epochs", 3, "-q").exit_code == 0
    assert_same_training(one, tmp_path / "on1")
    assert_same_training(one, tmp_path / "on2")
    assert [r["processes"] for r in RunDir(tmp_path / "on2").metrics()] == [2, 2, 2]


def test_two_processes_evaluate_as_one_whatever_the_batches(tiny_npy, tmp_path):
    run = tmp_path / "run"
    assert invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", run, "--epochs", 1, *FIT).exit_code == 0
    base = ["evaluate", run, "--iw", 30, "--split", "valid", "--device", "cpu"]
    assert invoke(*base, "--output", tmp_path / "a.json").exit_code == 0
    assert invoke(*base, "--batch-size", 3, "--max-rows", 20, "--output", tmp_path / "b.json").exit_code == 0
    assert invoke(*base, "--limit", 7, "--output", tmp_path / "c.json").exit_code == 0
    (_, out0), (_, out1) = run_ranks([*base, "--output", tmp_path / "d.json"])
    assert "wrote" in out0 and "wrote" not in out1
    a, b, c, d = (np.load(tmp_path / f"{n}.npz") for n in "abcd")
    assert json.loads((tmp_path / "d.json").read_text())["processes"] == 2
    # equal to float32 rounding (the networks' matrix products see batches of other sizes,
    # a unit in the last place of the log weights), which the Pareto fit of k-hat amplifies
    for name, atol in (("elbo", 1e-5), ("log_px", 1e-5), ("log_px_se_delta", 1e-6), ("k_hat", 1e-4),
                       ("jackknife", 1e-5), ("reconstruction", 1e-5)):
        for other in (b, d):
            np.testing.assert_allclose(other[name], a[name], rtol=1e-6, atol=atol, err_msg=name)
        np.testing.assert_allclose(c[name], a[name][c["index"]], rtol=1e-6, atol=atol, err_msg=name)
    assert (d["index"] == a["index"]).all()


def test_a_killed_process_stops_the_other_and_leaves_the_checkpoint(tiny_npy, tmp_path):
    run = tmp_path / "run"
    procs = start_ranks(["fit", "vae", "--dataset", tiny_npy, "--run-dir", run, "--epochs", 100_000, *FIT])
    start = time.time()
    while not (run / "checkpoint.pt").exists() and time.time() - start < DEADLINE:
        time.sleep(0.2)
        assert procs[0].poll() is None, finish(procs)
    procs[1].send_signal(signal.SIGKILL)
    (code, out), _ = finish(procs)
    assert code != 0
    message = [line for line in out.splitlines() if line.startswith("Error")]
    assert len(message) == 1 and "lost the others" in message[0] and "checkpoint" in message[0], out
    state = RunDir(run).load_checkpoint(required=FULL_STATE)  # whole, and a full training state
    done = state["epoch"]
    assert invoke("fit", "vae", "--run-dir", run, "--resume", "--epochs", done + 1, "-q").exit_code == 0
    assert RunDir(run).load_checkpoint()["epoch"] == done + 1


def test_more_processes_than_images_is_one_line(tiny_npy, tmp_path):
    run = tmp_path / "run"
    assert invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", run, "--epochs", 1, *FIT).exit_code == 0
    results = finish(start_ranks(["evaluate", run, "--iw", 5, "--split", "valid", "--limit", 1, "--device", "cpu"]))
    assert all(code == 1 for code, _ in results), results
    lines = [line for _, out in results for line in out.splitlines()]
    assert "Traceback" not in "".join(lines)
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1 and "1 images cannot be shared among 2 processes" in errors[0], lines


def test_nccl_without_gpus_and_too_small_a_batch_are_refused(tiny_npy, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", tmp_path / "r", "--backend", "nccl", *FIT)
    assert result.exit_code == 1 and "nccl backend needs CUDA GPUs" in result.output
    assert "--backend gloo" in result.output and not (tmp_path / "r").exists()
    monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank=0, size=4))
    with pytest.raises(ConfigError, match="batch_size"):
        fit("vae", {"z_dim": 2}, TrainConfig(dataset=str(tiny_npy), batch_size=3), tmp_path / "s", device="cpu")
    assert not (tmp_path / "s").exists()


def test_shards_are_disjoint_and_cover_the_batch():
    x, y = torch.arange(10).unsqueeze(-1), torch.arange(10) * 2
    shards = [distributed.World(rank=r, size=3).shard((x, y, 0.5)) for r in range(3)]
    assert sorted(torch.cat([s[0] for s in shards]).flatten().tolist()) == list(range(10))
    assert all((s[1] == 2 * s[0].flatten()).all() and s[2] == 0.5 for s in shards)
    small = [distributed.World(rank=r, size=3).shard((x[:2],)) for r in range(3)]
    assert small[0][0].shape[0] == 2 and small[1] is None and small[2] is None
