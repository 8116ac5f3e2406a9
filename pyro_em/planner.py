"""The planner: reads the model once per batch of data and decides how each step runs.

For each batch of model arguments it probes the plates (once), traces the model twice
without computing a log density (:func:`~pyro_em.closed_form.analysis_traces`), and makes a
:class:`PlannedBatch`: the M-step plan (:class:`~pyro_em.closed_form.MStepPlan`: each
param's closed-form rule and the solve order, or the gradient M-step and why), the E-step
backend (a recognized ``pyro.markov`` chain or plain mixture runs as one forward-backward
pass, :mod:`pyro_em.chain`; any other model is traced and contracted, :mod:`pyro_em.estep`),
and the batch's step programs (:mod:`pyro_em.program`), captured at a later step. Plans are
kept per batch (:class:`PlanCache`); across restarts the programs are kept too, so a restart
does not capture again.

Nothing here runs an iteration: :mod:`pyro_em.iteration` does, from the plans.
"""

import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import pyro
import pyro.poutine as poutine
import torch

from ._validation import check_observations, model_errors, structure, structure_change
from .chain import FusedChain, fuse_chain
from .closed_form import MStepPlan, analysis_traces, check_hard_em, note_obs_mask, plan_m_step
from .estep import EStep, e_step, enum_model, trace_model
from .interrupts import deferred
from .map_sites import MapMessenger
from .program import BatchQ, Program, StepProgram, SummaryProgram

_PROBE_DIMS = 16  # enumeration dims for the plate-nesting probe start this far left


@dataclass
class PlannedBatch:
    """A batch of model arguments with its plan: plans hold index maps that may depend on the
    data, so each batch has its own (see :class:`PlanCache`)."""

    args: tuple
    kwargs: Dict[str, Any]
    plan: MStepPlan
    chain: Optional[FusedChain]
    structure: Optional[tuple] = None  # of its first E-step's trace, which later ones must keep
    planned_structure: Optional[tuple] = None  # of the trace the plan was made from
    q: Optional[BatchQ] = None  # its piece of Q, once the gradient M-step asked for it
    step: Optional[StepProgram] = None  # its closed-form stage, once EM.step ran it
    summaries: Dict[tuple, SummaryProgram] = field(default_factory=dict)  # its share of each pass over batches
    shared: Optional[tuple] = None
    """Where it runs another batch's plan (:meth:`PlanCache.shared`), its shapes: its programs
    are then those of every batch of its shapes, with the data among their inputs."""

    @property
    def updates(self) -> MStepPlan:
        """The plan whose uses the closed-form rules read: the fused chain's, if any."""
        return self.chain.plan if self.chain is not None else self.plan

    @property
    def rows(self) -> int:
        """The batch's data points (see :func:`rows`)."""
        return rows(self.args, self.kwargs)

    @property
    def backend(self) -> str:
        """How its E-step runs, in words."""
        if self.chain is None:
            return "traced model, exact contraction"
        return "fused mixture, one pass" if self.chain.trans is None else "fused chain, forward-backward"


