"""Gradient M-step: maximize the expected complete-data log likelihood ``Q`` numerically."""

from typing import Callable, List, Optional

import torch
from pyro.optim import PyroOptim


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

    def __call__(self, q_fn: Callable[[], torch.Tensor], params: List[torch.Tensor]) -> None:
        """Update ``params`` in place to increase ``q_fn()``.

        :param q_fn: evaluates ``Q`` at the current values of ``params``, differentiably.
        :param params: unconstrained leaf tensors (as kept by Pyro's param store).
        """
        if self.optim is None:
            self._lbfgs(q_fn, params)
            return
        for _ in range(self.num_steps):
            loss = -q_fn()
            loss.backward()
            self.optim(params)
            for p in params:
                p.grad = None

    def _lbfgs(self, q_fn: Callable[[], torch.Tensor], params: List[torch.Tensor]) -> None:
        start = [p.detach().clone() for p in params]
        with torch.no_grad():
            q0 = q_fn()
        # Work with Q relative to its size so the tolerances do not depend on the data size.
        norm = max(abs(float(q0)), 1.0)
        eps = torch.finfo(params[0].dtype).eps
        optimizer = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=self.num_steps,
            tolerance_grad=eps**0.5 * 1e-2,
            tolerance_change=eps * 10,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            try:
                loss = -q_fn() / norm
            except ValueError:  # a distribution rejected a trial point (e.g. scale underflow)
                loss = torch.tensor(float("nan"))
            if not torch.isfinite(loss):  # infeasible: steer the line search back
                return loss.detach().new_tensor(float("inf"))
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
            if sum(p.numel() for p in params) <= self.newton_size:
                _newton_polish(q_fn, params, norm)
            q1 = q_fn()
        for p in params:
            p.grad = None
        if not bool(q1 >= q0):
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)


def _newton_polish(q_fn: Callable[[], torch.Tensor], params: List[torch.Tensor], norm: float, max_steps: int = 8) -> None:
    """Finish L-BFGS's work with Newton steps on the exact Hessian of ``Q`` (one backward
    pass per parameter element), so that the M-step is solved to round-off, as an exact EM
    step must be. A step is kept only if ``Q`` does not fall and the Hessian is negative
    semi-definite; otherwise L-BFGS's point stands."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return  # structural zeros (-inf) have no Newton step
    q = q_fn()
    if not q.requires_grad:
        return
    used = torch.autograd.grad(q, params, allow_unused=True)
    params = [p for p, g in zip(params, used) if g is not None]  # Q may ignore some
    eps = torch.finfo(params[0].dtype).eps
    for _ in range(max_steps):
        q = q_fn() / norm
        if not bool(torch.isfinite(q)):
            return
        grads = torch.autograd.grad(q, params, create_graph=True)
        g = torch.cat([x.reshape(-1) for x in grads])
        if not g.requires_grad:
            return
        rows = [
            torch.cat([
                (h if h is not None else torch.zeros_like(p)).reshape(-1)
                for h, p in zip(torch.autograd.grad(gi, params, retain_graph=True, allow_unused=True), params)
            ])
            for gi in g
        ]
        # -H is positive semi-definite at a maximum; its null space (a softmax's shift
        # invariance) is orthogonal to the gradient, so the pseudo-inverse gives the step.
        evals, evecs = torch.linalg.eigh(-torch.stack(rows).detach())
        top = float(evals.abs().max())
        if top == 0 or float(evals.min()) < -1e-8 * top:
            return
        keep = evals > eps**0.5 * top
        step = evecs[:, keep] @ ((evecs[:, keep].T @ g.detach()) / evals[keep])
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(step[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()
            q_new = q_fn() / norm
        q = q.detach()
        if not bool(q_new >= q - 4 * eps * max(1.0, abs(float(q)))):
            with torch.no_grad():
                for p, p0 in zip(params, saved):
                    p.copy_(p0)
            return
        scale = max(1.0, max(float(p.detach().abs().max()) for p in params))
        if float(step.abs().max()) <= 4 * eps * scale:
            return
