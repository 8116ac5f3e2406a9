"""One EM iteration over batches of data.

Every batch's E-step runs at the same params, ``theta_old``. The closed-form params' sufficient
statistics add up over the batches (and over the processes of a ``torch.distributed`` group,
see :mod:`pyro_em.distributed`) before each is solved, so the result is the M-step of the
concatenated data. A rule that needs a param solved earlier in the same M-step (a scale needs
its new mean) starts another pass over the batches, whose E-steps again run at
``theta_old``. The params without a closed form then maximize ``Q``, a sum of one piece per
batch (:class:`~pyro_em.gradient.Objective`). One batch (:meth:`EM.step`,
:meth:`OnlineEM.step`) keeps its E-step between passes, in one step program; several
(:meth:`EM.step_batches`) recompute theirs, so memory holds one batch, and so does a captured
data-parallel step (each pass is a program of its own).

Terms that belong to no batch, the log prior densities of MAP-estimated sites (whose values,
like params, are shared by all batches), are counted once: with the first batch of rank 0.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import pyro
import torch

from . import distributed, memo
from .interrupts import deferred
from ._validation import MAP_FLAG, check_params_finite, check_same_structure, structure, unrepresentable
from .chain import SITE
from .closed_form import MStepPlan, Solver, estep_parts, solve, summarize, write
from .estep import EStep, enum_symbols
from .gradient import GradientMStep, Objective
from .hmm import algorithm, hmm_log_prob
from .map_sites import check_map_bounded
from .planner import PlannedBatch, Planner, batch_tensors, rollback_new_params

Batch = Tuple[tuple, Dict[str, Any]]
Stats = Dict[str, Dict[str, torch.Tensor]]


@dataclass
class Settings:
    """What a step reads besides the plan: the driver's options at the time of the step."""

    reg_covar: float
    gradient: GradientMStep
    map_prefix: str
    hmm_algorithm: Optional[str] = None

    @property
    def key(self) -> tuple:
        """The settings a captured closed-form stage holds as numbers."""
        return (self.reg_covar, self.hmm_algorithm)


@dataclass
class Online:
    """Stepwise EM's running statistics and the weight of the next batch's (see
    :class:`~pyro_em.OnlineEM`)."""

    stats: Stats = field(default_factory=dict)
    step_size: float = 1.0
    _g: Optional[torch.Tensor] = None  # step_size, as a step program's input
    _layouts: Dict[tuple, list] = field(default_factory=dict)  # state() -> the running stats after

    def blend(self, stats: Stats) -> Stats:
        """Blend one batch's statistics into the running ones, ``(1 - step_size) running +
        step_size stats`` (the batch's alone at the first step, or with ``step_size >= 1``).

        :returns: the running statistics of the params in ``stats``.
        """
        for name, own in stats.items():
            running = self.stats.get(name)
            if running is None or self.step_size >= 1:
                self.stats[name] = dict(own)
            else:
                g = self.step_size if self._g is None else self._g
                self.stats[name] = {k: (1 - g) * running[k] + g * s for k, s in own.items()}
        return {name: self.stats[name] for name in stats}

    # A step program takes the running statistics and the step size in and gives the blended
    # statistics out: state() keys it, inputs() and outputs() flatten, take() reads them back.

    def state(self) -> tuple:
        return self.step_size >= 1, tuple((name, tuple(sorted(own))) for name, own in self.stats.items())

    def inputs(self, device: torch.device) -> List[torch.Tensor]:
        self._g = torch.tensor(self.step_size, dtype=torch.float64, device=device)
        return [self._g, *(self.stats[name][k] for name, keys in self.state()[1] for k in keys)]

    def outputs(self, state: tuple) -> List[torch.Tensor]:
        self._layouts[state] = layout = self.state()[1]
        return [self.stats[name][k] for name, keys in layout for k in keys]

    def take(self, state: tuple, out: Sequence[torch.Tensor]) -> None:
        flat = iter(out)
        self.stats = {name: {k: next(flat) for k in keys} for name, keys in self._layouts[state]}


