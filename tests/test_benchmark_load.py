"""The benchmark's loaded mode: burners that never outlive the run, the two policies'
environments, and the table (the measured processes themselves are stood in for)."""

import os
import subprocess
import sys
import time
from pathlib import Path

from test_experiments import load_script

script = load_script("benchmark")


def gone(pid: int) -> bool:
    """No such process any more, or only its zombie."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_burners_run_inside_the_block_and_stop_on_leaving_it():
    with script.burners(2, 60) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.returncode is not None for p in procs)


def test_a_burner_stops_by_itself_at_its_time_bound():
    with script.burners(1, 0.3) as (p,):
        assert p.wait(timeout=20) == 0


def test_a_burner_stops_when_the_process_that_started_it_dies():
    code = (f"import sys; sys.path.insert(0, {str(Path(script.__file__).parent)!r}); import os, benchmark; "
            "b = benchmark.burners(1, 600); (p,) = b.__enter__(); print(p.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(script.__file__).parents[1])})
    pid = int(out.stdout.split()[0])
    assert wait_until(lambda: gone(pid)), f"burner {pid} outlived its parent"


def test_the_old_policy_has_no_openmp_variables_and_the_new_one_is_the_command_lines(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    envs = script.policy_environments()
    assert not set(script.OPENMP_VARIABLES) & set(envs["old"])
    assert envs["new"] == {**envs["old"], "OMP_WAIT_POLICY": "PASSIVE"}


def test_bench_load_alternates_the_policies_with_and_without_burners(monkeypatch, tmp_path):
    calls = []

    def probe(env, args, timeout):
        burning = sum(1 for line in os.popen("ps -eo args").read().splitlines() if "parent, deadline" in line)
        calls.append((env.get("OMP_WAIT_POLICY"), burning))
        seconds = {"PASSIVE": 1.0, None: 2.0}[env.get("OMP_WAIT_POLICY")] * (1 + burning)
        return {"epoch": {"dataset": "toy.npy", "epoch_seconds": seconds},
                "step": [{"name": "VAE", "compiled_ms": 10 * seconds, "plain_ms": 5 * seconds, "ours_ms": 11.0}]}

    monkeypatch.setattr(script, "_probe", probe)
    result = script.bench_load(2, [], 60, lambda m: None)
    assert calls == [(None, 0), ("PASSIVE", 0), ("PASSIVE", 2), (None, 2)]
    table = script.load_markdown(result)
    assert "| epoch of toy.npy | 2.00 s | 6.00 s | 3.00x | 1.00 s | 3.00 s | 3.00x | 0.50x |" in table
    assert "| step: VAE, plain | 10.00 ms | 30.00 ms | 3.00x | 5.00 ms | 15.00 ms | 3.00x | 0.50x |" in table
