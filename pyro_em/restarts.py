"""Restarts and the checks after a fit: EM finds local optima, so run it from several starts
and keep the best; say when a component collapsed instead of reporting a quiet convergence."""

import math
import numbers
import warnings
from typing import TYPE_CHECKING, Callable, List, Optional

import pyro
from torch.distributions import constraints

if TYPE_CHECKING:  # pragma: no cover
    from .em import EM, EMResult


class CollapseWarning(UserWarning):
    """Warned after a fit in which a mixture weight went to (nearly) zero or a variance sits at
    the ``reg_covar`` floor: that component explains (almost) nothing, or a single point."""


def model_param_names(em: "EM", args: tuple, kwargs: dict) -> List[str]:
    """The params (MAP values included) the model uses, created if missing."""
    trace = em._probe_trace(args, kwargs)
    return [name for name, site in trace.nodes.items() if site["type"] == "param"]


def fit_restarts(em: "EM", args: tuple, kwargs: dict, n_init: int, init: Optional[Callable], fit_kwargs: dict) -> "EMResult":
    """``n_init`` fits, each from the model's params removed from the store and ``init`` called
    with the model's arguments; the best final loss stays in the store (see :meth:`EM.fit`)."""
    if isinstance(n_init, bool) or not isinstance(n_init, numbers.Integral) or n_init < 1:
        raise ValueError(f"n_init must be an integer >= 1, got {n_init!r}.")
    if init is not None and not callable(init):
        raise TypeError(f"init must be a callable taking the model's arguments, got {type(init).__name__}.")
    store = pyro.get_param_store()
    names = model_param_names(em, args, kwargs)
    best, best_loss, best_values, finals, error = None, math.inf, None, [], None
    for run in range(int(n_init)):
        for name in names:
            if name in store:
                del store[name]
        em._new_run()  # the params are new objects: plan afresh
        if init is not None:
            init(*args, **kwargs)
        try:
            result = em._fit_once(args, kwargs, **fit_kwargs)
            final = em.evaluate_loss(*args, **kwargs)
        except ValueError as e:  # e.g. a component collapsed in this run: try the others
            warnings.warn(f"EM run {run} of {n_init} failed: {e}", RuntimeWarning, stacklevel=3)
            finals.append(math.inf)
            error = e
            continue
        finals.append(final)
        if best is None or final < best_loss:
            best, best_loss = result, final
            best_values = {n: (store[n].detach().clone(), store._constraints[n]) for n in names if n in store}
    if best is None:
        raise error
    for name, (value, constraint) in best_values.items():
        if name in store:
            del store[name]
        store.setdefault(name, value, constraint)
    best.run_losses, best.best_run = finals, finals.index(min(finals))
    return best


def warn_collapsed(names, reg_covar: float) -> None:
    """Warn, naming the param and slots, about mixture weights near zero (a 1-D simplex param
    entry below 1e-8 but not exactly 0: exact zeros are structural) and variances at the
    ``reg_covar`` floor."""
    store = pyro.get_param_store()
    for name in names:
        if name not in store:
            continue
        value, c = store[name].detach(), store._constraints[name]
        if c is constraints.simplex and value.dim() == 1:
            bad = (value > 0) & (value < 1e-8)
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
