"""Interrupts: a ``KeyboardInterrupt`` (Ctrl-C) at any point of a call leaves the process as
usable as before the call.

Python raises ``KeyboardInterrupt`` between any two bytecodes, so it can land where an ordinary
exception never does: after Pyro pushed a plate on its stack but before the ``with`` block that
pops it began, while PyTorch pushes or pops a dispatch mode, or half-way through a module's first
import. Two mechanisms keep the process whole:

* :func:`guarded` wraps each public call of :class:`~pyro_em.EM`: on any exception it puts back
  what the call may have left changed, the state of Pyro's effect-handler stack and plate
  allocator, PyTorch's grad mode, its dispatch- and function-mode stacks and functorch's
  transform levels (vmap over runs stepped together), Pyro's and PyTorch's validation
  switches, and the modules of a package whose import it cut short. (The param store is the
  step's own transaction, :mod:`pyro_em.iteration`.)
* :func:`deferred` holds ``SIGINT`` back around work that must not be cut (capturing a graph
  with ``make_fx``, whose C++ dispatch-mode bookkeeping aborts the interpreter when an interrupt
  unwinds through it, and the lazy imports it makes): an interrupt that arrives inside is raised
  as ``KeyboardInterrupt`` when the block ends.
"""

import contextlib
import signal
import sys
import threading
from typing import Iterator, List

import pyro.distributions.util as dist_util
import pyro.infer.util as infer_util
import pyro.poutine.runtime as runtime
import pyro.poutine.util as poutine_util
import torch

from . import memo


class _Snapshot:
    """The process-wide state a call of EM may change and Pyro or PyTorch restore only when an
    exception unwinds through their ``with`` blocks in the usual way."""

    def __init__(self):
        self.stack = list(runtime._PYRO_STACK)
        self.plates = list(runtime._DIM_ALLOCATOR._stack)
        enum = runtime._ENUM_ALLOCATOR
        self.enum = dict(vars(enum))
        self.enum_maps = {k: dict(v) for k, v in vars(enum).items() if isinstance(v, dict)}
        self.grad = torch.is_grad_enabled()
        self.modes = torch._C._len_torch_dispatch_stack()
        self.function_modes = torch._C._len_torch_function_stack()
        self.layers = torch._C._functorch.get_dynamic_layer_stack_depth()  # (vmap, vjp: runs stepped together)
        self.validation = (infer_util._VALIDATION_ENABLED, poutine_util._VALIDATION_ENABLED,
                           dist_util._VALIDATION_ENABLED, torch.distributions.Distribution._validate_args)
        self.memo = memo._MEMO.get()

    def restore(self) -> None:
        runtime._PYRO_STACK[:] = self.stack
        runtime._DIM_ALLOCATOR._stack[:] = self.plates
        enum = runtime._ENUM_ALLOCATOR
        vars(enum).clear()
        vars(enum).update(self.enum)
        vars(enum).update({k: dict(v) for k, v in self.enum_maps.items()})
        while torch._C._len_torch_dispatch_stack() > self.modes:
            torch._C._pop_torch_dispatch_stack()
        while torch._C._len_torch_function_stack() > self.function_modes:
            torch._C._pop_torch_function_stack()
        if torch._C._functorch.get_dynamic_layer_stack_depth() > self.layers:
            torch._C._functorch.pop_dynamic_layer_stack_and_undo_to_depth(self.layers)
        torch.set_grad_enabled(self.grad)
        (infer_util._VALIDATION_ENABLED, poutine_util._VALIDATION_ENABLED, dist_util._VALIDATION_ENABLED,
         torch.distributions.Distribution._validate_args) = self.validation
        memo._MEMO.set(self.memo)
        _drop_orphan_modules()


def _drop_orphan_modules() -> None:
    """Forget the submodules of a package whose import was cut short (the package itself is
    then absent from ``sys.modules``, its finished submodules not), so that the next import
    of the package starts afresh rather than meeting half-made modules ("module 'sympy' has
    no attribute 'core'"; PyTorch imports sympy lazily, in a model's first
    ``torch.broadcast_shapes``)."""
    for name in list(sys.modules):
        parts = name.split(".")
        if any(".".join(parts[:i]) not in sys.modules for i in range(1, len(parts))):
            del sys.modules[name]


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Inside: any exception (a ``KeyboardInterrupt`` above all) leaves Pyro's and PyTorch's
    process-wide state as it was at the start of the block (see the module docs)."""
    snapshot = _Snapshot()
    try:
        yield
    except BaseException:
        with deferred():
            snapshot.restore()
        raise


_pending: List[bool] = []  # one entry per open deferred() block of the main thread


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold ``SIGINT`` back inside the block (in the main thread, where Python runs signal
    handlers; elsewhere the block runs as it is): an interrupt that arrives inside is
    delivered again when the block ends, to the handler that was in place before it (Python's
    own raises ``KeyboardInterrupt``)."""
    if threading.current_thread() is not threading.main_thread() or _pending:
        yield  # (not the main thread, or inside another deferred block already)
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # (installed by a non-Python handler: leave it)
        yield
        return
    _pending.append(False)

    def hold(signum, frame):
        _pending[0] = True

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if _pending.pop():
            signal.raise_signal(signal.SIGINT)
