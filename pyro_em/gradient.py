"""Gradient M-step: maximize the expected complete-data log likelihood ``Q`` numerically."""

import math
from typing import Callable, Dict, List, Optional

import pyro
import torch
from pyro.optim import PyroOptim
from torch.distributions import constraints

from ._validation import base_constraint


class GradientMStep:
    """Maximize ``Q(theta)`` over unconstrained parameters with the posterior held fixed.

    With ``optim=None`` (the default) ``Q`` is maximized to convergence by L-BFGS with a
    strong-Wolfe line search, so that one EM step is one exact EM iteration; if the optimizer
    ends below the starting value of ``Q``, the starting parameters are kept, which keeps the
    likelihood monotone. With a :class:`pyro.optim.PyroOptim` (e.g. ``pyro.optim.Adam``)
    ``num_steps`` gradient steps are taken instead: generalized EM, cheaper per iteration but
    without the monotonicity guarantee.

    :param optim: ``None`` or a :class:`pyro.optim.PyroOptim`.
    :param num_steps: inner steps per M-step for a user optimizer; the iteration cap for L-BFGS.
    :param newton_size: with L-BFGS, when the params being updated have at most this many
        elements in all, Newton steps on the exact Hessian finish the M-step to round-off.
    """

    def __init__(self, optim: Optional[PyroOptim] = None, num_steps: Optional[int] = None, newton_size: int = 64):
        if optim is not None and not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim must be None or a pyro.optim.PyroOptim such as pyro.optim.Adam({{'lr': "
                f"0.01}}), got {type(optim).__name__}."
            )
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
        self.optim = optim
        self.num_steps = num_steps or (1 if optim is not None else 100)
        self.newton_size = newton_size

    def __call__(self, q_fn: Callable[[], torch.Tensor], params: Dict[str, torch.Tensor]) -> List[str]:
        """Update ``params`` in place to increase ``q_fn()``.

        :param q_fn: evaluates ``Q`` at the current values of ``params``, differentiably.
        :param params: name -> unconstrained leaf tensor (as kept by Pyro's param store).
        :returns: the names of params that could not be moved although ``Q``'s gradient in
            them is not negligible: a stalled M-step (empty when all is well).
        :raises ValueError: if ``Q`` has no maximum along some param (a scale collapsing onto a
            data point), naming it.
        """
        if self.optim is None:
            return self._lbfgs(q_fn, params)
        for _ in range(self.num_steps):
            loss = -q_fn()
            loss.backward()
            self.optim(list(params.values()))
            for p in params.values():
                p.grad = None
        return []

    def _lbfgs(self, q_fn: Callable[[], torch.Tensor], named: Dict[str, torch.Tensor]) -> List[str]:
        params = list(named.values())
        start = [p.detach().clone() for p in params]
        with torch.enable_grad():
            q0 = q_fn()  # a model that fails at the current values fails here, loudly
            g0 = _gradient(q0, params)
        q0 = q0.detach()
        # Work with Q relative to its size so the tolerances do not depend on the data size.
        norm = max(abs(float(q0)), 1.0)
        eps = torch.finfo(params[0].dtype).eps
        tolerance_grad = eps**0.5 * 1e-2
        optimizer = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=self.num_steps,
            tolerance_grad=tolerance_grad,
            tolerance_change=eps * 10,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            loss = _rejecting(lambda: -q_fn() / norm)
            if not bool(torch.isfinite(loss)):  # infeasible: steer the line search back
                return torch.tensor(math.inf)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
            q1 = _rejecting(q_fn)  # traced once here, its graph serving the checks below
            if not bool(q1 > q0):  # L-BFGS's line search can stall on rejected trial points
                _restore(params, start)
                _backtracking_ascent(q_fn, params, q0, g0)
                q1 = _rejecting(q_fn)
            _check_collapse(named, start, _gradient(q1, params, keep_graph=True), norm)
            if sum(p.numel() for p in params) <= self.newton_size:
                q1 = _newton_polish(q_fn, params, norm, q1)
            q1 = q1.detach()
        for p in params:
            p.grad = None
        if not bool(q1 >= q0):
            _restore(params, start)
            q1 = q0
        moved = [not torch.equal(p.detach(), p0) for p, p0 in zip(params, start)]
        steep = [bool((g.abs() / norm > 1e3 * tolerance_grad).any()) for g in g0]
        return [name for name, m, st in zip(named, moved, steep) if st and not m]


def _gradient(q: torch.Tensor, params: List[torch.Tensor], keep_graph: bool = False) -> List[torch.Tensor]:
    """``dq / dparams`` (zeros where ``q`` does not depend on a param, ``-inf`` where ``q`` is
    not finite: a rejected point)."""
    if not bool(torch.isfinite(q)):
        return [torch.full_like(p, -math.inf) for p in params]
    if not q.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(q, params, allow_unused=True, retain_graph=keep_graph)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


def _rejecting(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()``, or NaN where the model rejects the trial point (a distribution's argument
    check raises ``ValueError``): callers treat a non-finite value as a rejected point."""
    try:
        value = fn()
    except ValueError:
        return torch.tensor(float("nan"))
    return value


def _restore(params: List[torch.Tensor], values: List[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _backtracking_ascent(q_fn, params: List[torch.Tensor], q: torch.Tensor, grads: List[torch.Tensor], max_iter: int = 50) -> None:
    """Gradient ascent with a backtracking (Armijo) line search from ``params``, where ``Q`` is
    ``q`` with gradient ``grads``: slower than L-BFGS, but a trial point the model rejects only
    halves the step."""
    step = 1.0 / max(1e-300, max(float(g.abs().max()) for g in grads))
    for _ in range(max_iter):
        slope = sum(float((g * g).sum()) for g in grads)
        if slope == 0:
            return
        start = [p.detach().clone() for p in params]
        for _ in range(60):
            with torch.no_grad():
                for p, p0, g in zip(params, start, grads):
                    p.copy_(p0 + step * g)
                q_new = _rejecting(q_fn)
            if bool(torch.isfinite(q_new)) and float(q_new) >= float(q) + 1e-4 * step * slope:
                break
            step /= 2
        else:
            _restore(params, start)
            return
        if float(q_new) - float(q) <= 1e-15 * max(1.0, abs(float(q))):
            return
        with torch.enable_grad():
            q = q_fn()
            grads = _gradient(q, params)
        q, step = q.detach(), step * 2


def _check_collapse(named: Dict[str, torch.Tensor], start: List[torch.Tensor], grads: List[torch.Tensor], norm: float) -> None:
    """Raise if ``Q`` grows without bound as params run off towards a boundary of their
    constraint: elements whose unconstrained value fell by more than 2 in this M-step (a factor
    e^2 for a positive param) while, at its end, ``Q``'s gradient ``grads`` still pulls them on
    instead of vanishing as at a maximum: a scale collapsing onto a data point."""
    store = pyro.get_param_store()
    for (name, p), p0, g in zip(named.items(), start, grads):
        if name in store and base_constraint(store._constraints[name]) is constraints.real:
            continue  # a real-valued param has no boundary to run off to
        fell = (p.detach() - p0 < -2) & ((g / norm < -1e-6) | ~torch.isfinite(g))
        if bool(fell.any()):
            slots = fell.reshape(-1).nonzero().reshape(-1).tolist()
            raise ValueError(
                f"The gradient M-step found no maximum: param '{name}' (slot(s) {slots}) keeps "
                "falling towards the boundary of its constraint, e.g. a scale collapsing onto "
                "a data point, where the likelihood is unbounded. Put a prior or a lower bound "
                "on it, use fewer components, or write it so that it takes the closed form and "
                "set reg_covar > 0."
            )


def _newton_polish(q_fn: Callable[[], torch.Tensor], params: List[torch.Tensor], norm: float, q: torch.Tensor, max_steps: int = 8) -> torch.Tensor:
    """Finish L-BFGS's work with Newton steps on the exact Hessian of ``Q`` (one backward
    pass per parameter element), so that the M-step is solved to round-off, as an exact EM
    step must be. ``q`` is ``Q`` at the current params, with its graph. A step is kept only if
    ``Q`` does not fall and the Hessian is negative semi-definite; otherwise L-BFGS's point
    stands.

    :returns: ``Q`` at the params left in place.
    """
    if not q.requires_grad or not bool(torch.isfinite(q)) or not all(bool(torch.isfinite(p).all()) for p in params):
        return q  # structural zeros (-inf) have no Newton step
    eps = torch.finfo(params[0].dtype).eps
    used = None
    for _ in range(max_steps):
        grads = torch.autograd.grad(q / norm, params, create_graph=True, allow_unused=True)
        if used is None:  # Q may ignore some params
            used = [i for i, g in enumerate(grads) if g is not None]
            params = [params[i] for i in used]
        g = torch.cat([grads[i].reshape(-1) for i in used])
        if not g.requires_grad:
            return q
        rows = [
            torch.cat([
                (h if h is not None else torch.zeros_like(p)).reshape(-1)
                for h, p in zip(torch.autograd.grad(gi, params, retain_graph=True, allow_unused=True), params)
            ])
            for gi in g
        ]
        # -H is positive semi-definite at a maximum; its null space (a softmax's shift
        # invariance) is orthogonal to the gradient, so the pseudo-inverse gives the step.
        neg_hessian = -torch.stack(rows).detach()
        if not bool(torch.isfinite(neg_hessian).all()):
            return q
        evals, evecs = torch.linalg.eigh(neg_hessian)
        top = float(evals.abs().max())
        if top == 0 or float(evals.min()) < -1e-8 * top:
            return q
        keep = evals > eps**0.5 * top
        step = evecs[:, keep] @ ((evecs[:, keep].T @ g.detach()) / evals[keep])
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(step[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()
        q_new = _rejecting(q_fn)  # with its graph: the next step's gradient and Hessian
        if not bool(q_new >= q.detach() - 4 * eps * max(norm, abs(float(q.detach())))):
            _restore(params, saved)
            return q
        q = q_new
        scale = max(1.0, max(float(p.detach().abs().max()) for p in params))
        if float(step.abs().max()) <= 4 * eps * scale:
            return q
    return q
