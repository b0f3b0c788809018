"""A compiled path for the Pyro objective and the evaluator's chunk: the model/guide pair
traced once per input signature into a TorchScript graph of tensor operations.

Every step of Pyro costs a fixed amount of Python — running the model and guide under
messengers, building two traces, replaying, walking the sites — which at MNIST's sizes is
as large as the networks' arithmetic. ``torch.jit.trace`` runs the pair once and records
only the tensor operations it did; afterwards the graph runs without any of that Python.
The parameters of the family enter the graph as module parameters, so gradients flow to
them and the optimizer sees the same tensors; random draws are recorded as random
operations (``aten::normal``) and draw from torch's generator on every run, in the order
eager code would. The graph runs in TorchScript's interpreter without its optimizing
passes (``torch.jit.optimized_execution(False)``): those re-derive the backward pass
symbolically and change gradients in the last bits, while the interpreter calls the very
kernels eager code calls. The compiled objective therefore
gives the eager one's loss and gradients bit for bit from the same generator state
(tested per family and objective), and a run that is resumed, with its traces made at
other steps, stays exact. The exception is a guide that enumerates (the SSVAE's): a
plate's size is a traced tensor in the graph, not a number, and Pyro's TraceEnum_ELBO
then takes another path to the same expectation, which moves the gradients in their last
bits (``TOLERANCE``).

A trace is only right for what it was traced with: Python values (a KL weight, a scale,
the number of particles) and the shapes of the tensors are baked in, and so is any
branch taken on the values of a tensor. Hence:

- traces are cached per signature: the shapes, dtypes and devices of the tensor
  arguments, the other arguments, the module's training mode and the grad mode. A new
  signature (the short last batch of an epoch) gets a trace of its own;
- a new trace gives the result of the call it was traced on (after one eager run for
  Pyro's argument checks when validation is on), and on the next call of its signature
  (other data, so a baked branch would show) the trace and eager code run from the same
  generator state and must agree, value and gradients, or the trace is dropped;
  ``recheck`` (the training loop calls it at every epoch) asks for that again;
- anything that fails turns the compiled path off for good with a one-line notice, and
  the eager code runs: compilation changes speed, not results (beyond the float
  rounding described above).

Pyro's ELBOs call ``.item()`` on a surrogate to return the loss's value beside its
gradient (``loss + (surrogate - item(surrogate))``); traced, that item would be a
constant of the trace. While tracing, it is replaced by ``detach``, which is the same
number in eager code and stays a graph operation in the trace.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from numbers import Number
from typing import Any

import pyro
import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import torch
from pyro.poutine.util import is_validation_enabled

from .pair import own_parameters

Log = Callable[[str], None]

#: how far a trace may be from eager code and still count as the same computation: relative
#: to each tensor's largest entry. They agree exactly where the guide enumerates nothing;
#: where it does, Pyro's TraceEnum_ELBO takes another path for a traced plate size (a
#: tensor, not a number), which moves the last bits (experiments/compiled_exactness.py
#: measures how far). A branch on the data's values moves them far more.
TOLERANCE = 1e-4


def _detach(x: Any) -> Any:
    return x if isinstance(x, Number) else x.detach()


@contextlib.contextmanager
def traceable_pyro() -> Iterator[None]:
    """Pyro with its ``torch_item`` calls (a Python float of a tensor) made graph
    operations while a trace is recorded; see the module docstring."""
    modules = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo)
    saved = [m.torch_item for m in modules]
    for m in modules:
        m.torch_item = _detach
    try:
        yield
    finally:
        for m, item in zip(modules, saved):
            m.torch_item = item


class _Graph(torch.nn.Module):
    """A module whose forward is ``fn`` over the tensor arguments, holding the family as a
    submodule so that ``torch.jit.trace`` takes its parameters as the graph's parameters
    (not as constants)."""

    def __init__(self, family: torch.nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.family = family
        self.fn = fn

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.fn(*tensors)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The state of torch's generators that ``device``'s draws use (as checkpoints keep it)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back a state from ``rng_state``."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _outputs(value: Any) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = a.detach(), b.detach()
    finite = b[torch.isfinite(b)]  # a diverged step's nan and inf must match, and not set the scale
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * scale, equal_nan=True))


class Compiled:
    """``fn(*tensors)`` (tensors in, a tensor or a tuple of tensors out) of a module's
    computation, run as a cached, verified trace; see the module docstring.

    ``statics`` passed on each call are the non-tensor values that ``fn`` depends on (they
    key the cache; ``fn`` closes over them). ``what`` names the computation in notices;
    ``log`` receives them (the trace time of each signature, and why the eager path is
    taken when it is)."""

    MAX_TRACES = 16

    def __init__(self, module: torch.nn.Module, what: str, log: Log | None = None):
        self.module = module
        self.what = what
        self.log = log or (lambda message: None)
        self.enabled = True
        self.reason = ""
        self.trace_seconds = 0.0
        self.graph_calls = 0  # runs of a trace that gave the result
        self.traces: dict[Any, Any] = {}  # signature -> graph
        self.unverified: set[Any] = set()

    def disable(self, reason: str) -> None:
        """Run eagerly from now on, saying why once."""
        if self.enabled:
            self.enabled, self.reason = False, reason
            self.traces.clear()
            self.log(f"compiled {self.what} off, running eagerly: {reason}")

    def recheck(self) -> None:
        """Verify every trace again on its next call."""
        self.unverified.update(self.traces)

    def __call__(self, fn: Callable[..., Any], tensors: tuple[torch.Tensor, ...], statics: tuple = ()) -> Any:
        """``fn(*tensors)``, from the trace of this signature unless the compiled path is off.

        A new signature is traced (after one eager run for Pyro's argument checks when
        validation is on), and its first call already runs the trace; the next call
        verifies it against eager code from the same generator state."""
        if not self.enabled:
            return fn(*tensors)
        key = (statics, tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors),
               self.module.training, torch.is_grad_enabled(), torch.get_default_dtype())
        try:
            graph = self.traces.get(key)
        except TypeError:  # a non-tensor argument that is not hashable, as a list is
            self.disable(f"its non-tensor arguments cannot key a cache of traces ({_first_line(statics)[:80]})")
            return fn(*tensors)
        if graph is None:
            graph = self._trace(key, fn, tensors) if len(self.traces) < self.MAX_TRACES else None
        elif key in self.unverified:
            return self._verify(key, graph, fn, tensors)
        if graph is None:
            return fn(*tensors)
        self.graph_calls += 1
        with torch.jit.optimized_execution(False):
            return graph(*tensors)

    def _trace(self, key: Any, fn: Callable[..., Any], tensors: tuple[torch.Tensor, ...]) -> Any:
        device = _device(self.module)
        state = rng_state(device)
        try:
            if is_validation_enabled():  # the checks of eager code; the trace has none
                fn(*tensors)
                set_rng_state(state, device)
            start = time.perf_counter()
            with warnings.catch_warnings(), pyro.validation_enabled(False), traceable_pyro():
                # shape checks and constants from Python numbers warn at every trace; what they
                # warn of (a value baked in) is what the signature and the verification cover
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*torch.jit.trace.*deprecated")
                graph = torch.jit.trace(_Graph(self.module, fn), tensors, check_trace=False)
        except Exception as e:  # anything torch.jit.trace cannot record
            set_rng_state(state, device)
            self.disable(f"{self.what} cannot be traced ({type(e).__name__}: {_first_line(e)})")
            return None
        seconds = time.perf_counter() - start
        set_rng_state(state, device)
        self.trace_seconds += seconds
        self.traces[key] = graph
        self.unverified.add(key)
        self.log(f"traced the {self.what} for inputs ({', '.join(_shape(t) for t in tensors)}) in {seconds:.2f} s")
        return graph

    def _verify(self, key: Any, graph: Any, fn: Callable[..., Any], tensors: tuple[torch.Tensor, ...]) -> Any:
        """The trace's result, once eager code has given the same from the same generator
        state: outputs and, with grad enabled, the gradients of the first output's sum
        with respect to every parameter; eager code's result if not."""
        device = _device(self.module)
        params = [p for p in self.module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        state = rng_state(device)
        try:
            with torch.jit.optimized_execution(False):
                result = graph(*tensors)
            traced = _outputs(result)
            traced_grads = _grads(traced[0], params, retain=True)
        except Exception as e:
            set_rng_state(state, device)
            self.disable(f"its trace fails on new data ({type(e).__name__}: {_first_line(e)})")
            return fn(*tensors)
        set_rng_state(state, device)
        eager_result = fn(*tensors)
        eager = _outputs(eager_result)
        if len(traced) == len(eager) and all(map(_same, traced, eager)) \
                and all(map(_same, traced_grads, _grads(eager[0], params, retain=True))):
            self.unverified.discard(key)
            self.graph_calls += 1
            return result
        self.disable("its trace gives other values than eager code on new data (control flow that depends "
                     "on the data's values?)")
        return eager_result


def _device(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _grads(value: torch.Tensor, params: list[torch.Tensor], retain: bool = False) -> list[torch.Tensor | None]:
    if not params or not value.requires_grad:
        return []
    return list(torch.autograd.grad(value.sum(), params, retain_graph=retain, allow_unused=True))


def _first_line(e: Any) -> str:
    return (str(e).splitlines() or [""])[0]


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


class CompiledLoss:
    """``family.training_loss(objective, batch, kl_weight)`` through ``Compiled``: the
    training loop's step. Only steps at the run's constant ``kl_weight`` are compiled; the
    steps of a KL warm-up, each at a weight of its own, run eagerly. ``enabled=False``
    (``--no-compile``) runs every step eagerly, as do objectives that declare themselves
    untraceable (``traceable = False``, with ``untraceable_reason``; said once). Eager
    steps also run with ``traceable_pyro``, so that their loss is the trace's to the bit
    whichever path a step takes."""

    def __init__(self, family: torch.nn.Module, objective: Any, kl_weight: float = 1.0, log: Log | None = None,
                 enabled: bool = True):
        self.family, self.objective, self.kl_weight = family, objective, float(kl_weight)
        self.compiled = Compiled(family, "training objective", log)
        if not enabled:
            self.compiled.enabled, self.compiled.reason = False, "--no-compile"
        elif not getattr(objective, "traceable", True):
            self.compiled.disable(getattr(objective, "untraceable_reason", f"{type(objective).__name__} cannot be traced"))

    def __call__(self, batch: tuple[Any, ...], kl_weight: float) -> torch.Tensor:
        """The differentiable loss of one step, as ``training_loss`` returns it."""
        def loss(*ts: torch.Tensor) -> torch.Tensor:
            it = iter(ts)
            full = tuple(next(it) if isinstance(b, torch.Tensor) else b for b in batch)
            with traceable_pyro(), own_parameters():
                return self.family.training_loss(self.objective, full, kl_weight)

        tensors = tuple(b for b in batch if isinstance(b, torch.Tensor))
        if float(kl_weight) != self.kl_weight:
            return loss(*tensors)
        return self.compiled(loss, tensors, tuple(None if isinstance(b, torch.Tensor) else b for b in batch))
