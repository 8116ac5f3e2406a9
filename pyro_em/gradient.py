"""Gradient M-step: maximize the expected complete-data log likelihood ``Q`` numerically."""

import functools
import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import torch
from pyro.optim import PyroOptim

from ._validation import interval
from .distributed import all_reduce


class GradientMStep:
    """Maximize ``Q(theta)`` over unconstrained parameters with the posterior held fixed.

    With ``optim=None`` (the default) ``Q`` is maximized to convergence, so that one EM step is
    one exact EM iteration: by Newton's method on the exact Hessian when the params have at
    most ``newton_size`` elements (a quadratic ``Q`` in one step), and by L-BFGS with a
    strong-Wolfe line search where Newton cannot go on (then Newton polishes); if the
    optimizer ends below the starting value of ``Q``, the starting parameters are kept, which
    keeps the likelihood monotone. With a :class:`pyro.optim.PyroOptim` (e.g. ``pyro.optim.Adam``)
    ``num_steps`` gradient steps are taken instead: generalized EM, cheaper per iteration but
    without the monotonicity guarantee.

    :param optim: ``None`` or a :class:`pyro.optim.PyroOptim`.
    :param num_steps: inner steps per M-step for a user optimizer; the iteration cap for L-BFGS.
    :param newton_size: without ``optim``, the most elements (all params together) for which
        Newton's method runs (each step computes the Hessian: one vectorized backward pass).
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

    def __call__(self, objective: "Objective", params: Dict[str, torch.Tensor]) -> List[str]:
        """Update ``params`` in place to increase ``Q``.

        :param objective: ``Q`` at the current values of ``params`` (see :class:`Objective`).
        :param params: name -> unconstrained leaf tensor (as kept by Pyro's param store).
        :returns: the names of params that could not be moved although ``Q``'s gradient in
            them is not negligible: a stalled M-step (empty when all is well).
        :raises ValueError: if ``Q`` has no maximum along some param (a scale collapsing onto a
            data point), naming it.
        """
        if self.optim is None:
            return self._maximize(objective, params)
        values = list(params.values())
        for _ in range(self.num_steps):
            _, g, _ = objective(1, strict=True)
            _set_grads(values, -g)
            self.optim(values)
            for p in values:
                p.grad = None
        return []

    def _maximize(self, objective: "Objective", named: Dict[str, torch.Tensor]) -> List[str]:
        params = list(named.values())
        start = [p.detach().clone() for p in params]
        small = objective.size <= self.newton_size
        order = 2 if small else 1
        q0, g0, h0 = objective(order, strict=True)  # a model that fails here fails loudly
        # Work with Q relative to its size so the tolerances do not depend on the data size.
        norm = max(abs(float(q0)), 1.0)
        eps = _eps(params)
        tolerance_grad = eps**0.5 * 1e-2
        # Small blocks: Newton's method on the exact Hessian first (a quadratic Q, as a
        # weighted least-squares mean's, is solved in one step); L-BFGS where it cannot go on.
        q1, g1, h1, done = _newton(objective, params, norm, q0, g0, h0, 20, first=True) if small else (q0, g0, h0, False)
        if not done:
            reached = [p.detach().clone() for p in params]
            self._run_lbfgs(objective, params, norm, eps, tolerance_grad)
            q2, g2, h2 = objective(order)
            if bool(q2 > q1):
                q1, g1, h1 = q2, g2, h2
            else:  # L-BFGS's line search can stall on rejected trial points
                _restore(params, reached)
                if not bool(q1 > q0):
                    _backtracking_ascent(objective, params, q0, g0)
                    q1, g1, h1 = objective(order)
            _check_collapse(objective, named, start, _split(g1, params), q1, norm)
            if small:
                q1 = _newton(objective, params, norm, q1, g1, h1, 8)[0]
        else:
            _check_collapse(objective, named, start, _split(g1, params), q1, norm)
        for p in params:
            p.grad = None
        if not bool(q1 >= q0):
            _restore(params, start)
            q1 = q0
        moved = [not torch.equal(p.detach(), p0) for p, p0 in zip(params, start)]
        steep = [bool((g.abs() / norm > 1e3 * tolerance_grad).any()) for g in _split(g0, params)]
        return [name for name, m, st in zip(named, moved, steep) if st and not m]

    def _run_lbfgs(self, objective: "Objective", params: List[torch.Tensor], norm: float, eps: float, tolerance_grad: float) -> None:
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
            q, g, _ = objective(1)
            if not bool(torch.isfinite(q)):  # infeasible: steer the line search back
                return torch.tensor(math.inf)
            _set_grads(params, -g / norm)
            return -q / norm

        optimizer.step(closure)


class Objective:
    """``Q`` as a sum of pieces, one per batch of data, each a function that traces its part
    differentiably at the current param values. Pieces are traced one at a time, so memory
    holds one piece's graph; their sums are added over the processes of a
    ``torch.distributed`` group (see :mod:`pyro_em.distributed`), so every process sees the
    same ``Q`` and takes the same M-step.

    :param pieces: the functions, each returning a 0-dim tensor.
    :param params: the unconstrained leaf tensors ``Q`` is maximized over.
    """

    def __init__(self, pieces: List[Callable[[], torch.Tensor]], params: List[torch.Tensor]):
        self.pieces, self.params = pieces, params
        self.size = sum(p.numel() for p in params)
        #: the flat gradient's and Hessian's dtype: the widest of the params' (each param keeps
        #: its own: a model may mix float32 and float64 params, as Pyro's SVI allows)
        self.dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])

    def __call__(self, order: int = 0, strict: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``Q``, and with ``order`` 1 or 2 its gradient (flat, over ``params`` in order), with
        ``order`` 2 its Hessian too (one backward pass per element). ``Q`` is NaN, and its
        gradient ``-inf``, where the model rejects the params (a distribution's argument
        check raises ``ValueError``), unless ``strict``: then the error propagates."""
        p0, dtype = self.params[0], self.dtype
        q = p0.new_zeros((), dtype=dtype)
        g = p0.new_zeros(self.size if order else 0, dtype=dtype)
        h = p0.new_zeros((self.size, self.size) if order == 2 else (0, 0), dtype=dtype)
        error = None
        for piece in self.pieces:
            try:
                with torch.enable_grad():
                    qi = piece()
            except ValueError as e:
                if strict:
                    error = e
                    break
                q = q + math.nan
                break
            except Exception as e:  # noqa: BLE001 (re-raised once the other processes know)
                error = e
                break
            if not bool(torch.isfinite(qi)):
                q = q + qi.detach()
                break
            q = q + qi.detach()
            if order and qi.requires_grad:
                gi, hi = _derivatives(qi, self.params, order)
                g += gi
                if hi is not None:
                    h += hi
        total = all_reduce(torch.cat([q.reshape(1), g, h.reshape(-1)]), error)
        q, g, h = total[0], total[1 : 1 + g.numel()], total[1 + g.numel() :].reshape(h.shape)
        if order and not bool(torch.isfinite(q)):
            g = torch.full_like(g, -math.inf)
        return q, (g if order else None), (h if order == 2 else None)


def _derivatives(q: torch.Tensor, params: List[torch.Tensor], order: int):
    """The flat gradient of ``q`` and, for ``order`` 2, its Hessian (``None`` if ``q`` is
    linear in the params)."""
    grads = torch.autograd.grad(q, params, create_graph=order == 2, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(grads, params)])
    if order < 2 or not flat.requires_grad:
        return flat.detach(), None
    try:  # all rows in one vectorized backward pass
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        with warnings.catch_warnings():  # vmap's notes on operations it loops over
            warnings.simplefilter("ignore")
            rows = torch.autograd.grad(flat, params, grad_outputs=eye, retain_graph=True, allow_unused=True,
                                       is_grads_batched=True)
        return flat.detach(), torch.cat([
            (torch.zeros(eye.shape[0], p.numel(), dtype=flat.dtype, device=flat.device) if r is None else r.reshape(eye.shape[0], -1))
            for r, p in zip(rows, params)
        ], 1).detach()
    except RuntimeError:  # an operation without a batching rule: one pass per row
        pass
    rows = []
    for gk in flat:
        if not gk.requires_grad:
            rows.append(torch.zeros_like(flat))
            continue
        row = torch.autograd.grad(gk, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if r is None else r).reshape(-1) for r, p in zip(row, params)]))
    return flat.detach(), torch.stack(rows).detach()


