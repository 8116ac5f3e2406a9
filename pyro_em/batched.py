"""Runs stepped together: the restarts of a fit as one program over a leading run dim.

EM finds local optima, so a fit restarts from several starts (:meth:`EM.fit`'s ``n_init``).
Every run's step is the same computation at other param values, so :func:`torch.func.vmap`
runs the closed-form stage of all of them (E-step, statistics, solves; the same Python as one
run's step, :mod:`pyro_em.iteration`) as one: each tensor operation covers the R runs at once,
and the Python around the operations (the plan, the rules, a chain's forward-backward
recursion) runs once per step instead of R times. A step of 1 to 10 runs of a small mixture
takes about 2.3 times one run's step alone (iris, 2 CPU threads: 4.7-5.0 ms against 2.07 ms);
on a GPU, whose kernels a small problem leaves mostly idle, R runs should cost about what one
does.

What keeps each run the fit it would be alone:

* The runs share one plan (made at the first run's start) and the param store's tensors: a run
  is a slice of the stacked unconstrained values, swapped into the store while the stage runs.
* Python that reads a value computed from the params (an ``if`` on a check, a ``float()``)
  reads it for every run (:class:`_Reads`): where all runs agree that value is read; where
  they differ (:class:`Diverged`) that step runs each run on its own through :meth:`EM.step`,
  as a fit from that start would, and a run whose step fails there (a component collapsed)
  stops, as it would alone.
* Each run's convergence is judged on its own (:class:`~pyro_em.loop.RunTracker`); a run that
  has converged no longer steps, and the batch shrinks to the runs still going.
* A computation vmap cannot batch (an operation without a batching rule that writes into a
  tensor of one run) steps every run on its own from then on, with the same results.
* Runs step together in groups of at least :data:`MIN_TOGETHER` whose data add up to at most
  :data:`MAX_TOGETHER_ELEMENTS` (a group's step holds all its runs' E-steps).

Which runs step together never depends on timing, only on the values the Python reads.
"""

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyro
import torch
from torch.distributions import transform_to
from torch.overrides import TorchFunctionMode

from . import memo
from .hmm import algorithm
from .interrupts import deferred
from .iteration import Settings, closed_form_stage
from .loop import RunTracker, logger, progress_bar
from .planner import PlannedBatch, Planner, batch_tensors, rollback_new_params

_functorch = torch._C._functorch


#: The fewest runs stepped together: a vmapped step costs about 2.3 steps of one run in Python
#: (the batching and the reads add about 6 us to each operation; iris, earthquake HMM), so one
#: or two runs left step on their own (``benchmarks/bench_small.py``).
MIN_TOGETHER = 3


#: The data elements (summed over the runs of a group) that a step of runs together may touch:
#: a vmapped step holds every run's E-step at once, so runs on large data step in groups, and
#: one after another where a group would be smaller than :data:`MIN_TOGETHER` (there the step
#: is arithmetic, which batching does not save, and memory grows with the runs).
MAX_TOGETHER_ELEMENTS = 1 << 22