def rows(args: tuple, kwargs: dict) -> int:
    """The size of the first dim of the first tensor argument: a batch's data points."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


class PlanCache:
    """Plans keyed by the identity (and version) of their batch's arguments, kept while
    iterations use them: a plan no iteration used is dropped when the next one ends.

    A plan that holds nothing tied to the data (:attr:`MStepPlan.batch_free`) also serves
    batches of the same *signature*: tensors of the same shape past the first dim, dtype and
    device (small tensors, up to 16 elements, and plain values by value). So a DataLoader's
    batches, new tensors every time, are planned once, not at every pass.
    """

    def __init__(self):
        self._entries: Dict[tuple, PlannedBatch] = {}
        self._shared: Dict[tuple, MStepPlan] = {}
        self._used: set = set()

    def peek(self, key: tuple, arguments: Optional[list] = None) -> Optional[PlannedBatch]:
        """The plan kept under ``key`` (for these ``arguments``, if given), without marking it
        used."""
        planned = self._entries.get(key)
        if planned is None or arguments is not None and any(
                a is not b for a, b in zip((*planned.args, *planned.kwargs.values()), arguments)):
            return None
        return planned

    def get(self, key: tuple, arguments: list) -> Optional[PlannedBatch]:
        planned = self.peek(key, arguments)
        if planned is not None:
            self._used.add(key)
        return planned

    def shared(self, args: tuple, kwargs: dict) -> Optional[MStepPlan]:
        """A batch-free plan made for a batch of the same signature, if any."""
        return self._shared.get(_signature(args, kwargs))

    def put(self, key: Optional[tuple], planned: PlannedBatch) -> None:
        """Keep ``planned`` for its arguments (``key``; ``None``: only for its signature)."""
        if key is not None:
            self._entries[key] = planned
            self._used.add(key)
        if planned.plan.batch_free:  # (a fused chain holds its batch's data: not shared)
            self._shared[_signature(planned.args, planned.kwargs)] = planned.plan

    def entries(self) -> Dict[tuple, PlannedBatch]:
        """The plans kept, by key."""
        return dict(self._entries)

    def end_iteration(self) -> None:
        """Forget the plans the iteration that just ended did not use."""
        self._entries = {k: v for k, v in self._entries.items() if k in self._used}
        self._used = set()

    def clear(self) -> None:
        self._entries, self._shared, self._used = {}, {}, set()


def _signature(args: tuple, kwargs: dict) -> tuple:
    def sig(a):
        if isinstance(a, torch.Tensor):
            if a.numel() <= 16:
                return ("small", tuple(a.shape), str(a.dtype), str(a.device), tuple(a.reshape(-1).tolist()))
            return ("tensor", tuple(a.shape[1:]), str(a.dtype), str(a.device))
        if a is None or isinstance(a, (bool, int, float, str)):
            return ("value", a)
        return ("object", id(a))

    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in kwargs.items())


def _shapes(args: tuple, kwargs: dict) -> tuple:
    """A batch's signature with the full shape of each tensor (a graph's shapes are fixed)."""
    shapes = tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    return _signature(args, kwargs) + (shapes,)


def batch_tensors(pb: PlannedBatch) -> List[torch.Tensor]:
    """The tensors among a batch's model arguments."""
    return [a for a in (*pb.args, *pb.kwargs.values()) if isinstance(a, torch.Tensor)]


def args_key(args: tuple, kwargs: dict) -> tuple:
    """The identity (and version) of a batch's arguments, under which its plan is kept."""
    return tuple((id(a), getattr(a, "_version", None)) for a in args + tuple(kwargs.values())) + (tuple(kwargs),)


