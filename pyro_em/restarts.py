"""Restarts and the checks after a fit: EM finds local optima, so run it from several starts
and keep the best; say when a component collapsed instead of reporting a quiet convergence."""

import math
import numbers
import warnings
from typing import Any, Callable, Dict, List, Optional

import pyro
import torch
from torch.distributions import constraints

from . import batched, distributed


class CollapseWarning(UserWarning):
    """Warned after a fit in which a mixture weight went to (nearly) zero or a variance sits at
    the ``reg_covar`` floor: that component explains (almost) nothing, or a single point."""


class SymmetryWarning(CollapseWarning):
    """Warned after a fit that stayed at a symmetric point: two components (values of a
    latent) with the same posterior everywhere, as when they start with equal params."""


def fit_restarts(em, args: tuple, kwargs: dict, n_init: int, init: Optional[Callable], fit_kwargs: dict) -> Any:
    """``n_init`` fits of ``em``'s model, each from a start of its own: the model's params (MAP
    values included) removed from the store, ``init`` called with the model's arguments, and
    the params the model then creates; the best final loss stays in the store (see
    :meth:`EM.fit`). The runs share one plan; where they can, they step together
    (:mod:`pyro_em.batched`), else one after another.

    :param fit_kwargs: :meth:`EM.fit`'s ``max_iter``, ``tol``, ``progress`` and ``callback``.
    :returns: the best run's ``EMResult``, with ``run_losses``, ``best_run`` and ``restarts``.
    """
    if isinstance(n_init, bool) or not isinstance(n_init, numbers.Integral) or n_init < 1:
        raise ValueError(f"n_init must be an integer >= 1, got {n_init!r}.")
    if init is not None and not callable(init):
        raise TypeError(f"init must be a callable taking the model's arguments, got {type(init).__name__}.")
    planner = em._planner
    trace = planner.probe_trace(args, kwargs)  # (creates the params)
    names = [name for name, site in trace.nodes.items() if site["type"] == "param"]
    starts = _starts(planner, names, args, kwargs, int(n_init), init)
    store = pyro.get_param_store()
    leaves = [store._params[name] for name in names]
    why = _apart_because(em, args, kwargs, names, int(n_init), fit_kwargs["callback"])
    if why is None:
        results, finals, values = batched.fit_together(em, planner.latest, names, starts, args, kwargs,
                                                       fit_kwargs["max_iter"], fit_kwargs["tol"], fit_kwargs["progress"])
    else:
        results, finals, values = [], [], [torch.stack([s[name] for s in starts]) for name in names]
        for r in range(len(starts)):
            batched.set_run(leaves, values, r)
            em._start_run()
            try:
                results.append(em._fit_once(args, kwargs, **fit_kwargs))
                finals.append(em.evaluate_loss(*args, **kwargs))
            except ValueError as e:  # e.g. a component collapsed in this run: try the others
                warnings.warn(f"EM run {r} of {n_init} failed: {e}", RuntimeWarning, stacklevel=3)
                results.append(e)
                finals.append(math.inf)
                continue
            with torch.no_grad():
                for leaf, v in zip(leaves, values):
                    v[r] = leaf
    if all(f == math.inf for f in finals):
        raise results[-1]  # (every run failed: each result is its error)
    best_run = finals.index(min(finals))
    batched.set_run(leaves, values, best_run)
    best = results[best_run]
    best.run_losses, best.best_run = finals, best_run
    best.restarts = "stepped together" if why is None else f"one after another: {why}"
    return best


def _apart_because(em, args: tuple, kwargs: dict, names: List[str], n_init: int, callback) -> Optional[str]:
    """Why the runs of this fit run one after another, or ``None`` where they step together
    (planning the batch, with the store at the first run's start)."""
    if n_init == 1:
        return "one run"
    if n_init < batched.MIN_TOGETHER:
        return f"{n_init} runs cost less one after another than stepped together"
    if callback is not None:
        return "fit(..., callback=...) reads each run's params"
    if em.accelerate is not None:
        return "accelerate='squarem' extrapolates each run's own steps"
    if em._online is not None:
        return "stepwise EM blends each run's own statistics"
    if distributed.active():
        return "a torch.distributed group steps one run at a time"
    planned = em._planner.planned(args, kwargs)
    why = batched.unbatchable(planned, names)
    if why is None and batched.group_size(planned) < batched.MIN_TOGETHER:
        why = "the data are large (a step of runs together holds every run's E-step, and saves no arithmetic)"
    return why


