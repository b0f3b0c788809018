"""How a family's Pyro pair meets Pyro's own tools, without changing Pyro for anyone else.

A family's ``model`` and ``guide`` are ``PairFunction`` modules rather than plain methods,
so that each of Pyro's ways of training finds the family's parameters:

- ``SVI(vae.model, vae.guide, pyro.optim.Adam(...), Trace_ELBO())``: run outside the
  library's own loop, the pair runs inside the family's Pyro context, where every access
  to a network makes the ``pyro.param`` statements that ``SVI`` collects. The parameters
  enter Pyro's parameter store under the family's own name (``vae_0.encoder$$$...``, a
  name no other family in the process has), as the same tensors that
  ``family.parameters()`` holds; ``pyro.clear_param_store()`` only forgets the names, and
  the next step registers them again.
- ``TraceMeanField_ELBO()(vae.model, vae.guide)`` (Pyro's ``ELBOModule``) and torch
  optimizers: a ``PairFunction`` holds its family as a submodule, so ``parameters()`` of
  the ELBO module are the family's.
- The library's own loop and evaluator run under ``own_parameters()``: no parameter
  statements at all, nothing written to Pyro's parameter store, and no step pays for the
  statements.

Nothing here sets a Pyro setting: with Pyro's default (global parameter store) and with a
user's ``pyro.settings.set(module_local_params=True)`` alike, the pair behaves as any
``PyroModule`` does.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import pyro
import torch
from pyro.nn.module import _is_module_local_param_enabled
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.util import is_validation_enabled

from .errors import PyroVAEError

_OWN_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar("pyro_vae_own_parameters", default=False)
_NUMBERS = itertools.count()


def unique_name(cls: type) -> str:
    """A name for a new family's parameters in Pyro's store: the class and a number that no
    other family of this process has."""
    return f"{cls.__name__.lower()}_{next(_NUMBERS)}"


@contextlib.contextmanager
def own_parameters() -> Iterator[None]:
    """Run pairs as plain functions of their modules' parameters: no ``pyro.param``
    statements and nothing in Pyro's parameter store. The library's loop, evaluator and
    ``CompiledLoss`` run under it; their optimizers hold ``module.parameters()``."""
    token = _OWN_LOOP.set(True)
    try:
        yield
    finally:
        _OWN_LOOP.reset(token)


class ParameterStoreClash(PyroVAEError):
    """Pyro's parameter store holds tensors under a family's name that are not the family's
    parameters: ``SVI`` would optimize those and leave the model as it is."""


class ModuleLocalSVI(PyroVAEError):
    """``SVI`` with a ``pyro.optim`` optimizer under module-local parameters: Pyro would
    fail inside ``SVI.step`` for any ``PyroModule``."""


def _collecting_params() -> bool:
    """Whether a ``poutine.trace(param_only=True)`` is on Pyro's stack: how ``SVI.step``
    collects the parameters it optimizes."""
    return any(isinstance(m, TraceMessenger) and m.param_only for m in _PYRO_STACK)


class PairFunction(torch.nn.Module):
    """A family's ``model`` or ``guide`` (the method ``method`` of its class) as a module
    whose parameters are the family's. Calling it calls the method; see the module
    docstring for what it does around the call."""

    def __init__(self, family: torch.nn.Module, method: str):
        super().__init__()
        self.family = family
        self.method = method
        self.__name__ = f"{type(family).__name__}.{method}"
        self.__doc__ = getattr(type(family), method).__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # a plain call: no module hooks to run
        family = self.family
        method = getattr(type(family), self.method)
        if _OWN_LOOP.get():
            return method(family, *args, **kwargs)
        context = family._pyro_context
        if _is_module_local_param_enabled():
            if not context.active and _collecting_params():
                raise ModuleLocalSVI(
                    "Pyro's SVI with a pyro.optim optimizer cannot train any PyroModule while "
                    "pyro.settings.get('module_local_params') is True (its parameters are not in the store it "
                    "optimizes): use the objective as a module with a torch optimizer, "
                    "loss = TraceMeanField_ELBO()(model.model, model.guide) and torch.optim.Adam(loss.parameters()), "
                    "or set module_local_params=False")
            # a family built before the user turned module-local parameters on has no local store yet
            context.__dict__.setdefault("param_state", {"params": {}, "constraints": {}})
        elif not context.active:
            check_parameter_store(family)
        if self.method != "guide" and not context.active and is_validation_enabled():
            family.check_inputs(args, kwargs)
        with context, warnings.catch_warnings():
            # frozen weights (M1+M2's M1) stay out of the store, as they should: no warning per step
            warnings.filterwarnings("ignore", message=".*not registered in the param store because requires_grad=False")
            return method(family, *args, **kwargs)

    forward = __call__

    def __repr__(self) -> str:  # not the family's whole module tree
        return f"PairFunction({self.method} of {self.family._pyro_name})"


def check_parameter_store(family: torch.nn.Module) -> None:
    """Refuse to run when Pyro's parameter store holds, under this family's name, tensors
    that are not its parameters (a store loaded from disk, a copy's): the ``pyro.param``
    statements would hand ``SVI`` those tensors, and training would change nothing."""
    prefix = family._pyro_name + "."
    store = pyro.get_param_store()._params
    foreign = [name for name, value in store.items() if name.startswith(prefix)]
    if not foreign:
        return
    own = {id(p) for p in family.parameters()}
    stale = [name for name in foreign if id(store[name]) not in own]
    if stale:
        raise ParameterStoreClash(
            f"Pyro's parameter store holds {len(stale)} tensor(s) under this model's name {family._pyro_name!r} "
            f"(e.g. {stale[0]!r}) that are not its parameters, so SVI would train those instead: remove them "
            "with pyro.clear_param_store() (the model keeps its weights)")


def family_of(fn: Any) -> torch.nn.Module | None:
    """The module whose pair ``fn`` is (a ``PairFunction`` or a bound method), or None."""
    owner = fn.family if isinstance(fn, PairFunction) else getattr(fn, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def attach_pair(family: torch.nn.Module) -> None:
    """Give ``family`` its ``model`` and ``guide`` (and any other method its class lists in
    ``pair_methods``, e.g. the GMVAE's ``marginal_model``) as ``PairFunction``s. They live in
    the instance's ``__dict__``, not among its submodules: a module that held itself would
    recurse in ``state_dict``."""
    for method in type(family).pair_methods:
        object.__setattr__(family, method, PairFunction(family, method))
