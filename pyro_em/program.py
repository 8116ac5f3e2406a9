"""Step programs: a computation captured once as a ``torch.fx`` graph and run without Python.

A step of EM runs much Python around its tensor operations: the Pyro model (poutine handlers,
distribution objects), the plan, the rules. Where the same computation repeats with new
values often enough to repay it (:func:`repaid`: a capture costs hundreds of runs),
:class:`Program` captures it once with PyTorch's
:func:`~torch.fx.experimental.proxy_tensor.make_fx` (the ATen operations of one run, the
E-step's backward pass included) and later runs call the captured
:class:`~torch.fx.GraphModule`, or the graph compiled by :func:`torch.compile` on request.

What makes a captured graph run what the Python would have run:

* Operations that read only constants (the data, masks, enumerated values) are evaluated once,
  at capture, and enter the graph as constants (:func:`_fold_constants`).
* Python's reads of a boolean computed from the inputs (an ``if`` on ``(x > 0).all()``, a
  check) become *guards*: the graph returns each such boolean as a tensor, and a run whose
  guards differ from the captured run's is run again by the Python (which takes the other
  branch, or raises its error naming the site). Guards are read once, after the run: a step
  never waits on the device mid-way. Any other read (``float(x)`` of a computed number), a
  live random draw, or an operation that writes into an input leave the computation
  uncaptured; it keeps running in Python and :attr:`Program.status` says why.
* The first run of a captured graph is compared with the run it was captured from (the
  Python's, which gives that step's results; after a restart, with a Python run): they must
  agree to round-off (they run the same operations), else the Python keeps running.
* A non-finite result is computed again by the Python, so errors keep naming their site.

Which code runs never depends on timing.
"""

import contextlib
import operator
import re
import traceback
import types
import unittest.mock
import warnings
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import pyro
import torch
import torch.fx
from torch.fx.experimental import proxy_tensor
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary
from pyro.poutine.trace_struct import Trace

from . import memo
from .interrupts import deferred
from .estep import EStep, expected_log_joint

Tensors = Tuple[torch.Tensor, ...]

#: The runs a computation makes in Python before it may be captured (its first run plans, so
#: its tensors, a param's initial value say, may not be those of later runs).
CAPTURE_AFTER = 1

# When a capture is repaid, like a tiered JIT: from counts, never the clock. Costs are in eager
# operations (one tensor operation called from Python, 3-9 us on this project's CPU), the
# operations of a run in Python counted once (:class:`_Counter`); measured by
# ``benchmarks/bench_capture.py``.

#: ``make_fx``'s cost per operation of the run it captures (0.4-1 ms per graph operation).
CAPTURE_COST_PER_OP = 100
#: The imports of a process's first capture (sympy, ``torch._dynamo``: 1-2 s).
FIRST_CAPTURE_COST = 250_000
#: A run in Python, per operation it calls, by what runs (a lower bound, so that a capture
#: waits rather than comes early): 0.9-2.4 for a fused mixture, 1.1 for a traced
#: ``DiscreteHMM`` site and more where Pyro's handlers run per operation. A fused chain's
#: forward-backward spends nothing beyond its operations that a graph saves (its graph ran
#: 0-10% slower): ``None``, never captured.
EAGER_COST_PER_OP = {"chain": None, "mixture": 1.0, "traced": 1.0}
#: A capture waits until the runs so far have cost ``REPAY`` times what it costs, so that a fit
#: of any length takes at most ``1 + 1 / REPAY`` of its time without the capture (and less once
#: the graph's runs have repaid it).
REPAY = 10
#: Capture at the run after ``CAPTURE_AFTER`` whatever the cost: what the whole test suite
#: sets, so that every test model's graphs meet its reference (``compile=True`` does too).
CAPTURE_AT_ONCE = False

_captured_in_process = [False]  # (the first capture's imports are paid once per process)


