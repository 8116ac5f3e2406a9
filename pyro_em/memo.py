"""Values one part of an EM step computes and a later part reads again, kept in a dict that
the :class:`~pyro_em.planner.Planner` of one ``EM`` owns and that :func:`scope` makes visible
while that ``EM`` steps (a context variable, so concurrent fits do not share one).

Two parts use it: the forward pass of a ``DiscreteHMM`` that the E-step ran, which the
M-step's forward-backward continues (:mod:`pyro_em.hmm`), and the feature-major copy of the
data that a Gaussian mixture's E-step and covariance statistics read (:mod:`pyro_em.kernels`).
Outside a scope nothing is kept: every call computes afresh.
"""

import contextlib
import contextvars
from typing import Any, Dict, Iterator, Optional

_MEMO: contextvars.ContextVar = contextvars.ContextVar("pyro_em_memo", default=None)


@contextlib.contextmanager
def scope(store: dict) -> Iterator[None]:
    """Inside the block, :func:`current` is ``store``."""
    token = _MEMO.set(store)
    try:
        yield
    finally:
        _MEMO.reset(token)


def current() -> Optional[Dict[str, Any]]:
    """The dict of the open scope (slot name -> value), or ``None`` outside one."""
    return _MEMO.get()
