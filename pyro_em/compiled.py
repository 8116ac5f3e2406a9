"""``Q`` recorded as a straight-line program of tensor operations, run without the model.

The gradient M-step evaluates ``Q = sum_f <w_f, log f>`` (:func:`~pyro_em.estep.expected_log_joint`)
several times a step. Running the Pyro model for each evaluation costs its Python (poutine
handlers, distribution objects, checks) on top of the tensor work, which for moderate data is
most of it. So once a batch's ``Q`` has been evaluated :data:`RECORD_AFTER` times, one more
evaluation runs under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that records
every ATen operation reached from its inputs, the params' unconstrained values and the E-step's
weights. Operations on anything else (the data, masks, enumerated values) are computed once,
there, and kept as constants. The recorded operations become a Python function of the inputs
(:func:`_compile`); later evaluations call it, and autograd differentiates it as any tensor code,
so gradients and Hessians are unchanged.

The program is only as good as the run it was recorded from, so:

* the recording runs Pyro's own ``log_prob`` without validation or pyro_em's checks (the E-step
  made those). Where Python reads a value computed from the inputs (``if`` on a param,
  ``.item()``, ``float(...)``, ``torch.equal``), a random draw, an in-place change of a constant
  by a recorded operation, or a constant changed after it was read, recording stops and the
  batch keeps running the model;
* the first evaluation after the recording, at other params, runs the model too, and the two
  values must agree to round-off, else the program is dropped for good; so must every input
  param reach ``Q`` (a ``pyro.module`` network computes with its own tensors, not the store's);
* a non-finite value is recomputed by the model, so a rejected param still raises its error
  naming the site (or gives the model's own ``-inf``).

Set :data:`ENABLED` to ``False`` to always run the model.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

import pyro
import torch
from pyro.poutine.trace_struct import Trace
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .estep import EStep, expected_log_joint

#: Record ``Q`` (see the module docs); ``False``: run the model for every evaluation.
ENABLED = True
#: Evaluations of a batch's ``Q`` by running the model before it is recorded (a recording costs
#: about two evaluations, and is checked by a third).
RECORD_AFTER = 2


class BatchQ:
    """``Q`` of one batch of data, at the param store's current values.

    :param trace: runs the model on the batch at the current params and returns the packed
        trace (:func:`~pyro_em.estep.trace_model`); called with ``record=True`` for the run that
        is recorded.
    :param names: the params the model reads from Pyro's param store (the program's inputs).
    :param free: those among ``names`` that the gradient M-step moves: the others enter the
        program detached, so that autograd records nothing for them.
    """

    def __init__(self, trace: Callable[..., Trace], names: List[str], free: List[str]):
        self._trace, self.names, self._free = trace, list(names), set(free)
        self._program: Optional[Callable[..., torch.Tensor]] = None
        self._evaluations = 0  # by running the model
        self._state = "new"  # "new" -> (recorded) "unchecked" -> "checked", or "off"

    @property
    def compiled(self) -> bool:
        """Whether evaluations run the recorded program (checked against the model)."""
        return self._state == "checked"

    def __call__(self, estep: EStep) -> torch.Tensor:
        """``Q`` at the current params under ``estep``'s weights (differentiable in the params)."""
        if self._state == "new" and ENABLED and self._evaluations >= RECORD_AFTER:
            self._program = self._record(estep)
            self._state = "off" if self._program is None else "unchecked"
            if self._program is not None:  # (at the params it was recorded at)
                return self._run(estep)
        if self._state in ("new", "off"):
            return self.eager(estep)
        q = self._run(estep)
        if self._state == "unchecked":  # the first evaluation at other params
            eager = self.eager(estep)
            tol = 1e3 * torch.finfo(eager.dtype).eps * max(1.0, abs(float(eager.detach())))
            if not bool(torch.isfinite(eager)) or abs(float(q.detach()) - float(eager.detach())) > tol:
                self._state, self._program = "off", None
                return eager
            self._state = "checked"
        if not bool(torch.isfinite(q)):
            return self.eager(estep)  # the model's own error or value
        return q

    def eager(self, estep: EStep) -> torch.Tensor:
        """``Q`` by running the model."""
        self._evaluations += 1
        return expected_log_joint(estep, self._trace())

    def _inputs(self, estep: EStep) -> Optional[list]:
        """The program's inputs: the params' unconstrained tensors, then the E-step's weights
        (``None`` if their shapes are not those it was recorded with)."""
        store = pyro.get_param_store()
        weights = [estep.weights[name] for name in self._weight_names]
        if any(w.shape != s for w, s in zip(weights, self._weight_shapes)):
            return None
        return [store._params[name] if name in self._free else store._params[name].detach()
                for name in self.names] + weights

    def _run(self, estep: EStep) -> torch.Tensor:
        inputs = self._inputs(estep)
        if inputs is None:  # the E-step's shapes changed: the model's structure did
            self._state, self._program = "off", None
            return self.eager(estep)
        return self._program(*inputs)

    def _record(self, estep: EStep) -> Optional[Callable[..., torch.Tensor]]:
        self._weight_names = list(estep.weights)
        self._weight_shapes = [estep.weights[name].shape for name in self._weight_names]
        store = pyro.get_param_store()  # its own tensors, which pyro.module's networks use too
        inputs = [store._params[name] for name in self.names] + [estep.weights[name] for name in self._weight_names]
        recorder = _Recorder(inputs)
        try:
            with torch.no_grad(), pyro.validation_enabled(False), recorder:
                q = expected_log_joint(estep, self._trace(record=True))
            return recorder.compile(q, len(self.names))
        except Exception:  # noqa: BLE001 (_Unrecordable, or the model fails here: run it instead)
            return None