def _starts(planner, names: List[str], args: tuple, kwargs: dict, n: int, init: Optional[Callable]) -> List[Dict[str, torch.Tensor]]:
    """Each run's start, ``{param: unconstrained value}``: the params removed from the store,
    ``init`` called, and the model run once to create the rest (as a fit from an empty store
    would). The store then holds new params with the first run's values (the runs share them:
    a run's values are copied in)."""
    store = pyro.get_param_store()
    starts: List[Dict[str, torch.Tensor]] = []
    for run in range(n):
        for name in names:
            if name in store:
                del store[name]
        planner.new_run()
        if init is not None:
            init(*args, **kwargs)
        if any(name not in store for name in names):  # (the model creates the others)
            planner.probe_trace(args, kwargs)
        start = {}
        for name in names:
            if name not in store:
                raise ValueError(f"Param '{name}' was not created in run {run}: the model must create the same params in every run.")
            start[name] = store._params[name].detach().clone()
            if starts and start[name].shape != starts[0][name].shape:
                raise ValueError(
                    f"Param '{name}' starts with shape {tuple(start[name].shape)} in run {run} but "
                    f"{tuple(starts[0][name].shape)} in run 0: every run of a fit has the same shapes (check init).")
        starts.append(start)
    for name in names:  # (new tensors: a start may share memory with the user's data)
        old = store._params.pop(name)
        store._param_to_name.pop(old, None)
        leaf = starts[0][name].clone().requires_grad_()
        store._params[name], store._param_to_name[leaf] = leaf, name
    planner.new_run()
    return starts


def warn_collapsed(names, reg_covar: float, posterior: Optional[Callable[[], Dict[str, torch.Tensor]]] = None) -> None:
    """Warn, naming the param and slots, about empty components and variances at the
    ``reg_covar`` floor after a fit; with ``posterior`` (the fitted posterior marginals, see
    :meth:`EM.posterior`), also about a fit that stayed at a symmetric start.

    A weight of a 1-D simplex param below 1e-8 (exactly 0 included) marks an empty component
    only where the state it weighs holds almost no posterior mass at any latent site with as
    many values: an HMM's initial probability of 0 is no collapse, its state is visited later.
    Without ``posterior``, exact zeros are taken as structural and only near-zero weights warn.
    """
    store = pyro.get_param_store()
    values = {n: store[n].detach() for n in names if n in store}
    # The posterior costs an E-step: only where a weight is near 0 or a param has two slices
    # equal up to 1e-6 (a symmetric fit's components are equal, as they started).
    needed = any(
        (store._constraints[n] is constraints.simplex and v.dim() == 1 and bool((v < 1e-8).any()))
        or any(_equal_slices(v, size, 1e-6) for size in set(v.shape) if size > 1)
        for n, v in values.items()
    )
    masses = _state_masses(posterior()) if posterior is not None and needed else None
    if masses is not None:
        masses, groups = masses
        _warn_symmetric(names, groups)
    for name in names:
        if name not in store:
            continue
        value, c = store[name].detach(), store._constraints[name]
        if c is constraints.simplex and value.dim() == 1:
            mass = None if masses is None else masses.get(value.shape[-1])
            if mass is None:
                bad = (value > 0) & (value < 1e-8)
            else:
                bad = (value < 1e-8) & (mass.to(value.device) <= 1e-8 * mass.sum())
            what = "a weight near 0 (the component explains almost nothing)"
        elif reg_covar > 0 and c is constraints.positive:
            bad = value.square() <= reg_covar * (1 + 1e-6)
            what = "a variance at the reg_covar floor (the component sits on one point)"
        elif reg_covar > 0 and c is constraints.lower_cholesky:
            bad = (value @ value.mT).diagonal(dim1=-2, dim2=-1) <= reg_covar * (1 + 1e-6)
            what = "a variance at the reg_covar floor (the component sits on one point)"
        else:
            continue
        if bool(bad.any()):
            slots = bad.reshape(-1).nonzero().reshape(-1).tolist()
            warnings.warn(
                f"Param '{name}' has {what} at slot(s) {slots}: a collapsed component. Fit with "
                "fewer components, or restart from other values (fit(..., n_init=5, init=...)).",
                CollapseWarning,
                stacklevel=3,
            )


