"""Standard errors from the observed information.

At a maximum of the log marginal likelihood ``L(theta) = log p(x | theta)`` (plus the log prior
of MAP-estimated sites, the objective EM maximizes), the asymptotic covariance of the estimate
is the inverse of the observed information ``I = -d^2 L / d theta^2``. Louis (1982) wrote
``I`` as the complete-data information minus the missing information, two expectations under
the E-step's posterior; here the E-step is an exact contraction that autograd differentiates
twice, which gives the same matrix without deriving either term by hand.

``L`` is differentiated in free coordinates of each param's constraint, in the param's own
(constrained) units, where the MLE is an interior point:

* elementwise constraints (``real``, ``positive``, ``interval``, ...): each entry is free,
  except one on its constraint's boundary (a rate of 0, a probability of 0 or 1, to within
  :data:`BOUNDARY`), which is held fixed;
* ``simplex``: a row of K entries has K - 1 free coordinates, the entries above
  :data:`BOUNDARY` but the last, which is one minus their sum; the others (structural zeros,
  and probabilities EM drove towards 0) are held fixed;
* ``lower_cholesky``: the lower triangle; ``positive_definite``: the lower triangle, mirrored.

The covariance of the free coordinates maps back to every entry of every param by the same
linear map (the delta method, exact for linear maps): the entry a simplex row leaves dependent
gets its variance, an entry held fixed gets 0. A maximum on the boundary is not a stationary
point, so its Hessian says nothing; EM approaches one gradually (a probability of 1e-8 after a
long fit), so entries that close to a bound are held fixed too, with a :class:`BoundaryWarning`
(exact zeros, structural, are held fixed silently).
"""

import warnings
from typing import Callable, Dict, List, NamedTuple, Tuple

import pyro.poutine as poutine
import torch
from pyro.distributions import constraints

from ._validation import base_constraint
from .estep import log_marginal, site_terms, trace_model


class Covariance(NamedTuple):
    """The asymptotic covariance of the fitted params (see :mod:`pyro_em.information`).

    :ivar matrix: ``(n, n)``, over every entry of every param, in the order of :attr:`params`,
        each param's entries in row-major order (singular along a simplex's sum, and zero for
        entries held fixed).
    :ivar params: param name -> ``(slice of the matrix's rows, the param's shape)``.
    :ivar information: the observed information in the free coordinates, ``(p, p)``.
    """

    matrix: torch.Tensor
    params: Dict[str, Tuple[slice, torch.Size]]
    information: torch.Tensor

    def block(self, a: str, b: str = None) -> torch.Tensor:
        """The covariance of the entries of param ``a`` with those of ``b`` (default ``a``), of
        shape ``a.shape + b.shape``."""
        (ra, sa), (rb, sb) = self.params[a], self.params[a if b is None else b]
        return self.matrix[ra, rb].reshape(sa + sb)

    def standard_errors(self) -> Dict[str, torch.Tensor]:
        """Each param's standard errors, of its shape."""
        sd = self.matrix.diagonal().clamp_min(0).sqrt()
        return {name: sd[rows].reshape(shape) for name, (rows, shape) in self.params.items()}


#: How near its constraint's boundary an entry counts as on it (absolute, or relative to a
#: bound larger than 1): EM approaches a maximum on the boundary only gradually.
BOUNDARY = 1e-6


def on_boundary(value: torch.Tensor, constraint) -> torch.Tensor:
    """Which entries of a param lie within :data:`BOUNDARY` of its constraint's boundary (a
    simplex entry near 0, an entry near an interval's end); they are held fixed."""
    near = torch.zeros_like(value, dtype=torch.bool)
    for bound in _bounds(constraint):
        near |= (value.detach() - bound).abs() <= BOUNDARY * max(1.0, abs(bound))
    return near


def _bounds(constraint) -> List[float]:
    c = base_constraint(constraint)
    if c is constraints.simplex:
        return [0.0]
    return [float(b) for b in (getattr(c, "lower_bound", None), getattr(c, "upper_bound", None)) if b is not None]