def run(planner: Planner, settings: Settings, batches: Iterable[Batch], keep: bool, online: Optional[Online] = None,
        cache: bool = True) -> Tuple[float, int, List[str]]:
    """One EM iteration over ``batches`` (see the module docs), updating Pyro's param store all
    or nothing.

    :param keep: keep each batch's E-step between passes (one batch: :meth:`EM.step`).
    :param online: stepwise EM: blend the statistics into ``online``'s and solve those.
    :param cache: keep the batches' plans for the next iterations (for batches that are the
        same tensors every time: a list, not a DataLoader, whose batches are new tensors).
    :returns: ``(loss, rows, stalled)``: the loss at the params before the update, summed over
        the batches and processes, the data points (:attr:`PlannedBatch.rows`) of this
        process, and the params the gradient M-step could not move (see
        :class:`~pyro_em.MStepWarning`).
    """
    store = pyro.get_param_store()
    if planner.plan is not None and any(n not in store for n in planner.plan.params):
        planner.plans.clear()  # the param store was cleared: plan afresh
    with rollback_new_params(), algorithm(settings.hmm_algorithm), memo.scope(planner.memo):
        iterator = iter(batches)
        planned, error = None, None
        try:
            planned = _plan_first(planner, iterator, online, cache)
        except Exception as e:  # noqa: BLE001 (raised below, once every process knows)
            error = e
        distributed.check(error)
        distributed.broadcast_params(planned.plan.params)
        params = {name: store._params[name] for name in planned.plan.params}  # (unconstrained leaves)
        with _transaction(params):
            result = _Iteration(planner, settings, planned, iterator, batches, params, keep, online, cache).run()
        distributed.broadcast_params(planned.plan.params)
    planner.plans.end_iteration()
    return result