class Planner:
    """Reads a model and plans its batches (see the module docs).

    :param model: the Pyro model.
    :param map_sites: the :class:`~pyro_em.map_sites.MapMessenger` that holds its continuous
        latent sites as MAP values.
    :param m_step: ``"auto"``, ``"closed_form"`` or ``"gradient"`` (see :class:`~pyro_em.EM`).
    :param max_plate_nesting: the model's plate nesting, or ``None`` to probe it.
    :param temperature: ``1`` for EM, ``0`` for hard EM.
    :param jit: plan once and run captured programs (``False``: run the model at each step).
    :param compile: ``False``, ``True`` or a :func:`torch.compile` mode for the programs.
    :param subsample: plates may subsample (stepwise EM).
    """

    def __init__(self, model: Callable, map_sites: MapMessenger, m_step: str, max_plate_nesting: Optional[int],
                 temperature: int, jit: bool, compile, subsample: bool):
        self.map_sites, self.m_step, self.max_plate_nesting = map_sites, m_step, max_plate_nesting
        self.fitted_model = map_sites(model)
        self.temperature, self.jit, self.compile, self.subsample = temperature, jit, compile, subsample
        self.plans = PlanCache()
        # The programs of batches that run another batch's plan, by the batches' shapes.
        self._shared_summaries: Dict[tuple, Dict[tuple, SummaryProgram]] = {}
        self._shared_steps: Dict[tuple, StepProgram] = {}
        self.memo: dict = {}  # what one part of a step keeps for another (pyro_em.memo)
        self.plan: Optional[MStepPlan] = None  # the latest batch's
        self.latest: Optional[PlannedBatch] = None
        self._kept_programs: Dict[tuple, PlannedBatch] = {}  # across a restart, by key

    # -- reading the model ----------------------------------------------------------------

    def first_available_dim(self, args: tuple, kwargs: dict) -> int:
        """The first dim free for enumeration (the plates' nesting probed once)."""
        if self.max_plate_nesting is None:
            trace = self.probe_trace(args, kwargs)
            self.max_plate_nesting = max(
                [-f.dim for site in trace.nodes.values() if site["type"] == "sample"
                 for f in site["cond_indep_stack"] if f.vectorized],
                default=0,
            )
        return -self.max_plate_nesting - 1

    def probe_trace(self, args: tuple, kwargs: dict):
        """A trace that shows the model's plates, as cheap as a trace can be: latents are
        enumerated on dims far to the left (so ``locs[z]`` is K rows, not one per datum), with
        no autograd. A model that resists that is traced with sampled latents instead."""
        with poutine.block(), torch.no_grad(), model_errors(args, kwargs), pyro.validation_enabled(False):
            try:
                return poutine.trace(enum_model(self.fitted_model, -_PROBE_DIMS)).get_trace(*args, **kwargs)
            except (ValueError, RuntimeError, IndexError):
                return poutine.trace(self.fitted_model).get_trace(*args, **kwargs)

    def trace(self, args: tuple, kwargs: dict, record: bool = False):
        """The model's enumerated, packed trace with log densities (see
        :func:`~pyro_em.estep.trace_model`)."""
        return trace_model(self.fitted_model, args, kwargs, self.first_available_dim(args, kwargs),
                           subsample=self.subsample, record=record)

    def e_step(self, temperature: int, args: tuple, kwargs: dict) -> EStep:
        """The E-step at ``temperature``; params it creates are removed again if it fails."""
        with rollback_new_params():
            first_dim = self.first_available_dim(args, kwargs)
            return e_step(self.fitted_model, args, kwargs, first_dim, temperature, self.subsample)

    # -- plans ----------------------------------------------------------------------------

    def planned(self, args: tuple, kwargs: dict, cache: bool = True) -> PlannedBatch:
        """The plan of a batch of model arguments, made by tracing the model (cheap: no log
        density is computed) unless kept."""
        key = args_key(args, kwargs)
        arguments = [*args, *kwargs.values()]
        planned = self.plans.get(key, arguments)
        shared = self.plans.shared(args, kwargs) if planned is None else None
        if shared is not None:  # another batch's plan, tied to nothing in its data
            planned = PlannedBatch(args, kwargs, shared, None, shared=_shapes(args, kwargs))
            # (its programs take the data as inputs: they serve a DataLoader's new tensors)
            planned.summaries = self._shared_summaries.setdefault(planned.shared, {})
            planned.step = self._shared_steps.get(planned.shared)
            self.plans.put(key if cache else None, planned)
        elif planned is None:
            planned = self._plan(args, kwargs, arguments)
            kept = self._kept_programs.pop(key, None)
            if kept is not None and kept.planned_structure == planned.planned_structure and _same_division(kept.plan, planned.plan):
                # (a restart: same model, same data)
                planned.step, planned.q, planned.summaries = kept.step, kept.q, kept.summaries
                for held in (planned.step, planned.q, *planned.summaries.values()):
                    if held is not None:
                        held.program.recheck()
            self.plans.put(key if cache else None, planned)
        self.plan, self.latest = planned.plan, planned
        planned.plan.runs = self.describe
        return planned

    def _plan(self, args: tuple, kwargs: dict, arguments: list) -> PlannedBatch:
        first_dim = self.first_available_dim(args, kwargs)
        model, subsample, read = self.fitted_model, self.subsample, self.map_sites.read_unobserved
        tracked, scored = analysis_traces(model, args, kwargs, first_dim, subsample)
        if own_param_storage(tracked, arguments):  # (the trace held the user's tensor)
            tracked, scored = analysis_traces(model, args, kwargs, first_dim, subsample)
        check_observations(tracked)
        plan = plan_m_step(tracked, scored, self.m_step)
        if plan.read_unobserved - read:  # continuous latents after all
            read |= plan.read_unobserved
            tracked, scored = analysis_traces(model, args, kwargs, first_dim, subsample)
            plan = plan_m_step(tracked, scored, self.m_step)
        note_obs_mask(plan, tracked, read, self.map_sites.prefix)
        if self.temperature == 0:
            check_hard_em(tracked)
        chain = fuse_chain(tracked, scored, plan) if self.temperature == 1 and self.jit else None
        planned = PlannedBatch(args, kwargs, plan, chain, planned_structure=structure(tracked))
        del tracked, scored
        gc.collect(1)  # the analysis traces hold reference cycles: free them before the step
        return planned

    def step_program(self, pb: PlannedBatch, key: tuple) -> StepProgram:
        """The batch's closed-form stage program, new where a setting it reads (``key``) has
        changed."""
        key = key + (self.temperature,)
        if pb.step is None or pb.step.key != key:
            # (its E-step weights go to the gradient M-step's Q, under autograd, if any param takes it)
            pb.step = StepProgram(key, Program(self.compile, finite=False, enabled=self.jit, kind=_kind(pb),
                                               inference=not pb.plan.gradient))
            if pb.shared is not None:
                self._shared_steps[pb.shared] = pb.step
        return pb.step

    def summary_program(self, pb: PlannedBatch, key: tuple) -> SummaryProgram:
        """The batch's E-step and statistics in one pass over batches (``key``: the pass, the
        params it summarizes, and the settings it reads)."""
        key = key + (self.temperature, tuple(pb.plan.params))
        if key not in pb.summaries:
            pb.summaries[key] = SummaryProgram(Program(self.compile, finite=False, enabled=self.jit, kind=_kind(pb)))
        return pb.summaries[key]

    def batch_q(self, pb: PlannedBatch) -> BatchQ:
        """The batch's piece of ``Q``, made at its first use."""
        if pb.q is None:
            args, kwargs = pb.args, pb.kwargs
            free = [name for name in pb.plan.params if name not in pb.plan.closed_form]
            pb.q = BatchQ(lambda record=False: self.trace(args, kwargs, record), list(pb.plan.params), free,
                          Program(self.compile, enabled=self.jit))
        return pb.q

    def fused_chain_of(self, args: tuple, kwargs: dict) -> Optional[FusedChain]:
        """The fused chain of a batch planned and kept, with every param it reads in the
        store (an EM step on these arguments would run it), or ``None``."""
        planned = self.plans.peek(args_key(args, kwargs), [*args, *kwargs.values()])
        if planned is None or planned.chain is None:
            return None
        store = pyro.get_param_store()
        return planned.chain if all(name in store for name in planned.plan.params) else None

    def new_run(self) -> None:
        """Forget the plans, which hold the params' identity (a restart makes new params); keep
        their programs, which take the params as inputs, for the same batches planned alike."""
        self._kept_programs = {key: pb for key, pb in self.plans.entries().items() if pb.step or pb.q or pb.summaries}
        self.plans.clear()
        for held in [*self._shared_steps.values(), *(p for ps in self._shared_summaries.values() for p in ps.values())]:
            held.program.recheck()

    def check_structure_kept(self, args: tuple, kwargs: dict) -> None:
        """Run the model once more and raise if its sites, shapes or plates differ from those
        the batch was planned with (steps that do not run the model would not see it)."""
        planned = self.plans.peek(args_key(args, kwargs))
        if planned is None or planned.planned_structure is None:
            return
        with torch.no_grad():
            trace = trace_model(self.fitted_model, args, kwargs, self.first_available_dim(args, kwargs),
                                shapes_only=True, subsample=self.subsample)
        change = structure_change(planned.planned_structure, structure(trace))
        if change is not None:
            raise RuntimeError(
                f"The model's structure changed during the fit ({change}), while its steps ran "
                "the model as it was planned, without running the Python model again (a fused "
                "chain or a captured program). Make the structure independent of the params, or "
                "fit with EM(model, jit=False), which runs the model at every step (and raises at "
                "the step where it changes)."
            )

    def describe(self) -> str:
        """How the latest batch runs: its E-step backend and its programs."""
        pb = self.latest
        if pb is None:
            return ""
        lines = [f"E-step: {pb.backend}"]
        if pb.step is not None:
            lines.append(f"closed-form stage: {pb.step.program.status}")
        elif self.jit and not pb.summaries:
            lines.append("closed-form stage: Python (not captured yet)")
        passes: Dict[int, List[str]] = {}
        for key, held in pb.summaries.items():  # (key[0]: the pass)
            passes.setdefault(key[0], []).append(held.program.status)
        for number, statuses in sorted(passes.items()):
            lines.append(f"pass {number + 1} over batches, each batch: {', '.join(dict.fromkeys(statuses))}")
        if pb.q is not None:
            lines.append(f"Q for the gradient M-step: {pb.q.program.status}")
        return "\n".join(lines)


