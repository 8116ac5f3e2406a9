"""Log densities for the E-step: ``fn.log_prob(value)``, with faster kernels where the generic
implementation is memory-bound or does more work than needed.

A mixture's emission is evaluated for every component at every data point, a K x N batch.
``MultivariateNormal.log_prob`` does that in several passes over a K x N x D tensor; the
kernel here instead loops over the components (as scikit-learn does), so each N x D block
stays in cache, and whitens with the inverse Cholesky factor by a matrix product.
``DiscreteHMM`` uses the scaled forward pass of :mod:`pyro_em.hmm` (work T K^2, not the
parallel scan's T K^3) when no gradient is needed. ``Independent`` Bernoulli pixels and
Poisson counts are matrix products of their sufficient statistics and natural parameters;
diagonal Normals loop over the components as MultivariateNormal does; other ``Independent``
sites sum their base's kernel. Kernels return ``None``
where they do not apply, and the distribution's own ``log_prob`` is used.
"""

import math
import weakref
from typing import Callable, Dict, Optional

import torch
import torch.distributions as td

from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution

from . import memo
from .tracking import broadcast_shapes, compact

_KERNELS: Dict[type, Callable] = {}
_MIN_ELEMENTS = 1 << 14  # below this, the generic log_prob is as fast
_MAX_BLOCKS = 1024


def register(kind: type, kernel: Callable[[td.Distribution, torch.Tensor], Optional[torch.Tensor]]) -> None:
    """Compute the log density of distributions of type ``kind`` (and its subclasses) by
    ``kernel(fn, value)``, which returns ``None`` where the generic ``log_prob`` should run."""
    _KERNELS[kind] = kernel


