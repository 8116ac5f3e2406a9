"""Tensor programs recorded from one run and replayed without Python's overhead.

A step of EM runs much Python around its tensor operations: the Pyro model (poutine handlers,
distribution objects), plans, rules. Where the same computation repeats with new values, it
is recorded once: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen
operation of a run; those reached from the inputs are recorded, the others (on the data,
masks, enumerated values) run once, there, and are kept as constants. The recorded operations
become a straight-line Python function of the inputs (:func:`_compile`), which later runs call.
Autograd differentiates it as any tensor code. Two computations are recorded:

* :class:`BatchQ`: a batch's ``Q = sum_f <w_f, log f>`` (:func:`~pyro_em.estep.expected_log_joint`),
  which the gradient M-step evaluates several times a step, from the params' unconstrained
  values and the E-step's weights (recorded with Pyro's own ``log_prob`` and no validation);
* :class:`StepProgram`: the closed-form stage of a step on one batch (the E-step, be it a
  fused chain's forward-backward or the traced model's enumeration and backward pass, the
  statistics, the solves), from the params to their new values and the loss.

A program is only as good as the run it was recorded from, so:

* Python's reads of values computed from the inputs become *guards*: a boolean (an ``if``
  on ``(x > 0).all()``, a check) must come out as it did, else that call runs eagerly; any
  other read (``.item()`` of a number, ``float(...)``), a recorded operation reading a
  random draw, a warning, or a constant changed after a recorded operation read it, leave the
  computation unrecorded (it keeps running eagerly). A draw nothing recorded reads (a
  param's init, ``pyro.param("locs", torch.randn(K))``, evaluated at every run) is not drawn
  by the program. A constant buffer that a recorded operation writes into (a factory's
  zeros) is copied as it was, and each replay writes into a fresh copy;
* the first replay is compared with an eager run: it must agree to round-off, and take less
  time, else the program is dropped for good;
* a non-finite result is recomputed eagerly, so errors keep naming their site;
* values are freed where the recorded run freed them, so a replay allocates memory as the
  eager run does (no page faults that the eager run's reuse of freed blocks avoids).

A computation is recorded after :data:`RECORD_AFTER` eager runs (a traced stage after
:data:`RECORD_TRACED_AFTER`). Set :data:`ENABLED` to ``False`` to run everything eagerly.
"""

import time
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pyro
import torch
from pyro.poutine.trace_struct import Trace
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .estep import EStep, expected_log_joint

#: Record and replay (see the module docs); ``False``: run everything eagerly.
ENABLED = True
#: Keep a program only if its first replay took less time than the eager run it is checked
#: against (``False``: keep every program that agrees, timing aside).
FASTER_ONLY = True
#: Eager runs of a computation before it is recorded (a recording costs about two runs, and
#: is checked by a third).
RECORD_AFTER = 2
#: The same for a closed-form stage that traces the model (not a fused chain): its recording
#: runs the model, the enumeration and the E-step's backward pass under the recorder, which
#: costs tens of eager runs, worth it for a fit, not for a few steps.
RECORD_TRACED_AFTER = 20

Tensors = Tuple[torch.Tensor, ...]