def _kind(pb: PlannedBatch) -> str:
    """What a run in Python of the batch's stage is (see :data:`~pyro_em.program.EAGER_COST_PER_OP`)."""
    if pb.chain is None:
        return "traced"
    return "mixture" if pb.chain.trans is None else "chain"


def _same_division(a: MStepPlan, b: MStepPlan) -> bool:
    return list(a.params) == list(b.params) and list(a.closed_form) == list(b.closed_form)


def own_param_storage(trace, arguments: list) -> bool:
    """Give every param of ``trace`` that shares memory with a tensor argument of the model
    (``pyro.param("locs", data[:2])``: Pyro keeps the view) a copy of its own, so that the
    M-step, which writes params in place, never writes into the user's data.

    :returns: whether any param was copied (its old tensor is no longer the store's)."""
    store = pyro.get_param_store()
    owned = {a.untyped_storage().data_ptr() for a in arguments if isinstance(a, torch.Tensor) and a.numel()}
    copied = False
    for name, site in trace.nodes.items():
        if site["type"] != "param" or name not in store:
            continue
        p = store._params[name]
        if p.numel() and p.untyped_storage().data_ptr() in owned:
            own = p.detach().clone().requires_grad_()
            store._params[name] = own
            store._param_to_name.pop(p, None)
            store._param_to_name[own] = name
            copied = True
    return copied


class rollback_new_params:
    """On an exception, remove params created inside the block from Pyro's param store."""

    def __enter__(self):
        self._names = set(pyro.get_param_store().keys())
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            with deferred():
                _remove_params(set(pyro.get_param_store().keys()) - self._names)
        return False


def _remove_params(names: set) -> None:
    """Remove ``names`` from Pyro's param store, also where an interrupt left one half
    written (in its values but not yet in its reverse map)."""
    store = pyro.get_param_store()
    for name in names:
        store._params.pop(name, None)
        store._constraints.pop(name, None)
    for p in [p for p, name in store._param_to_name.items() if name in names]:
        del store._param_to_name[p]
