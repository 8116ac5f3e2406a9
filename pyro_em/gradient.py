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
    """

    def __init__(self, optim: Optional[PyroOptim] = None, num_steps: Optional[int] = None):
        if optim is not None and not isinstance(optim, PyroOptim):
            raise TypeError(
                f"optim must be None or a pyro.optim.PyroOptim such as pyro.optim.Adam({{'lr': "
                f"0.01}}), got {type(optim).__name__}."
            )
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
        self.optim = optim
        self.num_steps = num_steps or (1 if optim is not None else 100)

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
            q1 = q_fn()
        for p in params:
            p.grad = None
        if not bool(q1 >= q0):
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