def _split(flat: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
    """A flat vector over ``params`` cut into their shapes (and dtypes)."""
    return [part.reshape(p.shape).to(p.dtype) for part, p in zip(flat.split([p.numel() for p in params]), params)]


def _eps(params: List[torch.Tensor]) -> float:
    """The round-off of ``Q`` over ``params``: the coarsest of their precisions."""
    return max(torch.finfo(p.dtype).eps for p in params)


def _set_grads(params: List[torch.Tensor], flat: torch.Tensor) -> None:
    for p, g in zip(params, _split(flat, params)):
        p.grad = g.clone()


def _restore(params: List[torch.Tensor], values: List[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _backtracking_ascent(objective: Objective, params: List[torch.Tensor], q: torch.Tensor, g: torch.Tensor, max_iter: int = 50) -> None:
    """Gradient ascent with a backtracking (Armijo) line search from ``params``, where ``Q`` is
    ``q`` with (flat) gradient ``g``: slower than L-BFGS, but a trial point the model rejects
    only halves the step."""
    step = 1.0 / max(1e-300, float(g.abs().max()))
    for _ in range(max_iter):
        slope = float((g * g).sum())
        if slope == 0:
            return
        start = [p.detach().clone() for p in params]
        for _ in range(60):
            with torch.no_grad():
                for p, p0, gp in zip(params, start, _split(g, params)):
                    p.copy_(p0 + step * gp)
            q_new = objective(0)[0]
            if bool(torch.isfinite(q_new)) and float(q_new) >= float(q) + 1e-4 * step * slope:
                break
            step /= 2
        else:
            _restore(params, start)
            return
        if float(q_new) - float(q) <= 1e-15 * max(1.0, abs(float(q))):
            return
        q, g, _ = objective(1)
        step *= 2


def _check_collapse(objective: "Objective", named: Dict[str, torch.Tensor], start: List[torch.Tensor],
                    grads: List[torch.Tensor], q: torch.Tensor, norm: float) -> None:
    """Raise if ``Q`` grows without bound as params run off towards a boundary of their
    constraint (a scale collapsing onto a data point), not where its maximum lies on that
    boundary with ``Q`` finite (a variance term tending to 0, a one-hot probability, a scale
    on its lower bound).

    Candidates are elements whose unconstrained value moved by more than 2 in this M-step
    (a factor e^2 for a positive param) while ``Q``'s gradient ``grads`` still pulls them on.
    ``Q`` is first evaluated with the candidate on its bound (unconstrained +-1e4, where exp,
    sigmoid and stick-breaking reach it, without Pyro's argument checks, which reject a value
    on the bound of an open support): finite or ``-inf`` there, ``Q``, continuous up to the
    bound, has a finite supremum along the way (a variance term tending to 0 beside a positive
    one, an empty component's weight): no error. Else (``+inf``, or undefined as a Normal of
    scale 0) ``Q`` (``q`` here) is evaluated with the candidate moved 2 and 4 further along. An unbounded
    ``Q`` gains as much from the second move as from the first (``-log`` of a scale grows
    linearly in its log): the error. Where the maximum lies on the bound, ``Q`` gains about
    e^-2 as much from the second (``Q(b + e^u) ~ Q(b) + c e^u``); where it lies short of the
    bound (the optimizer has not got there yet), ``Q`` falls: neither is an error. (A scale
    collapsing while its mean follows it shows the linear gains a few steps later, once the
    scale is far below its data's spread.) The params are left where they were."""
    store = pyro.get_param_store()
    params = list(named.values())
    moves = []
    for (name, p), p0, g in zip(named.items(), start, grads):
        moved = p.detach() - p0
        bounds = interval(store._constraints[name]) if name in store else None
        direction = moved.sign()
        if bounds is not None:  # only towards a finite bound (a positive param rising is not)
            direction = torch.where(direction > 0, direction * math.isfinite(bounds[1]), direction * math.isfinite(bounds[0]))
        pulled = (moved.abs() > 2) & ((g * direction / norm > 1e-6) | ~torch.isfinite(g))
        moves.append(torch.where(pulled, direction, torch.zeros_like(direction)))
    candidates = [(k, e) for k, m in enumerate(moves) for e in m.reshape(-1).nonzero().reshape(-1).tolist()]
    here = [p.detach().clone() for p in params] if candidates else []
    round_off = 1e3 * _eps(params) * norm
    for k, e in candidates[:16]:  # one element at a time: another's fall must not hide it
        direction, u = float(moves[k].reshape(-1)[e]), float(here[k].reshape(-1)[e])
        with pyro.validation_enabled(False):  # (an open support rejects a value on its bound)
            on_bound = _q_with(objective, params, here, k, e, _FAR * direction)
        if not math.isnan(on_bound) and on_bound != math.inf:
            continue  # Q finite (or -inf) on the bound: its supremum along the way is finite
        values = [_q_with(objective, params, here, k, e, u + d * direction) for d in (2.0, 4.0)]
        first, second = values[0] - float(q), values[1] - values[0]
        if math.isfinite(first) and math.isfinite(second) and first > round_off and second > 0.5 * first:
            name = list(named)[k]
            raise ValueError(
                f"The gradient M-step found no maximum: param '{name}' (slot(s) [{e}]) keeps moving "
                "towards a bound of its constraint, where Q grows without bound (e.g. a scale "
                "collapsing onto a data point). Put a prior or a lower bound on it, use fewer "
                "components, or write it so that it takes the closed form and set reg_covar > 0."
            )


_FAR = 1e4  # an unconstrained value on a bound: exp(-1e4) is 0 and sigmoid(1e4) is 1 in any precision


def _q_with(objective: "Objective", params: List[torch.Tensor], here: List[torch.Tensor], k: int, e: int,
            value: float) -> float:
    """``Q`` with element ``e`` of param ``k`` at the unconstrained ``value`` and the others at
    ``here``; the params are left at ``here``."""
    moved = [h.clone() for h in here]
    moved[k].view(-1)[e] = value
    _restore(params, moved)
    try:
        return float(objective(0)[0])
    finally:
        _restore(params, here)


def _newton(objective: Objective, params: List[torch.Tensor], norm: float, q: torch.Tensor, g: torch.Tensor,
            h: torch.Tensor, max_steps: int, first: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Newton steps on the exact Hessian of ``Q``, from params where ``Q`` is ``q`` with
    gradient ``g`` and Hessian ``h``, so that the M-step is solved to round-off, as an exact
    EM step must be. Each step is the pseudo-inverse of ``-H`` applied to the gradient (``-H``
    is positive semi-definite at a maximum; its null space, a softmax's shift invariance or
    params ``Q`` ignores, is orthogonal to the gradient), halved until ``Q`` does not fall.

    :param first: Newton before L-BFGS: give up where ``Q``'s gradient has a component along
        directions without curvature (a collapse, say), which L-BFGS and its checks handle.
    :returns: ``(q, g, h, converged)`` at the params left in place (``converged``: the last
        step gained less than round-off, and was taken unchecked); not when the Hessian is not negative
        semi-definite or no step helps (the caller goes on by L-BFGS).
    """
    if not bool(torch.isfinite(q)) or not all(bool(torch.isfinite(p).all()) for p in params):
        return q, g, h, False  # structural zeros (-inf) have no Newton step
    eps = _eps(params)
    for _ in range(max_steps):
        neg_hessian = -h / norm
        if not bool(torch.isfinite(neg_hessian).all()):
            return q, g, h, False
        evals, evecs = torch.linalg.eigh(neg_hessian)
        top = float(evals.abs().max())
        if top == 0 or float(evals.min()) < -1e-8 * top:
            return q, g, h, False
        keep = evals > eps**0.5 * top
        if first and bool(((evecs[:, ~keep].T @ (g / norm)).abs() > eps**0.5).any()):
            return q, g, h, False  # Q climbs where it has no curvature: leave it to L-BFGS
        step = evecs[:, keep] @ ((evecs[:, keep].T @ (g / norm)) / evals[keep])
        if float(step @ (g / norm)) / 2 <= 4 * eps * max(1.0, abs(float(q)) / norm):
            # Q cannot tell this step's gain from round-off, but the params can: take it
            # (quadratic convergence) without evaluating Q again.
            with torch.no_grad():
                for p, s in zip(params, _split(step, params)):
                    p.add_(s)
            return q, g, h, True
        saved = [p.detach().clone() for p in params]
        for _ in range(10):
            with torch.no_grad():
                for p, p0, s in zip(params, saved, _split(step, params)):
                    p.copy_(p0 + s)
            q_new, g_new, h_new = objective(2)
            if bool(torch.isfinite(q_new)) and bool(q_new >= q - 4 * eps * max(norm, abs(float(q)))):
                break
            step = step / 2
        else:
            _restore(params, saved)
            return q, g, h, False
        q, g, h = q_new, g_new, h_new
    return q, g, h, False
