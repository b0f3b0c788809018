"""The command line's thread settings: a thread count that shares the cores among the
processes of one machine, and ``--threads N``.

OpenMP's worker threads spin on a core while they wait for work. On a machine whose cores
other programs want too, a spinning thread can hold a core that the thread it waits for
needs; ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep instead. It is not the default here:
measured side by side on the 2-core build machine (``experiments/benchmark.py --load 1``,
experiments/results/benchmark-load), it made the quiet machine's default VAE step 2.6x
slower (10 against 3.8 ms) and the quickstart's epoch 2.3x slower, while with one busy
process beside it the default policy's epoch was 4.3x its quiet time. A user on a busy
machine sets ``OMP_WAIT_POLICY=PASSIVE`` (or ``--threads 1``) for the command; OpenMP
reads the variable once, when torch loads its runtime, which is why this module imports
nothing of torch or of the rest of the package at its top.

These settings belong to the command line only (``pyro-vae`` and ``python -m pyro_vae``):
importing ``pyro_vae`` as a library changes neither the environment nor torch's threads.

Under torchrun (``LOCAL_WORLD_SIZE`` in the environment), each process gets the cores
given to this process divided by the processes on its machine. torchrun itself sets
``OMP_NUM_THREADS=1`` for its processes when the variable is unset, which would leave
the other cores idle, so there a value of 1 counts as unset; any other value is kept, and
``--threads`` overrides both.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

def cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, cgroups), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def per_process_threads(environ: MutableMapping[str, str], available: int | None = None) -> int | None:
    """The thread count of one of torchrun's processes (``available`` cores shared by the
    ``LOCAL_WORLD_SIZE`` processes of this machine); None outside torchrun, or where the
    user set ``OMP_NUM_THREADS`` to a count of their own (anything but torchrun's 1)."""
    local = environ.get("LOCAL_WORLD_SIZE")
    if not local or environ.get("OMP_NUM_THREADS", "1") != "1":
        return None
    try:
        processes = max(1, int(local))
    except ValueError:
        return None
    return max(1, (cores() if available is None else available) // processes)


def apply_cli_policy(environ: MutableMapping[str, str] | None = None) -> None:
    """Set the command line's defaults in ``environ`` (the process's environment): under
    torchrun the per-process thread count; the user's OpenMP variables are kept. Call it
    before torch is imported; child processes inherit it."""
    environ = os.environ if environ is None else environ
    threads = per_process_threads(environ)
    if threads is not None:
        environ["OMP_NUM_THREADS"] = str(threads)


def use_threads(threads: int | None) -> None:
    """``--threads N``: N intra-op threads for this process, and ``OMP_NUM_THREADS=N`` for
    the processes it starts; None leaves both as they are."""
    if threads is None:
        return
    import torch  # here, not at the top: see the module docstring

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
