"""The command line's thread policy: set before torch starts, by the entry point only; a
user's own variables win; importing the package as a library changes nothing."""

import os
import subprocess
import sys

import pytest
import torch

from pyro_vae import threads
from pyro_vae.threads import apply_cli_policy, per_process_threads

from helpers import REPO, invoke


def python(code: str, **env: str) -> str:
    """stdout of ``code`` in a fresh interpreter, with this checkout first on the path and
    the OpenMP variables left out of its environment unless given."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": str(REPO), **env}, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_policy_is_a_default_that_the_users_variables_override():
    env: dict[str, str] = {}
    apply_cli_policy(env)
    assert env == {}  # OpenMP's own wait policy: the passive one slowed a quiet machine's steps 2.6x
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    apply_cli_policy(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}


@pytest.mark.parametrize("env, cores, expected", [
    ({}, 16, None),  # not under torchrun: torch's own default
    ({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}, 16, 4),  # torchrun's 1 counts as unset
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 4),
    ({"LOCAL_WORLD_SIZE": "3"}, 16, 5),
    ({"LOCAL_WORLD_SIZE": "4"}, 2, 1),  # more processes than cores: one thread each
    ({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "2"}, 16, None),  # the user's own count
])
def test_torchruns_processes_share_the_cores(env, cores, expected):
    assert per_process_threads(env, cores) == expected


def test_torchrun_environment_gets_the_per_process_count(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 8)
    env = {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    apply_cli_policy(env)
    assert env == {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "4"}


def test_importing_the_library_loads_no_torch_and_changes_no_thread_setting():
    code = ("import os, sys, pyro_vae; assert 'torch' not in sys.modules, 'torch imported'; "
            "from pyro_vae import VAE, fit, estimate_bounds; import pyro_vae.cli, torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())")
    plain = python("import os, torch; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'), "
                   "torch.get_num_threads())")
    assert python(code) == plain
    assert plain.startswith("None None")


def test_the_entry_point_sets_the_policy_before_torch_starts():
    # the entry module, not run (its __name__ is not __main__): the policy, then torch as the CLI imports it
    code = ("import os, sys; import pyro_vae.__main__ as entry; assert 'torch' not in sys.modules; "
            "entry.apply_cli_policy(); import pyro_vae.cli, torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    assert python(code, LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1") == f"None {max(1, threads.cores() // 2)} " \
        f"{max(1, threads.cores() // 2)}"
    assert python(code, LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE").startswith("ACTIVE ")


def test_python_dash_m_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "pyro_vae", "fit", "vae", "--help"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--threads" in out.stdout and out.stdout.startswith("Usage: pyro-vae fit vae")


class Stop(Exception):
    """Stands in for the training, once the command has set its threads."""


def test_threads_option_sets_torchs_threads_and_the_childrens_default(tiny_npy, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # put back after the test
    seen = {}

    def start(*args, **kwargs):
        seen.update(threads=torch.get_num_threads(), env=os.environ["OMP_NUM_THREADS"])
        raise Stop

    monkeypatch.setattr("pyro_vae.cli.start_run", start)
    try:
        with pytest.raises(Stop):
            invoke("fit", "vae", "--dataset", tiny_npy, "--run-dir", tmp_path / "run", "--threads", 1)
    finally:
        torch.set_num_threads(before)
    assert seen == {"threads": 1, "env": "1"}