def group_size(planned: PlannedBatch) -> int:
    """The most runs of this batch that step together (see :data:`MAX_TOGETHER_ELEMENTS`)."""
    elements = sum(t.numel() for t in batch_tensors(planned))
    return max(1, MAX_TOGETHER_ELEMENTS // max(1, elements))


def _groups(runs: List[int], size: int) -> List[List[int]]:
    """``runs`` cut into as few groups of at most ``size`` as can be, of about equal sizes."""
    n = -(-len(runs) // size)
    return [runs[j * len(runs) // n:(j + 1) * len(runs) // n] for j in range(n)]


class Diverged(Exception):
    """The runs stepped together read different values (their Python would branch apart)."""


class _Reads(TorchFunctionMode):
    """Inside a vmapped stage: a read of a Python value from a tensor of all runs (``bool``,
    ``float``, ``item``, ``tolist``, ``torch.equal``) gives the runs' common value, or raises
    :class:`Diverged` where they differ."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__index__, torch.Tensor.tolist, torch.equal, torch.is_nonzero}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.READS or not any(_batched(a) for a in args):
            return func(*args, **kwargs)
        runs = [_runs(a) for a in args]
        n = next(len(r) for r in runs if r is not None)
        values = [func(*(a if r is None else r[i] for a, r in zip(args, runs)), **kwargs) for i in range(n)]
        if any(v != values[0] for v in values[1:]):
            raise Diverged(f"the runs read different values at {getattr(func, '__name__', func)}")
        return values[0]


def _batched(t) -> bool:
    return isinstance(t, torch.Tensor) and _functorch.is_batchedtensor(t)


def _runs(t) -> Optional[List[torch.Tensor]]:
    """A batched tensor's value in each run (``None`` for anything else)."""
    if not _batched(t):
        return None
    return list(_functorch.get_unwrapped(t).movedim(_functorch.maybe_get_bdim(t), 0).unbind(0))


def unbatchable(planned: PlannedBatch, names: Sequence[str]) -> Optional[str]:
    """Why the runs of a fit of this plan cannot step together, or ``None`` if they can.

    :param names: the params of the model (each run starts from its own values of them)."""
    plan = planned.plan
    if plan.gradient:
        return f"param '{next(iter(plan.gradient))}' takes the gradient M-step"
    if set(names) != set(plan.params) or set(plan.closed_form) != set(plan.params):
        return "not every param of the model is updated in closed form"
    return None


class RunsStep:
    """The closed-form stage of one EM step for several runs at once (see the module docs).

    :param planner: the planner whose plan ``planned`` is.
    :param settings: the step's settings.
    :param planned: the batch's plan (one batch: all of the data).
    :param names: the params, in the order of the values given and returned.
    """

    def __init__(self, planner: Planner, settings: Settings, planned: PlannedBatch, names: List[str]):
        self.planner, self.settings, self.planned, self.names = planner, settings, planned, names
        self._vmapped = torch.func.vmap(self._stage)

    def __call__(self, values: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """The runs' new unconstrained values (each ``(R, ...)``) and log marginal likelihoods
        ``(R,)`` from their unconstrained ``values`` (each ``(R, ...)``).

        :raises Diverged: where the runs' Python would take different branches.
        """
        with torch.no_grad(), warnings.catch_warnings():
            # (an operation without a batching rule runs per run, as PyTorch warns: still exact)
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            *new, log_z = self._vmapped(*values)
        return new, log_z

    def _stage(self, *values: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        store = pyro.get_param_store()
        saved = {name: store._params[name] for name in self.names}
        try:
            params = dict(zip(self.names, values))
            store._params.update(params)
            with _Reads(), memo.scope({}):  # (nothing a run computed is kept for another)
                new, log_z = closed_form_stage(self.planner, self.settings, self.planned, params)
                unconstrained = [transform_to(store._constraints[name]).inv(new[name]) for name in self.names]
        finally:
            with deferred():
                store._params.update(saved)
        return (*unconstrained, log_z)


def fit_together(em, planned: PlannedBatch, names: List[str], starts: List[Dict[str, torch.Tensor]], args: tuple,
                 kwargs: dict, max_iter: int, tol: float, progress: bool
                 ) -> Tuple[List[Any], List[float], List[torch.Tensor]]:
    """Fit the runs from ``starts`` (each ``{name: unconstrained value}``) stepped together.

    :param em: the :class:`~pyro_em.EM` whose step steps a run on its own.
    :param planned: the plan of ``args`` and ``kwargs`` (all of the data, one batch).
    :returns: each run's :class:`~pyro_em.loop.EMResult` (its exception for a run that failed),
        final loss (``inf`` for a failed run), and the runs' final unconstrained values, each
        param's stacked ``(R, ...)``; the param store holds any run's values.
    """
    planner, settings, round_off = em._planner, em._settings(), em._round_off
    store = pyro.get_param_store()
    leaves = [store._params[name] for name in names]
    R = len(starts)
    values = [torch.stack([s[name] for s in starts]) for name in names]
    trackers = [RunTracker(tol, round_off, lambda: []) for _ in range(R)]
    failed: Dict[int, Exception] = {}
    active = list(range(R))
    step = RunsStep(planner, settings, planned, names)
    together, size = True, group_size(planned)
    with progress_bar(max_iter, progress, type(em).__name__) as bar:
        for i in range(max_iter):
            losses: Dict[int, float] = {}
            alone: List[int] = []
            for group in _groups(active, size):
                if not together or len(group) < MIN_TOGETHER:
                    alone += group
                    continue
                index = torch.tensor(group, device=values[0].device)
                try:
                    with rollback_new_params(), algorithm(settings.hmm_algorithm):
                        new, log_z = step([v.index_select(0, index) for v in values])
                except Diverged:
                    alone += group
                    continue
                except Exception as e:  # noqa: BLE001 (vmap cannot batch it: each run alone)
                    together = False
                    alone += group
                    logger.info("runs step one by one from iteration %d: %s: %s", i, type(e).__name__, e)
                    continue
                ok = torch.isfinite(log_z)
                for v in new:
                    ok &= ~(v.isnan() | (v == math.inf)).flatten(1).any(1)
                kept = ok.nonzero().reshape(-1)
                for v, n in zip(values, new):
                    v.index_copy_(0, index.index_select(0, kept), n.index_select(0, kept))
                for r, loss, good in zip(group, (-log_z).tolist(), ok.tolist()):
                    if good:
                        losses[r] = loss
                    else:  # (its own step says what went wrong)
                        alone.append(r)
            for r in alone:
                loss = _step_alone(em, leaves, values, r, args, kwargs, failed, R)
                if loss is not None:
                    losses[r] = loss
            em._e_steps += 1
            active = [r for r in active if r in losses and not trackers[r].record(losses[r])]
            best = min(losses.values(), default=math.nan)
            logger.info("%s iteration %d: best loss %.10g, %d runs going", type(em).__name__, i, best, len(active))
            bar.set_postfix(best_loss=f"{best:.6g}", runs=len(active), refresh=False)
            bar.update()
            if not active:
                break
    results: List[Any] = []
    for r in range(R):
        if r in failed:
            warnings.warn(f"EM run {r} of {R} failed: {failed[r]}", RuntimeWarning, stacklevel=4)
            results.append(failed[r])
        else:
            results.append(trackers[r].finish(max_iter, stacklevel=4))
            results[-1].n_e_steps = results[-1].n_iter
    finals = _final_losses(em, step, leaves, values, [r for r in range(R) if r not in failed], args, kwargs)
    return results, [finals.get(r, math.inf) for r in range(R)], values


def set_run(leaves: List[torch.Tensor], values: List[torch.Tensor], r: int) -> None:
    """Give the store's params (``leaves``) run ``r``'s values (``values``, each param's
    ``(R, ...)``)."""
    with torch.no_grad(), deferred():
        for leaf, v in zip(leaves, values):
            leaf.copy_(v[r])


def _step_alone(em, leaves, values, r: int, args: tuple, kwargs: dict, failed: Dict[int, Exception], R: int) -> Optional[float]:
    """Run ``r``'s step on its own, through :meth:`EM.step`; its loss, or ``None`` if it failed
    (a ``ValueError``: a component collapsed, say; as a fit from that start would)."""
    set_run(leaves, values, r)
    try:
        loss = em._run([(args, kwargs)], keep=True)[0]
    except ValueError as e:
        failed[r] = e
        return None
    with torch.no_grad():
        for leaf, v in zip(leaves, values):
            v[r] = leaf
    return loss


def _final_losses(em, step: RunsStep, leaves, values, runs: List[int], args: tuple, kwargs: dict) -> Dict[int, float]:
    """Each run's loss at its final params (by one more stage of the runs together, or each
    run's :meth:`EM.evaluate_loss`)."""
    finals: Dict[int, float] = {}
    for group in _groups(runs, group_size(step.planned)) if runs else []:
        if len(group) >= MIN_TOGETHER:
            index = torch.tensor(group, device=values[0].device)
            try:
                with rollback_new_params(), algorithm(step.settings.hmm_algorithm):
                    log_z = step([v.index_select(0, index) for v in values])[1]
                if bool(torch.isfinite(log_z).all()):
                    finals.update(zip(group, (-log_z).tolist()))
                    continue
            except Exception:  # noqa: BLE001 (each run alone says it)
                pass
        for r in group:
            set_run(leaves, values, r)
            finals[r] = em.evaluate_loss(*args, **kwargs)
    return finals