class _Counter(TorchFunctionMode):
    """Counts the tensor operations one run calls from Python (a function mode: a dispatch
    mode would import ``torch._dynamo``, a second, at its first use)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def repaid(runs: int, ops: int, kind: str) -> bool:
    """Whether ``runs`` runs in Python of a computation of ``ops`` operations, of ``kind``
    (a key of :data:`EAGER_COST_PER_OP`), have cost :data:`REPAY` times its capture."""
    per_op = EAGER_COST_PER_OP[kind]
    if per_op is None:
        return False
    cost = ops * CAPTURE_COST_PER_OP + (0 if _captured_in_process[0] else FIRST_CAPTURE_COST)
    return runs * ops * per_op >= REPAY * cost


_BOOL_READS = {torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}


class CaptureError(RuntimeError):
    """The computation cannot be captured faithfully (see the module docs)."""


class Program:
    """A computation run in Python until it is captured, then by its graph.

    :param compile: ``False`` to run the captured :class:`~torch.fx.GraphModule`; ``True`` or a
        :func:`torch.compile` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``)
        to compile it.
    :param finite: a run of the graph whose results are not all finite runs again in Python
        (whose checks name the site).
    :param enabled: ``False`` to run Python always (``EM(model, jit=False)``).
    :param kind: what a run in Python is, a key of :data:`EAGER_COST_PER_OP`: the capture waits
        until it is repaid (:func:`repaid`, from the operations of the run after
        :data:`CAPTURE_AFTER`, counted once), or comes at that run where compiling was asked
        for or :data:`CAPTURE_AT_ONCE` is set.
    :param inference: run the graph under :func:`torch.inference_mode` (its results are never
        used by autograd): 15% less time per operation.
    """

    def __init__(self, compile: Union[bool, str] = False, finite: bool = True, enabled: bool = True,
                 kind: str = "traced", inference: bool = False):
        self.compile, self.finite, self.kind, self.inference = compile, finite, kind, inference
        self.eager_ops: Optional[int] = None  # operations of a run in Python, once counted
        self.graph: Optional[Callable[..., Tensors]] = None
        self.guards: Optional[torch.Tensor] = None  # each guard's value in the captured run
        self.ops = 0  # operations in the captured graph
        self.runs = 0  # in Python
        self.state = "eager" if enabled else "off"  # -> "unchecked" -> "captured", or "failed"
        self.reason = None if enabled else "jit=False"

    @property
    def status(self) -> str:
        """What runs: ``"captured graph (N ops)"``, ``"Python (reason)"``, or ``"Python"``
        before capture."""
        if self.state in ("unchecked", "captured"):
            return f"captured graph ({self.ops} ops{', compiled' if self.compile else ''})"
        if self.reason:
            return f"Python ({self.reason})"
        if EAGER_COST_PER_OP[self.kind] is None and not (self.compile or CAPTURE_AT_ONCE):
            return "Python (a fused chain: its graph would run no faster)"
        return "Python (not captured yet)"

    def recheck(self) -> None:
        """Compare the graph's next run with Python's again (its inputs are new tensors: a
        restart's params)."""
        if self.state == "captured":
            self.state = "unchecked"

    def __call__(self, inputs: Sequence[torch.Tensor], eager: Callable[[], Tensors],
                 capture: Optional[Tuple[Sequence[torch.Tensor], Callable[[], Tensors]]] = None) -> Tensors:
        """The results of ``eager()``, computed by the graph where there is one.

        :param inputs: the tensors the computation reads that change between runs (the graph's
            inputs, in order).
        :param capture: the inputs and function to capture, if not ``inputs`` and ``eager``
            (the tensors the function reads from where it finds them, the param store say).
        """
        reference = None
        if self.state == "eager" and self.runs >= CAPTURE_AFTER and self._due():
            try:
                with deferred():  # (an interrupt inside make_fx can abort the interpreter)
                    self.graph, self.guards, self.ops, reference = _capture(*(capture or (inputs, eager)), self.compile)
                self.state = "unchecked"
            except CaptureError as e:
                self.state, self.reason = "failed", str(e)
        if self.state not in ("unchecked", "captured"):
            self.runs += 1
            if self.state == "eager" and self.eager_ops is None and self.runs > CAPTURE_AFTER:
                with _Counter() as counter:
                    out = eager()
                self.eager_ops = counter.ops
                return out
            return eager()
        try:
            out = self._run(inputs)
        except Exception as e:  # noqa: BLE001 (inputs on another device, say: Python says why)
            self.state, self.reason, self.graph = "failed", f"the graph failed: {type(e).__name__}: {e}", None
            return eager()
        if out is None:
            return eager() if reference is None else reference
        if self.state == "unchecked":  # (compared with the captured run, or a Python one)
            reference = eager() if reference is None else reference
            if all(_agree(a, b) for a, b in zip(out, reference)):
                self.state = "captured"
            else:
                self.state, self.reason, self.graph = "failed", "the graph disagreed with Python", None
            return reference
        return out

    def _due(self) -> bool:
        """Whether to capture at this run (see :func:`repaid`)."""
        if self.compile or CAPTURE_AT_ONCE:
            return True
        return self.eager_ops is not None and repaid(self.runs, self.eager_ops, self.kind)

    def _run(self, inputs: Sequence[torch.Tensor]) -> Optional[Tensors]:
        """The graph's results, or ``None`` where a guard or finiteness says: run Python."""
        with torch.inference_mode(self.inference):
            out = self.graph(*inputs)
        n = len(out) - (0 if self.guards is None else 1)
        results = tuple(out[:n])
        checks = []
        if self.guards is not None:
            checks.append((out[n] == self.guards).all())
        if self.finite:
            checks += [torch.isfinite(t).all() for t in results if t.is_floating_point()]
        if checks and not bool(torch.stack(checks).all()):  # (the one read of a run)
            return None
        return results


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to round-off (the graph runs the Python run's operations)."""
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool((a == b).all())
    tol = 1e3 * torch.finfo(a.dtype).eps
    return bool(((a == b) | ((a - b).abs() <= tol * b.abs().clamp_min(1)) | (a.isnan() & b.isnan())).all())


class _Guards(TorchDispatchMode):
    """Inside a capture: follows which tensors are computed from the inputs; each read of a
    boolean computed from them becomes a guard (the boolean as a tensor, kept as an output of
    the graph); any other read of a value computed from them fails the capture. (Values read
    from constants, the data or a factory's tensor, are the same at every run.)"""

    def __init__(self, inputs: Sequence[torch.Tensor]):
        super().__init__()
        self.tensors: List[torch.Tensor] = []
        self.values: List[bool] = []
        self.dependent = WeakIdKeyDictionary({t: True for t in inputs})

    def _depends(self, t) -> bool:
        return isinstance(t, torch.Tensor) and (t in self.dependent or (t._base is not None and t._base in self.dependent))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = pytree.tree_leaves((args, kwargs))
        read = func in _BOOL_READS or func is torch.ops.aten._local_scalar_dense.default
        if not any(self._depends(a) for a in flat):
            if read:  # (a constant's value: the same at every run)
                with proxy_tensor.disable_proxy_modes_tracing():
                    return func(*args, **kwargs)
            return func(*args, **kwargs)
        if read:
            return self._guard(func, args, kwargs)
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.dependent[t] = True
        for i, arg in enumerate(func._schema.arguments):  # (a buffer written from the inputs)
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                self.dependent[value if value._base is None else value._base] = True
        return out

    def _guard(self, func, args, kwargs):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].dtype is not torch.bool:
            raise CaptureError(f"Python reads a number computed from the inputs, {_where()}")
        if func is torch.ops.aten.equal.default:
            a, b = args
            flag = (a == b).all() if a.shape == b.shape else torch.zeros((), dtype=torch.bool, device=a.device)
        else:
            flag = (args[0] != 0).reshape(())
        with proxy_tensor.disable_proxy_modes_tracing():
            value = func(*args, **kwargs)
        self.tensors.append(flag)
        self.values.append(bool(value))
        return value


@contextlib.contextmanager
def _without_metadata() -> Iterator[None]:
    """make_fx without the fake-tensor metadata it gives every node (40% of its time): nothing
    here reads it, and torch.compile traces the graph module's code afresh."""
    if not hasattr(proxy_tensor, "set_meta"):  # (another torch: capture as it is)
        yield
        return
    with unittest.mock.patch.object(proxy_tensor, "set_meta", lambda proxy, value: proxy):
        yield


def _where() -> str:
    """Where the Python running a capture is: its innermost line outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"at {frame.filename}:{frame.lineno} ({frame.line})"
    return "somewhere"


class _Captured(NamedTuple):
    graph: Callable[..., Tensors]
    guards: Optional[torch.Tensor]  # each guard's value in the captured run
    ops: int  # operations in the graph
    results: Tensors  # of the captured run (which ran fn, as Python does)


def _capture(inputs: Sequence[torch.Tensor], fn: Callable[[], Tensors], compile: Union[bool, str]) -> _Captured:
    """The graph of ``fn()`` from ``inputs`` (which ``fn`` reads where it finds them).

    :raises CaptureError: where the graph would not compute what ``fn`` computes."""
    guards: List[_Guards] = []
    results: List[Tensors] = []

    def traced(*tracked):
        with _Guards(tracked) as g, memo.scope({}):  # (nothing computed before is a constant)
            out = fn()
        guards.append(g)
        results.append(tuple(out))
        flags = [torch.stack(g.tensors)] if g.tensors else []
        return (*out, *flags)

    try:
        with _without_metadata():
            gm = proxy_tensor.make_fx(traced, tracing_mode="real")(*inputs)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 (make_fx's own refusal of a read, say)
        raise CaptureError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    g = guards[-1]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = next(n for n in gm.graph.nodes if n.op == "output")
    used = set()
    for node in reversed(list(gm.graph.nodes)):  # (what the results need)
        if node is outputs or node in used:
            used.update(node.all_input_nodes)
        if node.op == "call_function" and _writes(node):
            used.add(node)
            used.update(node.all_input_nodes)
    for node in gm.graph.nodes:
        if node in used and node.op == "call_function" and _random(node):
            raise CaptureError(f"a result depends on a random draw ({node.target})")
        if node.op == "call_function" and _writes(node) and any(_base(a) in placeholders for a in _written(node)):
            raise CaptureError(f"an operation writes into an input ({node.target})")
    _fold_constants(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    if compile:
        graph = _compiled(torch.compile(gm, mode=None if compile is True else compile, dynamic=False))
    else:
        graph = _bound_forward(gm)
    flags = torch.tensor(g.values, device=inputs[0].device if inputs else None) if g.values else None
    _captured_in_process[0] = True
    return _Captured(graph, flags, ops, results[-1])


_CALL = re.compile(r"torch\.ops\.(\w+)\.(\w+)\.(\w+)\(")


def _bound_forward(gm: torch.fx.GraphModule) -> Callable[..., Tensors]:
    """The graph module's code with each operator called through its C++ entry point
    (``OpOverload._op``) rather than ``torch.ops.ns.name.overload``, an attribute chain and a
    Python ``__call__`` per operation: a quarter less time per operation, which is most of a
    small problem's step."""
    code = gm.graph.python_code(root_module="self")
    names = dict(code.globals)

    def bind(match) -> str:
        namespace, name, overload = match.groups()
        key = f"_op_{namespace}_{name}_{overload}"
        names[key] = getattr(getattr(getattr(torch.ops, namespace), name), overload)._op
        return key + "("

    exec(compile(_CALL.sub(bind, code.src), "<pyro_em.program>", "exec"), names)
    return types.MethodType(names["forward"], gm)


def _compiled(fn: Callable[..., Tensors]) -> Callable[..., Tensors]:
    """``fn`` (a graph compiled by torch.compile, lazily at its first run) without the
    deprecation notices inductor's own code gives at compilation."""
    def run(*inputs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
            return fn(*inputs)

    return run


def _schema(node: torch.fx.Node):
    return getattr(node.target, "_schema", None)


def _writes(node: torch.fx.Node) -> bool:
    schema = _schema(node)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _written(node: torch.fx.Node) -> List[torch.fx.Node]:
    schema = _schema(node)
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(value, torch.fx.Node):
                out.append(value)
    return out


def _views(node: torch.fx.Node) -> bool:
    """``node``'s result aliases its first argument (a view)."""
    schema = _schema(node)
    return (schema is not None and bool(schema.returns) and schema.returns[0].alias_info is not None
            and not schema.returns[0].alias_info.is_write and bool(node.args) and isinstance(node.args[0], torch.fx.Node))


def _base(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and _views(node):
        node = node.args[0]
    return node


def _random(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def _fold_constants(gm: torch.fx.GraphModule) -> None:
    """Evaluate once the operations that read no input (nor a buffer an operation writes
    into, nor a random draw) and put their results in the graph as constants."""
    written = {_base(a) for n in gm.graph.nodes if n.op == "call_function" and _writes(n) for a in _written(n)}
    constant, values = {}, {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant[node] = node not in written
            if constant[node]:
                values[node] = getattr(gm, node.target)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            constant[node] = (not _writes(node) and not _random(node) and _base(node) not in written
                              and node not in written and all(constant.get(a, False) for a in node.all_input_nodes))
            if constant[node]:
                args = torch.fx.node.map_arg(node.args, values.__getitem__)
                kwargs = torch.fx.node.map_arg(node.kwargs, values.__getitem__)
                values[node] = node.target(*args, **kwargs)
        elif node.op == "call_function" and node.target is operator.getitem:
            constant[node] = constant.get(node.args[0], False)
            if constant[node]:
                values[node] = values[node.args[0]][node.args[1]]
        else:
            constant[node] = False
    count = 0
    for node in list(gm.graph.nodes):
        if not constant.get(node) or node.op == "get_attr":
            continue
        if not any(not constant.get(user, False) for user in node.users):
            continue  # (only constants read it: those that are read are folded themselves)
        value = values[node]
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_folded{count}"
        count += 1
        gm.register_buffer(name, value)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        node.replace_all_uses_with(attr)


class BatchQ:
    """``Q`` of one batch of data at the param store's current values, from a captured graph
    once there is one (the gradient M-step evaluates it several times a step).

    :param trace: runs the model on the batch at the current params and returns the packed
        trace (:func:`~pyro_em.estep.trace_model`); called with ``record=True`` for the run that
        is captured.
    :param names: the params the model reads from Pyro's param store (the graph's inputs).
    :param free: those among ``names`` that the gradient M-step moves: the others enter the
        graph detached, so that autograd records nothing for them.
    :param program: the :class:`Program` that runs it.
    """

    def __init__(self, trace: Callable[..., Trace], names: List[str], free: List[str], program: Program):
        self._trace, self.names, self._free = trace, list(names), set(free)
        self.program = program
        self._weights: Optional[list] = None  # names and shapes captured

    def __call__(self, estep: EStep) -> torch.Tensor:
        """``Q`` at the current params under ``estep``'s weights (differentiable in the params)."""
        store = pyro.get_param_store()
        weights = [(name, w.shape) for name, w in estep.weights.items()]
        if self._weights is not None and weights != self._weights and self.program.state != "off":
            self.program.state, self.program.reason = "failed", "the model's structure changed"
        self._weights = weights
        inputs = [store._params[name] if name in self._free else store._params[name].detach() for name in self.names]
        inputs += list(estep.weights.values())
        # The capture reads the store's own tensors, which pyro.module's networks use too.
        captured = [store._params[name] for name in self.names] + list(estep.weights.values())

        def capture() -> Tensors:
            # Under Pyro's validation setting: its argument checks become guards, so a point a
            # distribution rejects runs in Python and raises there, never a garbage Q.
            return (expected_log_joint(estep, self._trace(record=True)),)

        return self.program(inputs, lambda: (self.eager(estep),), (captured, capture))[0]

    def eager(self, estep: EStep) -> torch.Tensor:
        """``Q`` by running the model."""
        return expected_log_joint(estep, self._trace())


class StepProgram:
    """The closed-form stage of an EM step on one batch (E-step, statistics, solves), from a
    captured graph once there is one: the params' unconstrained values and ``extra`` inputs in
    (a batch's data where the graph serves every batch of its shapes, stepwise EM's running
    statistics), the params' new (constrained) values, the log marginal likelihood, the
    E-step's weights and ``extra`` outputs (the new running statistics) out.

    :param key: settings the stage reads besides its inputs (``reg_covar``, ``temperature``,
        the forward-backward algorithm): a change captures it again.
    :param program: the :class:`Program` that runs it.
    """

    def __init__(self, key: tuple, program: Program):
        self.key, self.program, self._names = key, program, None

    def __call__(self, params: Dict[str, torch.Tensor], stage: Callable[[], tuple], extra: Sequence[torch.Tensor] = ()):
        """``stage()``'s ``(new values, log Z, E-step weights, extra outputs)`` (the weights as
        packed tensors, for the gradient M-step's ``Q``; none for a fused chain)."""
        def eager() -> Tensors:
            new, log_z, weights, more = stage()
            if self._names is None:
                self._names = list(new), {name: w._pyro_dims for name, w in weights.items()}
            return (*[new[name] for name in self._names[0]], log_z, *[weights[name] for name in self._names[1]], *more)

        with torch.no_grad():
            out = self.program([*params.values(), *extra], eager)
        names, dims = self._names
        n = len(names) + 1 + len(dims)
        weights = dict(zip(dims, out[len(names) + 1:n]))
        for name, w in weights.items():
            w._pyro_dims = dims[name]
        return dict(zip(names, out[:len(names)])), out[len(names)], weights, out[n:]


class SummaryProgram:
    """One batch's share of a pass over batches (its E-step and the statistics of the params
    solved in that pass), from a captured graph once there is one: the params' unconstrained
    values and the values solved earlier in the step in, the statistics and ``log Z`` out.
    The solvers (Python objects: a rule and its settings) come from its latest run in Python.

    :param program: the :class:`Program` that runs it.
    """

    def __init__(self, program: Program):
        self.program, self._layout, self.solvers = program, None, None

    def __call__(self, inputs: Sequence[torch.Tensor], run: Callable[[], tuple]):
        """``run()``'s ``(statistics, solvers, log Z)``."""
        def eager() -> Tensors:
            stats, self.solvers, log_z = run()
            if self._layout is None:
                self._layout = [(name, sorted(own)) for name, own in stats.items()]
            # (detached: a MAP site's prior term, taken out of a batch's log Z, carries autograd)
            return (*[stats[name][k].detach() for name, keys in self._layout for k in keys], log_z.detach())

        with torch.no_grad():
            out = self.program(list(inputs), eager)
        stats, i = {}, 0
        for name, keys in self._layout:
            stats[name] = dict(zip(keys, out[i:i + len(keys)]))
            i += len(keys)
        return stats, self.solvers, out[-1]
