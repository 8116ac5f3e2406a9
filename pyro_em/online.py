"""Online (stepwise) EM: Cappé and Moulines (2009).

Each step takes one batch (or the subsample a ``pyro.plate(..., subsample_size=...)`` draws),
computes its expected sufficient statistics at the current params, blends them into running
statistics, ``s <- (1 - g_t) s + g_t s_batch`` with ``g_t = (t + 2) ** -decay``, and solves
the closed-form M-step from ``s``. The params move after every batch, so on large data it gets
near the optimum in a fraction of an epoch, where batch EM (:meth:`EM.fit_batches`) needs a
pass over all of the data per step; for ``1/2 < decay <= 1`` it converges to a stationary point
of the likelihood (a local maximum in practice). Only params with closed-form updates can be
fitted online: the running statistics stand for the whole data.
"""

import numbers
from typing import Any, Callable, Iterable, Tuple

from .em import EM, _Batches, _accepts_numpy, _guarded
from .iteration import Online
from .planner import rows as planned_rows


class OnlineEM(EM):
    """Stepwise EM (Cappé and Moulines 2009) for data too large, or too endless, for an exact
    pass per step: :meth:`step` updates the params from one batch, blended into running
    sufficient statistics (see :mod:`pyro_em.online`). Everything else is :class:`EM`'s.

    Prefer it to :meth:`EM.fit_batches` when a pass over the data is expensive and an
    approximate optimum (to about the sampling noise of the last steps) is enough; prefer it to
    SVI when every param has a closed form (no learning rate to tune, each step an exact
    M-step of the blended statistics). With explicit batches, a conjugate prior's pseudo-counts
    weigh against one batch's statistics; to weigh them against all of the data, draw the
    batch with ``pyro.plate("data", N, subsample_size=B)``, whose scale ``N / B`` makes each
    batch's statistics estimate the whole data's.

    :param model: as for :class:`EM`.
    :param decay: the exponent ``a`` of the step sizes ``(t + 2) ** -a``, in ``(0.5, 1]``:
        larger forgets the first batches faster; 1 is the running average.
    :param kwargs: :class:`EM`'s keyword arguments.
    :raises ValueError: if ``decay`` is out of range; at the first step, if a param has no
        closed-form update.

    Example::

        em = OnlineEM(model, decay=0.7)
        for epoch in range(3):
            for (batch,) in DataLoader(TensorDataset(data), batch_size=1000, shuffle=True):
                em.step(batch)
    """

    _subsample = True

    def __init__(self, model: Callable, *guide: Callable, decay: float = 0.6, **kwargs: Any):
        if kwargs.get("accelerate") is not None:
            raise ValueError("OnlineEM takes no accelerate: its steps follow running statistics, "
                             "not a fixed-point map to extrapolate; use EM(model, accelerate='squarem').")
        super().__init__(model, *guide, **kwargs)
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.5 < decay <= 1:
            raise ValueError(f"decay must be a number in (0.5, 1], got {decay!r}.")
        self.decay = float(decay)
        self.reset()

    def reset(self) -> None:
        """Forget the running statistics: the next step starts stepwise EM afresh."""
        self.n_steps = 0
        """The number of steps taken since the last :meth:`reset`."""
        self._online = Online()

    def _start_run(self) -> None:
        self.reset()

    @_accepts_numpy
    def step(self, *args: Any, **kwargs: Any) -> float:
        """One stepwise EM step on one batch: its statistics at the current params are blended
        into the running ones with weight ``(t + 2) ** -decay`` (1 at the first step), from
        which every param is solved in closed form. On failure the params and the running
        statistics keep their values.

        :returns: the loss of this batch at the params before the update.
        """
        self._online.step_size = (self.n_steps + 2) ** -self.decay if self.n_steps else 1.0
        saved = dict(self._online.stats)
        try:
            loss = self._run([(args, kwargs)], keep=True)[0]
        except BaseException:
            self._online.stats = saved
            raise
        self.n_steps += 1
        return loss

    @_guarded
    def step_batches(self, batches: Iterable) -> float:
        """One stepwise EM step per batch, in order (an epoch).

        :returns: the sum of the batches' losses, each at the params before its own step.
        """
        return self._step_batches(batches)[0]

    def _step_batches(self, batches: Iterable) -> Tuple[float, int]:
        loss, rows = 0.0, 0
        for args, kwargs in _Batches(batches):
            loss += self.step(*args, **kwargs)
            rows += planned_rows(args, kwargs)
        return loss, rows
