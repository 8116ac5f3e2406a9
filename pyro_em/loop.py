"""The fit loop: steps until the loss stops improving, with a progress bar, logging, and the
warnings that say how a fit ended."""

import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from tqdm.auto import tqdm

logger = logging.getLogger("pyro_em")


class ConvergenceWarning(UserWarning):
    """Warned by :meth:`EM.fit` when it stops on ``max_iter`` before reaching ``tol``."""


class MStepWarning(UserWarning):
    """Warned when the gradient M-step could not move params whose gradient is not small; a
    fit whose last step stalled so is not reported as converged."""


@dataclass
class EMResult:
    """What :meth:`EM.fit` returns.

    :ivar list losses: the loss before each EM iteration (``losses[i]`` is the loss at the
        parameters that iteration ``i`` started from).
    :ivar bool converged: whether the relative change of the loss fell below ``tol``.
    """

    losses: List[float] = field(default_factory=list)
    converged: bool = False
    run_losses: Optional[List[float]] = None
    """With restarts, the final loss of every run (``inf`` for a run that failed)."""
    best_run: Optional[int] = None
    """With restarts, the index of the run kept in the param store."""
    restarts: Optional[str] = None
    """With restarts, how the runs ran: ``"stepped together"`` (one program over the runs,
    :mod:`pyro_em.batched`) or ``"one after another: <why>"``."""
    n_e_steps: int = 0
    """The E-steps (passes over the data, each with its M-step) the fit ran: ``n_iter`` for
    plain EM; with ``accelerate="squarem"``, three or four per iteration (a SQUAREM cycle)."""

    @property
    def n_iter(self) -> int:
        """The number of EM iterations run."""
        return len(self.losses)

    @property
    def loss(self) -> float:
        """The last loss recorded (``nan`` if no iteration ran)."""
        return self.losses[-1] if self.losses else float("nan")



class RunTracker:
    """One fit's losses, convergence test and warnings (see :meth:`EM.fit`), fed one loss per
    EM iteration: :func:`fit_loop` keeps one, restarts stepped together keep one per run.

    :param round_off: as for :func:`fit_loop`.
    :param stalled: as for :func:`fit_loop`.
    """

    def __init__(self, tol: float, round_off: Optional[Callable[[], float]], stalled: Callable[[], List[str]]):
        self.result, self.tol, self.round_off, self.stalled = EMResult(), tol, round_off, stalled
        self.rose: Optional[int] = None
        self.change = math.inf

    def record(self, loss: float, converged: bool = False) -> bool:
        """Add the loss of the next iteration; returns whether the fit has converged (also where
        ``converged`` says so: a SQUAREM cycle met ``tol`` inside it)."""
        losses = self.result.losses
        losses.append(loss)
        i = len(losses) - 1
        self.change = abs(losses[-2] - loss) / max(1.0, abs(losses[-2])) if i else math.inf
        if self.round_off is not None and self.rose is None and i and loss - losses[-2] > self.round_off() * max(1.0, abs(losses[-2])):
            self.rose = i
        if self.change <= self.tol or converged:
            # A stalled M-step changes nothing either: that is no convergence; nor is the end
            # of a fit whose loss rose (an exact EM step never raises it).
            self.result.converged = not self.stalled() and self.rose is None
            return True
        return False

    def finish(self, max_iter: int, stacklevel: int = 5) -> EMResult:
        """Warn how the fit ended, if not converged; returns its :class:`EMResult`."""
        result, rose = self.result, self.rose
        if self.stalled():
            warnings.warn(
                "EM stopped without converging: the gradient M-step could not improve param(s) "
                + ", ".join(f"'{n}'" for n in self.stalled())
                + " (see MStepWarning).",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        elif rose is not None:
            warnings.warn(
                f"The loss rose at iteration {rose} ({result.losses[rose - 1]:.10g} -> "
                f"{result.losses[rose]:.10g}), which an exact EM step never does: the fit is not "
                "reported as converged. Please report the model to pyro_em's developers.",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        elif not result.converged and result.n_iter == max_iter:
            warnings.warn(
                f"EM did not converge in max_iter={max_iter} iterations (last relative change "
                f"above tol={self.tol:g}); increase max_iter or tol.",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        return result


def progress_bar(max_iter: int, progress: bool, desc: str) -> tqdm:
    """A tqdm bar over ``max_iter`` iterations, shown if ``progress`` (and a stream exists)."""
    stream = sys.stderr or sys.stdout  # both can be None (pythonw, some services)
    return tqdm(total=max_iter, disable=not progress or stream is None, desc=desc, file=stream)


def fit_loop(step: Callable[[], Tuple[float, int]], max_iter: int, tol: float, progress: bool,
             callback: Optional[Callable[[int, float], Optional[bool]]], desc: str,
             round_off: Optional[Callable[[], float]],
             stalled: Callable[[], List[str]]) -> EMResult:
    """Run ``step()`` until the loss stops improving (see :meth:`EM.fit` for the arguments and
    the convergence test), with a progress bar named ``desc``, logging and the warnings.

    :param step: one EM iteration; returns ``(loss, data points)``. A step with a
        ``converged`` attribute (a SQUAREM cycle, whose EM steps met ``tol`` inside it) that is
        true ends the fit as converged.
    :param round_off: for exact EM, the relative rise of the loss that round-off can make, in
        the params' precision once planned (a larger rise is reported); ``None`` for steps that
        may raise the loss (generalized, online EM).
    :param stalled: the params the last step's gradient M-step could not move.
    :returns: the :class:`EMResult`.
    """
    run = RunTracker(tol, round_off, stalled)
    with progress_bar(max_iter, progress, desc) as bar:
        for i in range(max_iter):
            start = time.perf_counter()
            loss, rows = step()
            seconds = time.perf_counter() - start
            done = run.record(loss, getattr(step, "converged", False))
            logger.info("%s iteration %d: loss %.10g, %.3g s, %.4g data points/s", desc, i, loss, seconds, rows / max(seconds, 1e-9))
            bar.set_postfix(loss=f"{loss:.6g}", rel_change=f"{run.change:.2g}", points_per_s=f"{rows / max(seconds, 1e-9):.3g}", refresh=False)
            bar.update()
            if i == 0 and not bar.disable:  # the first step also plans: rate from the second on
                bar.start_t = bar._time()
            if done or (callback is not None and callback(i, loss)):
                break
        if run.result.n_iter < max_iter and not bar.disable:  # stopped early: show it complete
            bar.total = run.result.n_iter
            bar.refresh()
    return run.finish(max_iter)