def free_coordinates(name: str, value: torch.Tensor, constraint) -> torch.Tensor:
    """The linear map ``A`` (``(value.numel(), p)``) from ``p`` free coordinates to the param's
    entries, ``value + A phi``, that keeps ``value`` in its constraint's support near ``phi = 0``
    (see the module docs).

    :raises ValueError: naming the param if its constraint has no free coordinates here.
    """
    c = base_constraint(constraint)
    flat = value.detach().reshape(-1)
    n = flat.numel()
    fixed = on_boundary(value, constraint).reshape(-1).tolist()
    columns: List[torch.Tensor] = []

    def column(entries: Dict[int, float]) -> None:
        col = torch.zeros(n, dtype=value.dtype, device=value.device)
        for i, v in entries.items():
            col[i] = v
        columns.append(col)

    if c is constraints.simplex:
        K = value.shape[-1]
        for row, entries in enumerate(value.detach().reshape(-1, K).tolist()):
            free = [row * K + k for k in range(K) if not fixed[row * K + k]]
            for i in free[:-1]:  # (the last nonzero entry is one minus the others)
                column({i: 1.0, free[-1]: -1.0})
    elif c in (constraints.lower_cholesky, constraints.positive_definite):
        D = value.shape[-1]
        for m in range(n // (D * D)):
            for i in range(D):
                for j in range(i + 1):
                    at = m * D * D
                    column({at + i * D + j: 1.0} if c is constraints.lower_cholesky or i == j
                           else {at + i * D + j: 1.0, at + j * D + i: 1.0})
    elif c is constraints.real or isinstance(c, (constraints.interval, constraints.greater_than,
                                                 constraints.greater_than_eq, constraints.less_than,
                                                 type(constraints.half_open_interval(0.0, 1.0)))):
        for i in range(n):
            if not fixed[i]:
                column({i: 1.0})
    else:
        raise ValueError(
            f"Standard errors of param '{name}' are not available: its constraint {constraint} "
            "has no free parametrization here (supported: real, positive and other bounds, "
            "simplex, lower_cholesky, positive_definite)."
        )
    if not columns:
        return torch.zeros(n, 0, dtype=value.dtype, device=value.device)
    return torch.stack(columns, 1)


def observed_covariance(model: Callable, args: tuple, kwargs: dict, first_available_dim: int,
                        values: Dict[str, torch.Tensor], constraints_: Dict[str, object]) -> Covariance:
    """The inverse observed information of ``model`` at the param ``values`` (constrained),
    mapped to every entry of every param (see the module docs).

    :raises ValueError: if the information is not finite, or not positive definite (not a
        maximum: fit to convergence first; or an unidentified model), naming the params.
    """
    names = list(values)
    maps = {name: free_coordinates(name, values[name], constraints_[name]) for name in names}
    approached = [name for name in names if _approached(values[name], constraints_[name])]
    if approached:
        warnings.warn(
            f"Param(s) {', '.join(repr(n) for n in approached)} have entries within {BOUNDARY:g} of "
            "their constraint's boundary, where the likelihood's maximum is not a stationary "
            "point (EM approaches it only gradually): they are held fixed there, with standard "
            "error 0, and the other standard errors are conditional on them.",
            BoundaryWarning,
            stacklevel=3,
        )
    sizes = [maps[name].shape[1] for name in names]
    dtype = values[names[0]].dtype

    def log_density(phi: torch.Tensor) -> torch.Tensor:
        moved, start = {}, 0
        for name, size in zip(names, sizes):
            step = maps[name] @ phi[start:start + size] if size else 0.0
            moved[name] = (values[name].detach().reshape(-1) + step).reshape(values[name].shape)
            start += size
        trace = trace_model(poutine.substitute(model, data=moved), args, kwargs, first_available_dim)
        return log_marginal(trace, site_terms(trace), 1)[0]

    phi = torch.zeros(sum(sizes), dtype=dtype, device=values[names[0]].device)
    with torch.enable_grad():
        information = -torch.autograd.functional.hessian(log_density, phi)
    information = (information + information.T) / 2
    owner = [name for name, size in zip(names, sizes) for _ in range(size)]
    if not bool(torch.isfinite(information).all()):
        raise ValueError("The observed information is not finite at the current params "
                         f"(params {_involved(owner, ~torch.isfinite(information).any(0))}).")
    eigenvalues, vectors = torch.linalg.eigh(information)
    tol = eigenvalues.abs().max() * len(eigenvalues) * torch.finfo(dtype).eps * 100
    if bool((eigenvalues <= tol).any()):
        bad = vectors[:, eigenvalues <= tol].abs().amax(1) > 0.1
        if bool((eigenvalues < -tol).any()):
            raise ValueError(
                "The observed information is not positive definite: the current params are not "
                f"a maximum of the likelihood along params {_involved(owner, bad)}. Fit to "
                "convergence first (a tighter tol), or, if the fit stopped at a saddle, restart it."
            )
        raise ValueError(
            f"The observed information is singular along params {_involved(owner, bad)}: the "
            "data do not identify them (a component without data, two components that "
            "coincide, params that enter the model only together). Fix or drop one of them."
        )
    covariance_free = (vectors / eigenvalues) @ vectors.T
    A = torch.block_diag(*[maps[name] for name in names]) if names else phi.new_zeros(0, 0)
    rows, start = {}, 0
    for name in names:
        rows[name] = (slice(start, start + values[name].numel()), values[name].shape)
        start += values[name].numel()
    return Covariance(A @ covariance_free @ A.T, rows, information)


class BoundaryWarning(UserWarning):
    """Warned by :meth:`pyro_em.EM.covariance` when params have entries near their
    constraint's boundary (not exactly on it, as a structural zero is), which it holds fixed."""


def _approached(value: torch.Tensor, constraint) -> bool:
    """Whether entries are near the boundary without being on it (exact zeros are structural)."""
    exact = torch.zeros_like(value, dtype=torch.bool)
    for bound in _bounds(constraint):
        exact |= value.detach() == bound
    return bool((on_boundary(value, constraint) & ~exact).any())


def _involved(owner: List[str], mask: torch.Tensor) -> str:
    return ", ".join(f"'{n}'" for n in dict.fromkeys(o for o, m in zip(owner, mask.tolist()) if m))