def closed_form_stage(planner: Planner, settings: Settings, planned: PlannedBatch,
                      params: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The closed-form stage of a step on one batch, all of the data (its E-step, statistics
    and solves), without writing the store: the new values and ``log Z``."""
    iteration = _Iteration(planner, settings, planned, iter(()), [(planned.args, planned.kwargs)], params,
                           keep=True, online=None, cache=True)
    return iteration.closed_form()


def _plan_first(planner: Planner, iterator: Iterator[Batch], online: Optional[Online], cache: bool) -> PlannedBatch:
    first = next(iterator, None)
    if first is None:
        raise ValueError("batches is empty: give every process at least one batch of model arguments.")
    planned = planner.planned(*first, cache=cache)
    if not planned.plan.params:
        raise ValueError(
            "The model has no pyro.param and no continuous latent site to estimate: "
            "there is nothing for EM to fit."
        )
    if online is not None and planned.plan.gradient:
        name, why = next(iter(planned.plan.gradient.items()))
        raise ValueError(
            f"Online EM updates params from running sufficient statistics, but param '{name}' "
            f"has no closed-form update ({why}). Use step_batches/fit_batches (exact EM over "
            "all batches) or SVI for this model."
        )
    return planned


class _Iteration:
    def __init__(self, planner, settings, planned, iterator, batches, params, keep, online, cache):
        self.planner, self.settings = planner, settings
        self.plan, self.params, self.keep, self.online = planned.plan, params, keep, online
        self.cache, self.first = cache, planned
        self.old = {name: p.detach().clone() for name, p in params.items()}
        self._iterator, self._batches = iterator, batches
        self._kept: List[tuple] = []
        self._rank = distributed.rank()
        self.rows = planned.rows  # (recounted over the batches by closed_form)

    def planned(self, again: bool) -> Iterator[PlannedBatch]:
        """The batches with their plans: the first time from the iterator already begun."""
        if not again:
            yield self.first
            for args, kwargs in self._iterator:
                yield _same_plan(self.plan, self.planner.planned(args, kwargs, cache=self.cache))
            return
        empty = True
        for args, kwargs in self._batches:
            empty = False
            yield _same_plan(self.plan, self.planner.planned(args, kwargs, cache=self.cache))
        if empty:
            raise ValueError(
                "batches gave no batch the second time through: an EM step passes over the "
                "batches more than once, so give a re-iterable (a list, a DataLoader), not a "
                "generator or iterator."
            )

    def weighted(self, again: bool) -> Iterator[tuple]:
        """Each batch's ``(planned, parts, log_z, estep)`` at theta_old."""
        if again and self.keep:
            yield from self._kept
            return
        for i, pb in enumerate(self.planned(again)):  # the store holds theta_old until write()
            item = (pb, *_e_step(self.planner, pb, drop_global=i > 0 or self._rank > 0))
            if self.keep:
                self._kept.append(item)
            yield item

    def run(self) -> Tuple[float, int, List[str]]:
        planner, plan = self.planner, self.plan
        rest = {name: p for name, p in self.params.items() if name not in plan.closed_form}
        map_rest = any(name.startswith(self.settings.map_prefix + ".") for name in rest)  # (reads the trace)
        single = self.keep and not distributed.active()  # one batch: EM.step, OnlineEM.step
        if not single or map_rest or not planner.jit:
            new, log_z = self.closed_form(captured=planner.jit and not single)
        else:  # one batch: the closed-form stage may be replayed, the E-step's weights with it
            online, state = self.online, self.online.state() if self.online is not None else None

            def stage():
                new, log_z = self.closed_form()
                estep = self._kept[0][3] if rest else None
                return new, log_z, (estep.weights if estep is not None else {}), (online.outputs(state) if online else [])

            extra = batch_tensors(self.first) if self.first.shared else []  # (else constants of the graph)
            if online is not None:
                extra += online.inputs(next(iter(self.params.values())).device)
            program = planner.step_program(self.first, self.settings.key + (state,))
            try:
                new, log_z, weights, more = program(self.params, stage, extra)
            finally:
                if online is not None:
                    online._g = None
            if online is not None:
                online.take(state, more)
            if rest:
                self._kept = [(self.first, None, log_z, EStep(log_z, None, weights, None))]
        loss = float(log_z)
        write(new)
        stalled = self.gradient_m_step(rest) if rest else []
        return -loss, self.rows, stalled

    def closed_form(self, captured: bool = False) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """The closed-form params' new values, stage by stage over the batches, and the log
        marginal likelihood summed over the batches and processes (a 0-dim tensor). Sets
        :attr:`rows`, the data points of this process.

        :param captured: run each batch's E-step and statistics in each pass as its summary
            program (:meth:`Planner.summary_program`), else in Python, keeping the E-steps
            between passes if :attr:`keep`."""
        new: Dict[str, torch.Tensor] = {}
        loss, self._kept, self.rows = None, [], 0
        for passes, names in enumerate(self.first.updates.passes or [[]]):
            again, stats, solvers, error = passes > 0, {}, {}, None
            try:
                items = self.weighted(again) if self.keep and not captured else ((pb, None, None, None) for pb in self.planned(again))
                for i, (pb, parts, log_z, _) in enumerate(items):
                    drop = i > 0 or self._rank > 0
                    if captured:
                        own, own_solvers, log_z = self._captured_summary(pb, passes, drop, names, new)
                    else:
                        if parts is None:
                            parts, log_z, _ = _e_step(self.planner, pb, drop)
                        own, own_solvers = summarize(pb.updates, names, parts, new, self.settings.reg_covar)
                    if not again:
                        loss, self.rows = log_z if loss is None else loss + log_z, self.rows + pb.rows
                    for name in names:
                        solvers.setdefault(name, own_solvers[name])
                        stats[name] = _add(stats.get(name), own[name])
            except Exception as e:  # noqa: BLE001 (raised below, once every process knows)
                error = e
            distributed.check(error)
            if not again:
                loss = distributed.all_reduce(loss.reshape(1))[0]
            stage = _all_reduce_stats(stats)
            if self.online is not None:
                stage = self.online.blend(stage)
            for name, s in stage.items():
                new[name] = solve(name, s, solvers[name])
        return new, loss

    def _captured_summary(self, pb: PlannedBatch, passes: int, drop: bool, names: List[str],
                          new: Dict[str, torch.Tensor]) -> Tuple[Stats, Dict[str, Solver], torch.Tensor]:
        """A batch's E-step, statistics of ``names`` in pass ``passes`` and their solvers, from
        the batch's captured program once there is one: the params and the values solved so
        far in, the statistics and ``log Z`` out. (A solver reads only its rule and settings,
        the same at every step: those of the program's Python run serve.)"""
        def run() -> Tuple[Stats, Dict[str, Solver], torch.Tensor]:
            parts, log_z, _ = _e_step(self.planner, pb, drop)
            stats, solvers = summarize(pb.updates, names, parts, new, self.settings.reg_covar)
            return stats, solvers, log_z

        program = self.planner.summary_program(pb, (passes, drop, tuple(names), tuple(new)) + self.settings.key)
        data = batch_tensors(pb) if pb.shared else []  # (else constants of the graph)
        return program([*self.params.values(), *new.values(), *data], run)

    def gradient_m_step(self, rest: Dict[str, torch.Tensor]) -> List[str]:
        """Maximize ``Q`` over the params without a closed form, one piece per batch."""
        prefix = self.settings.map_prefix
        stalled = self.settings.gradient(Objective(_Pieces(self), list(rest.values())), rest)
        if any(name.startswith(prefix + ".") for name in rest):
            if self._kept:  # the kept E-step's trace holds the MAP sites' priors
                trace = self._kept[0][3].trace
            else:
                first = next(self.planned(True))
                trace = self.planner.probe_trace(first.args, first.kwargs)
            check_map_bounded(trace, rest, prefix)
        return stalled


class _Pieces:
    """The pieces of ``Q``, re-iterable: a kept E-step's, or one recomputed per batch."""

    def __init__(self, iteration: _Iteration):
        self.it = iteration

    def __iter__(self) -> Iterator[Callable[[], torch.Tensor]]:
        it, planner = self.it, self.it.planner
        if it._kept:
            for pb, _, _, estep in it._kept:
                yield lambda q=planner.batch_q(pb), estep=estep: q(estep)
            return
        for i, pb in enumerate(it.planned(True)):
            def piece(pb=pb, drop=i > 0 or it._rank > 0):
                with _values(it.params, it.old):
                    estep = _e_step(planner, pb, drop)[2]
                return planner.batch_q(pb)(estep)

            yield piece


def _e_step(planner: Planner, pb: PlannedBatch, drop_global: bool) -> Tuple[Callable, torch.Tensor, Optional[EStep]]:
    """A batch's weighted sites (``parts``), ``log Z`` and E-step, at the current params."""
    if pb.chain is not None:  # a fused chain: one forward-backward pass, no trace
        fn = pb.chain.distribution()
        prior_parts, log_prior = pb.chain.prior_parts(counted=not drop_global)
        cause = None
        try:
            log_z = hmm_log_prob(fn, pb.chain.values).sum() + log_prior
        except (ValueError, RuntimeError, IndexError) as e:  # a value outside the support, say
            log_z, cause = None, e
        if log_z is None or not torch.isfinite(log_z):
            planner.e_step(planner.temperature, pb.args, pb.kwargs)  # its error names site and datum
            raise ValueError(
                "The log marginal likelihood is "
                + (f"{float(log_z)}" if log_z is not None else f"undefined ({type(cause).__name__}: {cause})")
                + " at the current parameters: no state path explains the observations (or a "
                "parameter is degenerate)."
            ) from cause
        weight = torch.ones(pb.chain.values.shape[0], dtype=log_z.dtype, device=log_z.device)
        parts = {SITE: pb.chain.parts(fn, weight), **prior_parts}
        return parts.__getitem__, log_z, None
    estep = planner.e_step(planner.temperature, pb.args, pb.kwargs)
    shape = structure(estep.trace)
    if pb.structure is None:
        pb.structure = shape
    check_same_structure(pb.structure, shape)
    if drop_global:
        estep = _without_global_terms(estep)
    return estep_parts(estep), estep.log_z, estep


def _without_global_terms(estep: EStep) -> EStep:
    """``estep`` without the log prior densities of MAP sites (counted once, elsewhere)."""
    enumerated = enum_symbols(estep.trace)
    weights, log_z = dict(estep.weights), estep.log_z
    for name, site in estep.trace.nodes.items():
        if site["type"] != "sample" or not site["infer"].get(MAP_FLAG):
            continue
        if not enumerated.isdisjoint(site["packed"]["unscaled_log_prob"]._pyro_dims):
            raise ValueError(
                f"The prior of MAP site '{name}' depends on an enumerated latent: its term "
                "cannot be split among batches. Fit this model with EM.step on all of the data."
            )
        log_z = log_z - site["log_prob"].sum().to(log_z.dtype)
        weights[name] = torch.zeros_like(weights[name])
        weights[name]._pyro_dims = estep.weights[name]._pyro_dims
    return EStep(log_z, estep.trace, weights, estep.scale)


def _same_plan(plan: MStepPlan, planned: PlannedBatch) -> PlannedBatch:
    """``planned``, checked to update the params the same way as the first batch's plan."""
    for name in set(plan.params) | set(planned.plan.params):
        how = ["closed form" if name in p.closed_form else "gradient" if name in p.gradient else "absent"
               for p in (plan, planned.plan)]
        if how[0] != how[1]:
            raise ValueError(
                f"Param '{name}' is updated by {how[0]} with the first batch but by {how[1]} with "
                "another: every batch must use the params the same way (the model's structure "
                "must not depend on the data in a batch)."
            )
    return planned


def _add(total: Optional[Dict[str, torch.Tensor]], own: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return dict(own) if total is None else {k: total[k] + v for k, v in own.items()}


def _all_reduce_stats(stats: Stats) -> Stats:
    """The statistics summed over the processes of a torch.distributed group (one message)."""
    if not distributed.active() or not stats:
        return stats
    keys = [(name, k) for name in stats for k in sorted(stats[name])]
    tensors = [stats[name][k] for name, k in keys]
    dtype = tensors[0].dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = distributed.all_reduce(torch.cat([t.reshape(-1).to(dtype) for t in tensors]))
    out: Stats = {name: {} for name in stats}
    for (name, k), t, part in zip(keys, tensors, flat.split([t.numel() for t in tensors])):
        out[name][k] = part.reshape(t.shape).to(t.dtype)
    return out


@contextmanager
def _values(params: Dict[str, torch.Tensor], values: Dict[str, torch.Tensor]) -> Iterator[None]:
    """Give ``params`` (unconstrained, in place) ``values`` inside the block, then their own."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


@contextmanager
def _transaction(params: Dict[str, torch.Tensor]) -> Iterator[None]:
    """Update ``params`` (unconstrained, in place) all or nothing: on an exception, or a
    non-finite result, every one gets back the value it had before the block."""
    check_params_finite(params)
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        yield
        for name, p in params.items():
            if unrepresentable(p):
                raise RuntimeError(
                    f"The M-step produced non-finite values for param '{name}'; the param "
                    "store was restored to its values before this step."
                )
    except BaseException:
        with torch.no_grad(), deferred():
            for name, p in params.items():
                p.copy_(saved[name])
        raise