def _state_masses(marginals: Dict[str, torch.Tensor]):
    """``({K: posterior mass of each of K values, over every site with K values},
    [marginals as rows: each site's, and all sites' with K values together])``."""
    rows: Dict[int, List[torch.Tensor]] = {}
    for probs in marginals.values():
        if probs.dim() and probs.shape[-1] > 1:
            rows.setdefault(probs.shape[-1], []).append(probs.detach().reshape(-1, probs.shape[-1]).double().cpu())
    groups = [r for own in rows.values() for r in own] + [torch.cat(own) for own in rows.values() if len(own) > 1]
    return {K: torch.cat(r).sum(0) for K, r in rows.items()}, groups


def _warn_symmetric(names, groups: List[torch.Tensor]) -> None:
    """Warn where a latent's posterior shows a symmetric fit (components started equal stay
    equal): two of its values with mass have the same posterior at every site and datum, or
    every datum has the same posterior (the components are indistinguishable)."""
    store = pyro.get_param_store()
    for r in groups:
        K = r.shape[-1]
        mass = r.sum(0)
        live = (mass > 1e-8 * mass.sum()).nonzero().reshape(-1).tolist()
        if r.shape[0] < 2 or len(live) < 2:
            continue
        tol = 1e-9 * float(r.abs().max())
        pair = _equal_pair(r[:, live].T, tol)
        if pair is not None:
            i, j = sorted(live[k] for k in pair)
            what = f"values {i} and {j} of a latent with {K} values have the same posterior everywhere"
        elif float((r - r[:1]).abs().max()) <= tol:
            what = f"a latent with {K} values has the same posterior for every datum (its components do not differ)"
        else:
            continue
        tied = [n for n in names if n in store and _equal_slices(store[n].detach(), K)]
        warnings.warn(
            f"The fit ended at a symmetric point: {what}"
            + (f"; param(s) {', '.join(repr(n) for n in tied)} are equal across components" if tied else "")
            + ". EM cannot break a symmetry it starts from: start the components apart (fit(..., "
            "init=...), pyro_em.init), restart from random values (fit(..., n_init=5) with an init "
            "that samples), or give MAP sites an init_loc_fn that samples "
            "(pyro.infer.autoguide.init_to_sample); if the data cannot tell them apart, fit fewer.",
            SymmetryWarning,
            stacklevel=3,
        )
        return


def _equal_slices(value: torch.Tensor, K: int, rtol: float = 0.0) -> bool:
    """Whether ``value`` has a dim of size ``K`` along which two slices are equal (up to
    ``rtol``, relative to the largest entry)."""
    atol = rtol * float(value.abs().max()) if value.numel() else 0.0
    return any(
        _equal_pair(value.movedim(d, 0).reshape(K, -1), atol) is not None for d, size in enumerate(value.shape) if size == K
    )


def _equal_pair(rows: torch.Tensor, atol: float) -> Optional[tuple]:
    """Two of ``rows`` (``(K, M)``) that agree to ``atol`` everywhere, or ``None``. Equal rows
    have equal sums: the rows are sorted by their sums and neighbours compared, ``O(K M)``
    (a per-datum param has as many rows as data)."""
    if rows.shape[0] < 2:
        return None
    order = rows.sum(1).argsort()
    ordered = rows[order]
    same = ((ordered[1:] - ordered[:-1]).abs().amax(1) <= atol).nonzero().reshape(-1)
    if not len(same):
        return None
    k = int(same[0])
    return int(order[k]), int(order[k + 1])