class _Unrecordable(Exception):
    """The run cannot be replayed as a program of its tensor operations (see the module docs)."""


class _Slot:
    """A recorded tensor: the ``index``-th value the program computes (inputs first)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Recorder(TorchDispatchMode):
    """Records the ATen operations that depend on ``inputs``; runs (and keeps the results of)
    the others as constants."""

    def __init__(self, inputs: List[torch.Tensor]):
        super().__init__()
        self.slots: Dict[int, _Slot] = {}
        self.alive: List[torch.Tensor] = []  # keeps recorded tensors' ids unique
        self.steps: List[Tuple[Any, tuple, dict, List[_Slot], bool]] = []  # (.., changes an argument)
        self.read: List[Tuple[torch.Tensor, int]] = []  # constants the steps read, with versions
        self.inputs = [self._new_slot(t) for t in inputs]

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing here runs under torch.compile: spare the import of torch._dynamo (1 s)

    def _new_slot(self, t: torch.Tensor) -> _Slot:
        slot = _Slot(len(self.alive))
        self.slots[id(t)] = slot
        self.alive.append(t)
        return slot

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(isinstance(a, torch.Tensor) and id(a) in self.slots for a in tree_flatten((args, kwargs))[0]):
            if torch.Tag.nondeterministic_seeded in func.tags:
                raise _Unrecordable(f"{func} draws random numbers")
            return func(*args, **kwargs)  # a constant

        def template(value):  # (before the call: an operation that changes a constant is caught)
            if isinstance(value, torch.Tensor):
                if id(value) in self.slots:
                    return self.slots[id(value)]
                self.read.append((value, value._version))
            elif isinstance(value, (list, tuple)):
                return type(value)(template(v) for v in value)
            return value

        step_args, step_kwargs = template(args), {k: template(v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        outs = tree_flatten(out)[0]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise _Unrecordable(f"{func} gives Python a value computed from the params")
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        self.steps.append((func, step_args, step_kwargs, [self._new_slot(o) for o in outs], writes))
        return out

    def compile(self, result: torch.Tensor, n_params: int) -> Optional[Callable[..., torch.Tensor]]:
        """The recorded program as a function of the inputs, returning ``result``; ``None`` if
        a param does not reach it."""
        if any(t._version != v for t, v in self.read):
            raise _Unrecordable("a constant changed after a recorded operation read it, or by one")
        if id(result) not in self.slots:
            return None
        return _compile(self.steps, self.inputs, self.slots[id(result)], n_params)


def _compile(steps, inputs: List[_Slot], result: _Slot, n_params: int) -> Optional[Callable[..., torch.Tensor]]:
    """Python source for the steps that ``result`` needs (and every in-place one, whose effect
    may reach it through a view), compiled: one line per operation, constants and operators
    bound as globals, each value dropped after its last use."""
    def slots(value):
        if isinstance(value, _Slot):
            yield value.index
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from slots(v)

    needed, kept = {result.index}, []
    for func, args, kwargs, outs, writes in reversed(steps):
        if writes or any(o.index in needed for o in outs):
            kept.append((func, args, kwargs, outs))
            needed.update(slots((args, list(kwargs.values()))))
    kept.reverse()
    if any(slot.index not in needed for slot in inputs[:n_params]):
        return None  # a param that does not reach Q through the store
    last_use = {index: i for i, (_, args, kwargs, _) in enumerate(kept) for index in slots((args, list(kwargs.values())))}
    names: Dict[str, Any] = {"_flat": lambda out: tree_flatten(out)[0]}

    def source(value, key: str) -> str:
        if isinstance(value, _Slot):
            return f"v{value.index}"
        if isinstance(value, (list, tuple)) and any(True for _ in slots(value)):
            inner = ", ".join(source(v, f"{key}_{j}") for j, v in enumerate(value))
            return f"[{inner}]" if isinstance(value, list) else f"({inner},)"
        names[key] = value
        return key

    lines = [f"def program({', '.join(f'v{slot.index}' for slot in inputs)}):"]
    for i, (func, args, kwargs, outs) in enumerate(kept):
        names[f"f{i}"] = getattr(func, "_op", func)
        call = ", ".join([source(a, f"c{i}_{j}") for j, a in enumerate(args)]
                         + [f"{k}={source(v, f'c{i}_{k}')}" for k, v in kwargs.items()])
        targets = ", ".join(f"v{o.index}" for o in outs)
        if len(outs) == 1:
            lines.append(f"    {targets} = f{i}({call})")
        elif outs:
            lines.append(f"    {targets} = _flat(f{i}({call}))")
        else:
            lines.append(f"    f{i}({call})")
        dead = [f"v{index}" for index, last in last_use.items() if last == i and index != result.index]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    lines.append(f"    return v{result.index}")
    exec(compile("\n".join(lines), "<pyro_em.compiled>", "exec"), names)
    return names["program"]
