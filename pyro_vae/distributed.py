"""Several processes under ``torchrun``: which one this is, and the few collectives that
``fit`` and ``evaluate`` need.

``torchrun`` starts one process per device and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, and the rendezvous address);
``init`` joins them into a ``torch.distributed`` process group. Without ``torchrun`` (or
with one process) nothing is initialised and ``World()`` is the single process.

Gradients are summed with one all-reduce of a flat buffer per step (``reduce_gradients``)
rather than by wrapping the model in ``DistributedDataParallel``: DDP's reducer is armed by
the wrapped module's ``forward``, and a Pyro loss calls the family's ``model`` and
``guide`` methods instead. Since every family's loss is a sum over its batch, the sum of
the processes' gradients is the gradient of the whole batch, as one process computes it.

A collective that fails (a process died, or did not answer within the timeout) raises
``PeerLost``; a step that fails on some processes only stops the others at the next
``together`` block (``Abandoned``), so that no process waits forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError, Flag, PyroVAEError, RunError

#: seconds a process waits in a collective for the others before it gives up
DEFAULT_TIMEOUT = 1800.0
T = TypeVar("T")
BACKENDS = ("auto", "gloo", "nccl")


class PeerLost(RunError):
    """A collective failed: another process stopped, was killed, or did not answer in time."""


class Abandoned(PyroVAEError):
    """Another process failed first and said why; this one stops without a message of its own."""


@dataclass(frozen=True)
class World:
    """This process's place among those of one job: rank 0 of 1 when alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    timeout: float = DEFAULT_TIMEOUT

    @property
    def main(self) -> bool:
        """The process that writes files and prints: rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives live: NCCL reduces on the GPU, gloo on the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def device(self, device: torch.device) -> torch.device:
        """``device`` for this process: an unnumbered ``cuda`` becomes the local rank's GPU."""
        if device.type == "cuda" and device.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def _collective(self, what: str, call: Any) -> Any:
        try:
            return call()
        except (RuntimeError, ValueError) as e:  # gloo and NCCL raise DistBackendError (a RuntimeError)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PeerLost(
                f"process {self.rank} of {self.size} lost the others during {what} ({first}): another process "
                f"stopped or was killed, or none answered within {self.timeout:.0f} s "
                f"(PYRO_VAE_DIST_TIMEOUT)") from None

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Sum (or ``op``) ``tensor`` over the processes, in place."""
        if self.distributed:
            self._collective("an all-reduce", lambda: dist.all_reduce(tensor, op or dist.ReduceOp.SUM))
        return tensor

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` in rank order on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.main else None
        self._collective("a gather", lambda: dist.gather_object(obj, out, dst=0))
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        self._collective("a broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A block that may fail on some processes only (rank 0's checks of the run
        directory, a download): at its end every process learns whether any failed, and
        the others stop too (``Abandoned``) instead of waiting at the next collective."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except BaseException as e:
            # rank 0 prints the message when it failed too; this process only if it alone did
            e.only_here = not self._failures(True)[0]  # type: ignore[attr-defined]
            raise
        if any(self._failures(False)):
            raise Abandoned("another process failed; its message says why")

    def _failures(self, failed: bool) -> list[bool]:
        """Which processes failed, as every process learns it."""
        flags = torch.zeros(self.size, device=self.comm_device)
        flags[self.rank] = float(failed)
        return [f > 0 for f in self.all_reduce(flags).tolist()]

    def main_first(self, work: Callable[[], T]) -> T:
        """``work()`` on rank 0, then on the others: for reading a dataset that rank 0 may
        have to download, so that no two processes download into one folder."""
        result = None
        with self.together():
            if self.main:
                result = work()
        with self.together():
            if not self.main:
                result = work()
        return result  # type: ignore[return-value]

    def reports(self, error: BaseException) -> bool:
        """Whether this process prints ``error``: rank 0 does (every process raises the same
        errors of bad input), the others only for what happened to them alone."""
        if isinstance(error, Abandoned):
            return False
        return self.main or isinstance(error, PeerLost) or getattr(error, "only_here", False)

    def shard(self, batch: Sequence[Any]) -> tuple[Any, ...] | None:
        """This process's rows of a step's batch: rows rank, rank + size, ... of every
        tensor in it (other entries as they are). A batch with fewer rows than processes
        (an epoch's last) goes whole to rank 0, and the others get None: they add no
        gradient to that step."""
        rows = [b.shape[0] for b in batch if isinstance(b, torch.Tensor)]
        if not self.distributed:
            return tuple(batch)
        if min(rows) < self.size:
            return tuple(batch) if self.main else None
        return tuple(b[self.rank :: self.size] if isinstance(b, torch.Tensor) else b for b in batch)

    def block(self, n: int) -> slice:
        """This process's contiguous share of ``n`` items, the shares as equal as can be."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def reduce_gradients(self, parameters: Sequence[torch.nn.Parameter], *values: float) -> list[float]:
        """Sum every parameter's gradient over the processes, and ``values`` with them, in
        one all-reduce; returns the summed values. A gradient that no process has stays
        None (Adam skips such a parameter, and must skip it everywhere)."""
        if not self.distributed:
            return list(values)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        device = grads[0].device if grads else self.comm_device
        flat = torch.cat([g.reshape(-1) for g in grads]
                         + [torch.tensor([float(p.grad is not None) for p in parameters], device=device),
                            torch.tensor(values, dtype=torch.float32, device=device)])
        self.all_reduce(flat)
        offset = 0
        for p, g in zip(parameters, grads):
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        present = flat[offset : offset + len(grads)]
        for p, g, has in zip(parameters, grads, present.tolist()):
            p.grad = g if has > 0 else None
        return flat[offset + len(grads):].tolist()


_WORLD = World()


def launched() -> bool:
    """Whether this process was started as one of several (``WORLD_SIZE`` above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_from_env() -> float:
    value = os.environ.get("PYRO_VAE_DIST_TIMEOUT")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        raise ConfigError(f"PYRO_VAE_DIST_TIMEOUT must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ConfigError(f"PYRO_VAE_DIST_TIMEOUT must be positive, got {value!r}")
    return seconds


def init(backend: str = "auto", device: str = "auto", timeout: float | None = None) -> World:
    """Join the process group that ``torchrun`` set up, once; alone, the single-process
    world. ``backend`` auto is NCCL for CUDA devices and gloo otherwise."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        return _WORLD
    if not launched():
        return _WORLD
    if backend not in BACKENDS:
        raise ConfigError(f"unknown {{backend}} {backend!r}; use one of {', '.join(BACKENDS)}", backend=Flag("backend"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if not dist.is_available():
        raise ConfigError("this torch was built without torch.distributed; run one process, without torchrun")
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ConfigError("the nccl backend needs CUDA GPUs and torch sees none; use {gloo} on CPUs",
                          gloo=Flag("backend", "gloo"))
    if backend == "gloo" and not dist.is_gloo_available():
        raise ConfigError("this torch has no gloo backend; use {nccl} on GPUs", nccl=Flag("backend", "nccl"))
    timeout = timeout_from_env() if timeout is None else timeout
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                              "start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunError(f"could not join the other processes ({first}); check the rendezvous options of torchrun") from None
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank, backend, timeout)
    return _WORLD


def current() -> World:
    """The world ``init`` joined, or the single process."""
    return _WORLD


def finish(together: bool = False) -> None:
    """Leave the process group (at the end of a command). ``together``, after a command
    that succeeded everywhere: wait for every process first, so that none tears the group
    down (rank 0 holds its store) while another still uses it, which could abort a process
    at exit."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            if together:
                dist.barrier()
            dist.destroy_process_group()
    _WORLD = World()
