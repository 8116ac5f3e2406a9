"""SQUAREM: squared extrapolation of the EM map (Varadhan and Roland 2008).

EM is a fixed-point iteration ``theta <- F(theta)`` that crawls where the likelihood is flat
along a ridge (its rate of convergence is the largest fraction of missing information). A
SQUAREM cycle takes two EM steps, ``theta1 = F(theta0)`` and ``theta2 = F(theta1)``, and
extrapolates along them: with ``r = theta1 - theta0`` and ``v = theta2 - 2 theta1 + theta0``,

    ``theta' = theta0 + 2 a r + a^2 v``,  ``a = |r| / |v|`` (their step length SqS3),

then takes one more EM step from ``theta'`` to stabilize it. ``a = 1`` gives ``theta2``, plain
EM's two steps (the cycle then ends there). The step length is at least 1 and at most
``stepmax``, which starts at 1 and grows fourfold each time a cycle reaches it (the paper's
and the ``SQUAREM`` package's defaults).

The extrapolation runs in the params' unconstrained coordinates (those of Pyro's param store),
so every extrapolated point satisfies the constraints; a structural zero (an unconstrained
``-inf``) stays where it is. The safeguard: the loss at ``theta'`` (computed by the
stabilizing step's E-step) must be finite and no higher than at ``theta1``; otherwise, or if
that step fails, the cycle ends at plain EM's ``theta2`` (and a ``stepmax`` it reached shrinks
fourfold). Each cycle's starting loss is therefore never above the previous one.
"""

import math
from typing import Callable, Dict, List, Tuple

import pyro
import torch


class Squarem:
    """A SQUAREM cycle per call, made of EM steps (see the module docs).

    :param step: one EM iteration, ``() -> (loss at the params it started from, data points)``.
    :param names: the names of the params the steps update (called after the first step).
    :param tol: the fit's relative tolerance: a cycle whose two plain EM steps change the
        loss by at most that much ends there and sets :attr:`converged`, the test plain EM
        makes (so a fit that is fast already takes no more E-steps); ``0`` never stops a cycle.
    """

    def __init__(self, step: Callable[[], Tuple[float, int]], names: Callable[[], List[str]], tol: float = 0.0):
        self._step, self._names, self.stepmax, self.tol = step, names, 1.0, tol
        self.converged, self._known = False, None

    def __call__(self) -> Tuple[float, int]:
        """One cycle; returns the loss at the params it started from, and the data points."""
        store = pyro.get_param_store()
        # (before the first step, which may make params, every param of the store)
        theta0 = self._values(store, self._known if self._known is not None else list(store._params))
        loss0, rows = self._step()
        names = self._known = self._names()
        theta1 = self._values(store, names)
        loss1, _ = self._step()
        if self._small(loss0, loss1):
            self.converged = True
            return loss0, rows
        theta2 = self._values(store, names)
        alpha = self._step_length(theta0, theta1, theta2)
        if alpha > 1.01:  # (else theta' is plain EM's theta2, where the cycle already is)
            self._write(store, {n: theta0[n] + 2 * alpha * (theta1[n] - theta0[n])
                                + alpha**2 * (theta2[n] - 2 * theta1[n] + theta0[n]) for n in names}, theta2)
            try:
                loss, _ = self._step()
                accepted = math.isfinite(loss) and loss <= loss1
            except (ValueError, RuntimeError):  # (the extrapolated point is unusable: plain EM)
                accepted = False
            if not accepted:
                self._write(store, theta2, theta2)
                if alpha == self.stepmax:
                    self.stepmax = max(1.0, self.stepmax / 4)
                return loss0, rows
        if alpha == self.stepmax:
            self.stepmax *= 4
        return loss0, rows

    def _small(self, before: float, after: float) -> bool:
        return self.tol > 0 and abs(before - after) <= self.tol * max(1.0, abs(before))

    @staticmethod
    def _values(store, names: List[str]) -> Dict[str, torch.Tensor]:
        return {n: store._params[n].detach().clone() for n in names}

    def _step_length(self, theta0, theta1, theta2) -> float:
        rr = vv = 0.0
        for n in theta1:
            if n not in theta0 or theta0[n].shape != theta1[n].shape:
                return 1.0  # (a param the first step made: no extrapolation this cycle)
            r, v = theta1[n] - theta0[n], theta2[n] - 2 * theta1[n] + theta0[n]
            finite = torch.isfinite(r) & torch.isfinite(v)
            rr += float(r[finite].double().square().sum())
            vv += float(v[finite].double().square().sum())
        if not vv > 0 or not math.isfinite(rr / vv):
            return 1.0
        return min(max(1.0, math.sqrt(rr / vv)), self.stepmax)

    @staticmethod
    def _write(store, values: Dict[str, torch.Tensor], fallback: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, value in values.items():
                # Entries that are not finite (a structural zero's -inf) keep plain EM's value.
                store._params[n].copy_(torch.where(torch.isfinite(value), value, fallback[n]))