def log_prob(fn: td.Distribution, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)``, computed by a faster kernel where one applies."""
    for base in type(fn).__mro__:
        kernel = _KERNELS.get(base)
        if kernel is not None:
            result = kernel(fn, value)
            if result is not None:
                return result
            break
    return fn.log_prob(value)


def _pad(shape: torch.Size, n: int) -> tuple:
    return (1,) * (n - len(shape)) + tuple(shape)


def _layout(batch: torch.Size, param_shapes, value_shape):
    """How a batch of log densities splits into component dims (where the parameters vary)
    and data dims (where the value varies), for kernels that loop or multiply over components.

    :returns: ``(comp_shape, padded param shapes, comp_last)``, ``comp_shape`` having the
        batch's size on component dims and 1 elsewhere, ``comp_last`` whether the component
        dims lie right of the data dims (a fused mixture's ``(N, 1, K)``) rather than left (an
        enumerated mixture's ``(K, N)``); ``None`` unless they all lie on one side and no batch
        dim is of neither kind.
    """
    n = len(batch)
    padded = [_pad(shape, n) for shape in param_shapes]
    x_b = _pad(value_shape, n)
    comp = [i for i in range(n) if any(p[i] > 1 for p in padded)]
    data = [i for i in range(n) if x_b[i] > 1]
    comp_last = bool(comp and data and min(comp) > max(data))
    if comp and data and max(comp) >= min(data) and not comp_last:
        return None
    if any(batch[i] > 1 and i not in comp and i not in data for i in range(n)):
        return None
    return tuple(batch[i] if i in comp else 1 for i in range(n)), padded, comp_last


def _arrange(columns: list, constant: torch.Tensor, comp_last: bool, batch: torch.Size) -> torch.Tensor:
    """Per-component columns over the data (plus a per-component constant) in the batch's
    order: components first, or last (a transposed view, not a copy)."""
    rows = torch.stack(columns) + constant.unsqueeze(-1)  # written row by row: (components, data)
    return (rows.T if comp_last else rows).reshape(batch)


def _per_component(fn: td.Distribution, value: torch.Tensor, params, events, max_blocks: Optional[int] = _MAX_BLOCKS):
    """``params`` (each with the event shape in ``events``) laid out one row per component,
    for a kernel over a value with one event dim, validated.

    :returns: ``(rows, batch, comp_last)`` (see :func:`_layout`), or ``None`` where a
        per-component kernel does not apply (or is no faster: small data, many components).
    """
    batch = broadcast_shapes(fn.batch_shape, value.shape[:-1])
    layout = _layout(batch, [p.shape[: p.dim() - len(e)] for p, e in zip(params, events)], value.shape[:-1])
    if value.numel() < _MIN_ELEMENTS or layout is None or (max_blocks and math.prod(layout[0]) > max_blocks):
        return None
    comp_shape, padded, comp_last = layout
    if fn._validate_args:
        fn._validate_sample(value)
    blocks = math.prod(comp_shape)
    rows = [
        p.reshape(b + p.shape[p.dim() - len(e):]).expand(comp_shape + e).reshape((blocks,) + e)
        for p, b, e in zip(params, padded, events)
    ]
    return rows, batch, comp_last


def _mvn_log_prob(fn: td.MultivariateNormal, value: torch.Tensor) -> Optional[torch.Tensor]:
    D = fn.event_shape[0]
    laid = _per_component(fn, value, [fn._unbroadcasted_scale_tril, compact(fn.loc)], [(D, D), (D,)])
    if laid is None:
        return None
    (L, loc), batch, comp_last = laid
    blocks = L.shape[0]
    xt = feature_major(value.reshape(-1, D))  # (D, N)
    eye = torch.eye(D, dtype=L.dtype, device=L.device).expand(blocks, D, D)
    precision_tril = torch.linalg.solve_triangular(L, eye, upper=False)  # L^-1
    shift = (precision_tril @ loc.unsqueeze(-1)).squeeze(-1)
    # Mahalanobis distances, one component at a time: |L^-1 x - L^-1 loc|^2, the squares summed
    # over the D rows by a matrix-vector product.
    half = torch.full((D,), -0.5, dtype=L.dtype, device=L.device)
    maha = [half @ torch.addmm(-shift[b].unsqueeze(-1), precision_tril[b], xt).pow_(2) for b in range(blocks)]
    const = -L.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 0.5 * D * math.log(2 * math.pi)
    return _arrange(maha, const, comp_last, batch)


def feature_major(x: torch.Tensor) -> torch.Tensor:
    """``x (N, D)`` as a contiguous ``(D, N)`` copy: matrix products over D long rows run 2 to
    5 times as fast as over N rows of D (a GMM's per-component products). Within a
    :func:`pyro_em.memo.scope` the copy of the last data seen is kept while that data lives
    and is not changed: an E-step, its M-step and the next step read the same data."""
    base = x if x._base is None else x._base
    key = (x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, base._version)
    store = memo.current()
    kept = store.get("feature_major") if store is not None else None
    if kept is not None and kept[0]() is base and kept[1] == key:
        return kept[2]
    copy = x.T.contiguous()
    if store is not None:
        def forget(ref: weakref.ref) -> None:  # (the data is gone: free its copy)
            if store.get("feature_major", (None,))[0] is ref:
                del store["feature_major"]

        store["feature_major"] = (weakref.ref(base, forget), key, copy)
    return copy


_KERNELS[td.MultivariateNormal] = _mvn_log_prob


# Categorical and Bernoulli given by probs: torch derives logits through ``clamp_probs``, so a
# probability of exactly 0 scores log(eps), not -inf, and a structural zero would leak into the
# posterior. These kernels take logs of the probs themselves. (Only without autograd: the
# gradient of log at 0 is infinite, and the E-step needs none.)


def _given_probs(fn: td.Distribution) -> bool:
    return "probs" in fn.__dict__ and not torch.is_grad_enabled()


def _categorical_log_prob(fn: td.Categorical, value: torch.Tensor) -> Optional[torch.Tensor]:
    if not _given_probs(fn):
        return None
    if fn._validate_args:
        fn._validate_sample(value)
    log_pmf = fn.probs.log()
    if log_pmf.dim() == 2 and value.dim() and value.shape[-1] == 1:
        # A table of K rows (a state's emission) at values broadcast over the states: whole
        # rows of the transposed table, one lookup per value, not one per value and state.
        rows = torch.index_select(log_pmf.T.contiguous(), 0, value.long().reshape(-1))
        return rows.view(value.shape[:-1] + log_pmf.shape[:1])
    value = value.long().unsqueeze(-1)
    value, log_pmf = torch.broadcast_tensors(value, log_pmf)
    return log_pmf.gather(-1, value[..., :1]).squeeze(-1)


def _bernoulli_log_prob(fn: td.Bernoulli, value: torch.Tensor) -> Optional[torch.Tensor]:
    if not _given_probs(fn):
        return None
    if fn._validate_args:
        fn._validate_sample(value)
    probs, value = torch.broadcast_tensors(fn.probs, value.to(fn.probs.dtype))
    return torch.xlogy(value, probs) + torch.xlogy(1 - value, 1 - probs)


def _sum_rightmost(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.reshape(t.shape[: t.dim() - dims] + (-1,)).sum(-1) if dims else t


def _bernoulli_family(base: td.Bernoulli):
    if not _given_probs(base):
        return None
    p = compact(base.probs)
    if bool(((p == 0) | (p == 1)).any()):  # 0 * log 0 must be 0, not NaN: elementwise
        return None
    return [p], lambda x: [x], lambda p: [p.log() - (-p).log1p()], lambda p: -(-p).log1p(), None


def _poisson_family(base: td.Poisson):
    rate = compact(base.rate)
    if bool((rate == 0).any()):
        return None
    return [rate], lambda x: [x], lambda rate: [rate.log()], lambda rate: rate, lambda x: -torch.lgamma(x + 1)


# Exponential families as matrix products: log p(x | theta) = sum_d [T(x_d) . eta(theta_d) -
# A(theta_d) + h(x_d)]. Each entry gives (params, T, eta, A, h or None) for a base distribution,
# or None where the elementwise kernel must be used.
_FAMILIES = {td.Bernoulli: _bernoulli_family, td.Poisson: _poisson_family}


def _diagonal_normal_log_prob(fn: td.Independent, value: torch.Tensor) -> Optional[torch.Tensor]:
    """A diagonal Normal, one component at a time as the MultivariateNormal kernel does (each
    N x D block in cache, no K x N x D tensor). Not by the expanded quadratic form
    ``x^2 / s^2 - 2 x m / s^2 + m^2 / s^2`` in matrix products: its cancellation costs digits
    wherever the data lie far from zero relative to the scales."""
    base = fn.base_dist
    D = fn.event_shape[0]
    laid = _per_component(fn, value, [compact(base.loc), compact(base.scale)], [(D,), (D,)])
    if laid is None:
        return None
    (loc, scale), batch, comp_last = laid
    blocks = loc.shape[0]
    x = value.reshape(-1, D).to(torch.promote_types(loc.dtype, value.dtype))
    inv = scale.reciprocal()
    maha = [((x - loc[b]) * inv[b]).pow_(2).sum(-1).mul_(-0.5) for b in range(blocks)]
    const = -scale.log().sum(-1) - 0.5 * D * math.log(2 * math.pi)
    return _arrange(maha, const, comp_last, batch)


def _independent_log_prob(fn: td.Independent, value: torch.Tensor) -> Optional[torch.Tensor]:
    """An exponential family over the last dim (Bernoulli pixels, Poisson counts: a mixture's
    emission) as matrix products, one column per component:
    ``sum_d log p(x_d) = T(x) @ eta^T - sum_d A + sum_d h(x)``, never the components x data x
    dims tensor. Other ``Independent`` sites sum their base's kernel."""
    base = fn.base_dist
    if isinstance(base, td.Normal) and fn.reinterpreted_batch_ndims == 1:
        result = _diagonal_normal_log_prob(fn, value)
        if result is not None:
            return result
    family = next((_FAMILIES[t] for t in type(base).__mro__ if t in _FAMILIES), None)
    spec = family(base) if family is not None and fn.reinterpreted_batch_ndims == 1 else None
    D = fn.event_shape[0] if fn.event_shape else 0
    laid = _per_component(fn, value, spec[0], [(D,)] * len(spec[0]), max_blocks=None) if spec else None
    if laid is None:
        return _sum_rightmost(log_prob(base, value), fn.reinterpreted_batch_ndims)
    _, stats, natural, normalizer, base_measure = spec
    params, batch, comp_last = laid
    dtype = torch.promote_types(params[0].dtype, value.dtype) if value.is_floating_point() else params[0].dtype
    params = [p.to(dtype) for p in params]
    # Over the data's columns (a feature-major copy, kept while the data lives): one long
    # row per component, twice as fast as one short row per datum.
    Xt = feature_major(value.reshape(-1, D)).to(dtype)  # (D, data)
    join = lambda ts, dim: ts[0] if len(ts) == 1 else torch.cat(ts, dim)  # noqa: E731
    eta = join(natural(*params), -1)  # (components, m D)
    Tt = join(stats(Xt), 0)  # (m D, data)
    result = torch.addmm(-normalizer(*params).sum(-1, keepdim=True), eta, Tt)  # (components, data)
    if base_measure is not None:
        result = result + base_measure(Xt).sum(0)
    return (result.T if comp_last else result).reshape(batch)


def _expanded_log_prob(fn: ExpandedDistribution, value: torch.Tensor) -> torch.Tensor:
    """The base's log density (by its kernel), broadcast as ``ExpandedDistribution`` does: never
    the base evaluated on the expanded parameters."""
    result = log_prob(fn.base_dist, value)
    return result.expand(broadcast_shapes(fn.batch_shape, result.shape))


def _masked_log_prob(fn: MaskedDistribution, value: torch.Tensor) -> torch.Tensor:
    """The base's log density (by its kernel), zero where masked, as ``MaskedDistribution``."""
    result = log_prob(fn.base_dist, value)
    if fn._mask is False:
        return torch.zeros_like(result)
    return result if fn._mask is True else torch.where(fn._mask, result, result.new_zeros(()))


_KERNELS[td.Categorical] = _categorical_log_prob
_KERNELS[td.Bernoulli] = _bernoulli_log_prob
_KERNELS[td.Independent] = _independent_log_prob
_KERNELS[ExpandedDistribution] = _expanded_log_prob
_KERNELS[MaskedDistribution] = _masked_log_prob