class _Replay:
    """The life of one recorded computation: run eagerly :data:`RECORD_AFTER` times, then
    recorded, compared with an eager run at its first replay, then replayed; dropped for good
    where it cannot be recorded, disagrees or is slower."""

    def __init__(self, finite: bool = True, after: Optional[int] = None):
        self.finite = finite  # recompute non-finite results eagerly
        self.after = after  # eager runs before the recording (default RECORD_AFTER)
        self.program: Optional[Callable[..., Tensors]] = None
        self.runs = 0  # eager
        self.state = "new"  # "new" -> (recorded) "unchecked" -> "checked", or "off"

    def __call__(self, inputs: Sequence[torch.Tensor], eager: Callable[[], Tensors],
                 record: Optional[Tuple[Sequence[torch.Tensor], Callable[[], Tensors]]] = None) -> Tensors:
        """The results of ``eager()``, computed by the program where there is one.

        :param inputs: the program's inputs.
        :param record: the inputs and function to record, if not ``inputs`` and ``eager``.
        """
        if self.state == "new" and ENABLED and self.runs >= (RECORD_AFTER if self.after is None else self.after):
            out, self.program = _record(*(record or (inputs, eager)))
            self.state = "off" if self.program is None else "unchecked"
            return out  # the recorded run's own results: the program is not trusted yet
        if self.program is None:
            self.runs += 1
            return eager()
        if self.state == "unchecked":
            start = time.perf_counter()
            try:
                out = self.program(*inputs)
            except _GuardFailed:
                return eager()
            except Exception:  # noqa: BLE001 (a program that fails is dropped; eager says why)
                self.state, self.program = "off", None
                return eager()
            middle = time.perf_counter()
            reference = eager()
            # Kept if it agrees, and is faster (where Python's overhead is small beside the
            # operations, as in a long HMM's thousands of small ones, it need not be).
            faster = middle - start < time.perf_counter() - middle or not FASTER_ONLY
            keep = faster and all(_agree(a, b) for a, b in zip(out, reference))
            self.state, self.program = ("checked", self.program) if keep else ("off", None)
            return reference
        return self._run(inputs, eager)

    def _run(self, inputs: Sequence[torch.Tensor], eager: Callable[[], Tensors]) -> Tensors:
        try:
            out = self.program(*inputs)
        except _GuardFailed:
            return eager()
        except Exception:  # noqa: BLE001 (inputs moved to another device, say: eager says why)
            self.state, self.program = "off", None
            return eager()
        if self.finite and not all(bool(torch.isfinite(t).all()) for t in out):
            return eager()  # the eager run's own error or value
        return out


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to round-off (the program runs the eager run's operations, in its order)."""
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool((a == b).all())
    tol = 1e3 * torch.finfo(a.dtype).eps
    return bool(((a == b) | ((a - b).abs() <= tol * b.abs().clamp_min(1))).all())


class BatchQ:
    """``Q`` of one batch of data, at the param store's current values, replayed once recorded.

    :param trace: runs the model on the batch at the current params and returns the packed
        trace (:func:`~pyro_em.estep.trace_model`); called with ``record=True`` for the run that
        is recorded.
    :param names: the params the model reads from Pyro's param store (the program's inputs).
    :param free: those among ``names`` that the gradient M-step moves: the others enter the
        program detached, so that autograd records nothing for them.
    :param replay: record and replay; ``False`` runs the model at every evaluation.
    """

    def __init__(self, trace: Callable[..., Trace], names: List[str], free: List[str], replay: bool = True):
        self._trace, self.names, self._free = trace, list(names), set(free)
        self._replay = _Replay()
        if not replay:  # (EM(model, jit=False): the model runs at every evaluation)
            self._replay.state = "off"
        self._weights: Optional[List[Tuple[str, torch.Size]]] = None  # names and shapes recorded

    def __call__(self, estep: EStep) -> torch.Tensor:
        """``Q`` at the current params under ``estep``'s weights (differentiable in the params)."""
        store = pyro.get_param_store()
        weights = [(name, w.shape) for name, w in estep.weights.items()]
        if self._weights is not None and weights != self._weights:  # the model's structure changed
            self._replay.state, self._replay.program = "off", None
        self._weights = weights
        inputs = [store._params[name] if name in self._free else store._params[name].detach() for name in self.names]
        inputs += list(estep.weights.values())
        # The recording reads the store's own tensors, which pyro.module's networks use too.
        recorded = [store._params[name] for name in self.names] + list(estep.weights.values())

        def record() -> Tensors:
            # Under Pyro's validation setting: the argument checks become guards, so a point a
            # distribution rejects runs eagerly and raises there, never a replayed garbage Q.
            return (expected_log_joint(estep, self._trace(record=True)),)

        return self._replay(inputs, lambda: (self.eager(estep),), (recorded, record))[0]

    def eager(self, estep: EStep) -> torch.Tensor:
        """``Q`` by running the model."""
        return expected_log_joint(estep, self._trace())


class StepProgram:
    """The closed-form stage of an EM step on one batch (E-step, statistics, solves; see
    ``_Iteration.closed_form``), replayed once recorded: the params' unconstrained values in,
    their new (constrained) values and the log marginal likelihood out.

    :param key: settings the stage reads besides its inputs (``reg_covar``, ``temperature``,
        the forward-backward algorithm): a change records it again.
    :param traced: the stage traces the model (not a fused chain): recorded after
        :data:`RECORD_TRACED_AFTER` eager steps.
    """

    def __init__(self, key: tuple, traced: bool = False):
        # (no finiteness check: the recorded stage guards its log Z, and write() its values)
        self.key, self._names = key, None
        self._replay = _Replay(finite=False, after=RECORD_TRACED_AFTER if traced else None)

    def __call__(self, params: Dict[str, torch.Tensor], stage: Callable[[], Tuple[Dict[str, torch.Tensor], torch.Tensor, Dict[str, torch.Tensor]]]):
        """``stage()``'s ``(new values, log Z, E-step weights)`` (the weights as packed
        tensors, for the gradient M-step's ``Q``; none for a fused chain), replayed where
        recorded."""
        def eager() -> Tensors:
            new, log_z, weights = stage()
            if self._names is None:
                self._names = list(new), {name: w._pyro_dims for name, w in weights.items()}
            return (*[new[name] for name in self._names[0]], log_z, *[weights[name] for name in self._names[1]])

        with torch.no_grad():
            out = self._replay(list(params.values()), eager)
        names, dims = self._names
        weights = dict(zip(dims, out[len(names) + 1:]))
        for name, w in weights.items():
            w._pyro_dims = dims[name]
        return dict(zip(names, out[:len(names)])), out[len(names)], weights


class _GuardFailed(Exception):
    """A value that Python read in the recorded run came out otherwise: run eagerly."""


def _record(inputs: Sequence[torch.Tensor], fn: Callable[[], Tensors]) -> Tuple[Tensors, Optional[Callable[..., Tensors]]]:
    """``fn()``'s results (under the caller's grad mode), and the program that computes them
    from ``inputs`` (``None`` where the run cannot be recorded; see the module docs)."""
    recorder = _Recorder(inputs)
    try:
        with warnings.catch_warnings(record=True) as caught, recorder:
            warnings.simplefilter("always")
            out = fn()
    finally:
        for w in caught:  # (a warning is a read no program repeats: not recorded)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, None if caught else recorder.compile(out)


class _Slot:
    """A recorded tensor: the ``index``-th value the program computes (inputs first)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Recorder(TorchDispatchMode):
    """Records the ATen operations that depend on ``inputs``; runs (and keeps the results of)
    the others as constants. It never changes what the run computes: where a run cannot be
    recorded it notes why (:attr:`failed`) and stops recording."""

    def __init__(self, inputs: Sequence[torch.Tensor]):
        super().__init__()
        self.slots: Dict[int, _Slot] = {}  # by id() of the recorded tensors alive
        self.refs: List[weakref.ref] = []  # by slot: each tensor's weak reference
        self.died: Dict[int, int] = {}  # slot -> steps recorded when its tensor was freed
        self.promoted: Dict[int, _Slot] = {}  # id of a constant buffer written by the program
        self.random: set = set()  # ids of random draws and what was computed from them
        self.keep: List[torch.Tensor] = []  # (promoted buffers and random draws keep their ids)
        # (operator, args, kwargs, output slots, changes an argument, guard: the bool it gave)
        self.steps: List[Tuple[Any, tuple, dict, List[_Slot], bool, Optional[bool]]] = []
        self.read: List[Tuple[torch.Tensor, int]] = []  # constants the steps read, with versions
        self.failed: Optional[str] = None
        self.inputs = [self._new_slot(t) for t in inputs]

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing here runs under torch.compile: spare the import of torch._dynamo (1 s)

    def _new_slot(self, t: torch.Tensor) -> _Slot:
        slot, key = _Slot(len(self.refs)), id(t)

        def freed(_, self=self):  # (the run drops it here: so will the program)
            self.died[slot.index] = len(self.steps)
            if self.slots.get(key) is slot:
                del self.slots[key]

        self.slots[key] = slot
        self.refs.append(weakref.ref(t, freed))
        return slot

    def _promote(self, t: torch.Tensor) -> None:
        """A constant (a buffer made by a factory, say) that a recorded operation writes into:
        the program makes its own copy of it, as it is now, and its views read that copy."""
        base = t if t._base is None else t._base
        if id(base) in self.slots or id(base) in self.promoted:
            return
        if not base.is_contiguous():
            self.failed = "a recorded operation writes into a constant that is not contiguous"
            return
        snapshot = base.clone()
        self.promoted[id(base)] = slot = self._new_slot(base)
        self.keep.append(base)
        self.steps.append((torch.ops.aten.clone.default, (snapshot,), {}, [slot], False, None))

    def _view(self, view: torch.Tensor, base: _Slot) -> _Slot:
        """``view`` of a promoted buffer, made from the program's copy of it."""
        offset = view.storage_offset() - (view if view._base is None else view._base).storage_offset()
        args = (base, tuple(view.shape), tuple(view.stride()), offset)
        slot = self._new_slot(view)
        self.steps.append((torch.ops.aten.as_strided.default, args, {}, [slot], False, None))
        return slot

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.failed is not None:
            return func(*args, **kwargs)
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if not any(id(a) in self.slots for a in flat):  # a constant
            out = func(*args, **kwargs)
            if torch.Tag.nondeterministic_seeded in func.tags or any(id(a) in self.random for a in flat):
                # A random draw (an unused init, pyro.param("locs", torch.randn(K))) and what is
                # computed from it: no program may read it, which would freeze the draw.
                for o in tree_flatten(out)[0]:
                    if not isinstance(o, torch.Tensor):
                        self.failed = f"{func} gives Python a number computed from a random draw"
                    else:
                        self.random.add(id(o))
                        self.keep.append(o)
            return out

        for i, arg in enumerate(func._schema.arguments):  # a constant buffer written here
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                self._promote(value)

        def template(value):  # (before the call: an operation that changes a constant is caught)
            if isinstance(value, torch.Tensor):
                if id(value) in self.slots:
                    return self.slots[id(value)]
                base = value if value._base is None else value._base
                if id(base) in self.promoted:  # a view of a buffer the program makes
                    return self._view(value, self.promoted[id(base)])
                if id(value) in self.random:
                    self.failed = f"{func} reads a random draw"
                self.read.append((value, value._version))
            elif isinstance(value, (list, tuple)):
                return type(value)(template(v) for v in value)
            return value

        step_args, step_kwargs = template(args), {k: template(v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        if isinstance(out, bool):  # Python branches on it: a guard
            self.steps.append((func, step_args, step_kwargs, [], False, out))
            return out
        outs = tree_flatten(out)[0]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            self.failed = f"{func} gives Python a number computed from the inputs"
            return out
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        call = func if writes else _binding(func, args, kwargs, outs)
        self.steps.append((call, step_args, step_kwargs, [self._new_slot(o) for o in outs], writes, None))
        return out

    def compile(self, results: Tensors) -> Optional[Callable[..., Tensors]]:
        """The recorded program: the inputs in, ``results`` out (``None`` where the run could
        not be recorded, or a float input reaches no result: a ``pyro.module`` network computes
        with its own tensors, not the store's)."""
        if self.failed is None and any(t._version != v for t, v in self.read):
            self.failed = "a constant changed after a recorded operation read it, or by one"
        if self.failed is not None or any(id(r) not in self.slots for r in results):
            return None
        floats = [slot for slot, t in zip(self.inputs, (r() for r in self.refs)) if t is not None and t.is_floating_point()]
        return _compile(self.steps, floats, self.inputs, [self.slots[id(r)] for r in results], self.died)


def _binding(func, args: tuple, kwargs: dict, outs: List[torch.Tensor]) -> Callable:
    """``func``'s Python binding (``torch.sum`` for ``aten.sum.dim_IntList``, ``Tensor.view``),
    which calls it with less overhead than the operator itself (0.3 to 1 us of 2 to 4), if it
    gives the same results on the recorded arguments; else ``func``."""
    name = func._schema.name.split("::")[-1]
    binding = getattr(torch, name, None) or getattr(torch.Tensor, name, None)
    if not callable(binding) or torch.Tag.nondeterministic_seeded in func.tags:
        return func  # (a random operation is not run twice: the draws would move on)
    try:
        alternative = tree_flatten(binding(*args, **kwargs))[0]
    except Exception:  # noqa: BLE001 (another signature)
        return func
    same = len(alternative) == len(outs) and all(
        isinstance(a, torch.Tensor) and a.shape == o.shape and a.stride() == o.stride() and a.dtype == o.dtype
        and a.device == o.device and (a.data_ptr() == o.data_ptr() or (a._base is None and torch.equal(a, o)))
        for a, o in zip(alternative, outs))
    return binding if same else func


def _compile(steps, floats: List[_Slot], inputs: List[_Slot], results: List[_Slot], died: Dict[int, int]) -> Optional[Callable[..., Tensors]]:
    """Python source for the steps that ``results`` need (and every guard and in-place step,
    whose effect may reach them through a view), compiled: one line per operation, constants
    and operators bound as globals, each value dropped where the recorded run dropped it
    (``died``: slot -> steps recorded by then), so memory is allocated and freed as there.
    ``None`` if an input among ``floats`` reaches no result."""
    def slots(value):
        if isinstance(value, _Slot):
            yield value.index
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from slots(v)

    needed, kept = {r.index for r in results}, []
    for position in range(len(steps) - 1, -1, -1):
        func, args, kwargs, outs, writes, guard = steps[position]
        if writes or guard is not None or any(o.index in needed for o in outs):
            kept.append((position, func, args, kwargs, outs, guard))
            needed.update(slots((args, list(kwargs.values()))))
    kept.reverse()
    if any(slot.index not in needed for slot in floats):
        return None
    # Drop a value after the last step kept before the recorded run dropped it, and not
    # before its last use; values the run kept to its end live to the program's.
    drop: Dict[int, List[int]] = {}
    last_use = {index: i for i, (_, _, args, kwargs, _, _) in enumerate(kept) for index in slots((args, list(kwargs.values())))}
    made = {o.index for step in kept for o in step[4]}
    for index, at in died.items():
        if index in made or index in last_use:
            before = [i for i, step in enumerate(kept) if step[0] < at]
            drop.setdefault(max(before[-1] if before else 0, last_use.get(index, 0)), []).append(index)
    final = {r.index for r in results}
    names: Dict[str, Any] = {"_flat": lambda out: tree_flatten(out)[0], "_GuardFailed": _GuardFailed}

    def source(value, key: str) -> str:
        if isinstance(value, _Slot):
            return f"v{value.index}"
        if isinstance(value, (list, tuple)) and any(True for _ in slots(value)):
            inner = ", ".join(source(v, f"{key}_{j}") for j, v in enumerate(value))
            return f"[{inner}]" if isinstance(value, list) else f"({inner},)"
        names[key] = value
        return key

    lines = [f"def program({', '.join(f'v{slot.index}' for slot in inputs)}):"]
    for i, (_, func, args, kwargs, outs, guard) in enumerate(kept):
        names[f"f{i}"] = getattr(func, "_op", func)
        call = f"f{i}(" + ", ".join([source(a, f"c{i}_{j}") for j, a in enumerate(args)]
                                    + [f"{k}={source(v, f'c{i}_{k}')}" for k, v in kwargs.items()]) + ")"
        targets = ", ".join(f"v{o.index}" for o in outs)
        if guard is not None:
            lines.append(f"    if {call} != {guard}: raise _GuardFailed")
        elif len(outs) == 1:
            lines.append(f"    {targets} = {call}")
        elif outs:
            lines.append(f"    {targets} = _flat({call})")
        else:
            lines.append(f"    {call}")
        dead = [f"v{index}" for index in drop.get(i, ()) if index not in final]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    lines.append(f"    return ({', '.join(f'v{r.index}' for r in results)},)")
    exec(compile("\n".join(lines), "<pyro_em.compiled>", "exec"), names)
    return names["program"]
