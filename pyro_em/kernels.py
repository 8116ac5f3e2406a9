"""Log densities for the E-step: ``fn.log_prob(value)``, with faster kernels where the generic
implementation is memory-bound or does more work than needed.

A mixture's emission is evaluated for every component at every data point, a K x N batch.
``MultivariateNormal.log_prob`` does that in several passes over a K x N x D tensor; the
kernel here instead loops over the components (as scikit-learn does), so each N x D block
stays in cache, and whitens with the inverse Cholesky factor by a matrix product.
``DiscreteHMM`` uses the scaled forward pass of :mod:`pyro_em.hmm` (work T K^2, not the
parallel scan's T K^3) when no gradient is needed. ``Independent`` Bernoulli pixels are one
matrix product; other ``Independent`` sites sum their base's kernel. Kernels return ``None``
where they do not apply, and the distribution's own ``log_prob`` is used.
"""

import math
from typing import Callable, Dict, Optional

import torch
import torch.distributions as td

from pyro.distributions import DiscreteHMM

from .hmm import hmm_log_prob
from .tracking import compact

_KERNELS: Dict[type, Callable] = {}
_MIN_ELEMENTS = 1 << 14  # below this, the generic log_prob is as fast
_MAX_BLOCKS = 1024


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

    :returns: ``(comp_shape, padded param shapes)``, ``comp_shape`` having the batch's size on
        component dims and 1 elsewhere; ``None`` unless every component dim lies left of every
        data dim and no batch dim is of neither kind.
    """
    n = len(batch)
    padded = [_pad(shape, n) for shape in param_shapes]
    x_b = _pad(value_shape, n)
    comp = [i for i in range(n) if any(p[i] > 1 for p in padded)]
    data = [i for i in range(n) if x_b[i] > 1]
    if comp and data and max(comp) >= min(data):
        return None
    if any(batch[i] > 1 and i not in comp and i not in data for i in range(n)):
        return None
    return tuple(batch[i] if i in comp else 1 for i in range(n)), padded


def _mvn_log_prob(fn: td.MultivariateNormal, value: torch.Tensor) -> Optional[torch.Tensor]:
    D = fn.event_shape[0]
    L = fn._unbroadcasted_scale_tril
    loc = compact(fn.loc)
    batch = torch.broadcast_shapes(fn.batch_shape, value.shape[:-1])
    layout = _layout(batch, [L.shape[:-2], loc.shape[:-1]], value.shape[:-1])
    if value.numel() < _MIN_ELEMENTS or layout is None or math.prod(layout[0]) > _MAX_BLOCKS:
        return None
    comp_shape, (L_b, loc_b) = layout
    blocks = math.prod(comp_shape)
    if fn._validate_args:
        fn._validate_sample(value)
    L = L.reshape(L_b + (D, D)).expand(comp_shape + (D, D)).reshape(blocks, D, D)
    loc = loc.reshape(loc_b + (D,)).expand(comp_shape + (D,)).reshape(blocks, D)
    x = value.reshape(-1, D)
    eye = torch.eye(D, dtype=L.dtype, device=L.device).expand(blocks, D, D)
    precision_tril_t = torch.linalg.solve_triangular(L, eye, upper=False).mT.contiguous()  # L^-T
    shift = (loc.unsqueeze(-2) @ precision_tril_t).squeeze(-2)
    # Mahalanobis distances, one component at a time: |x L^-T - loc L^-T|^2.
    maha = torch.stack([torch.addmm(-shift[b], x, precision_tril_t[b]).square_().sum(-1) for b in range(blocks)])
    half_log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    result = -0.5 * (D * math.log(2 * math.pi) + maha) - half_log_det.unsqueeze(-1)
    return result.reshape(batch)


def _hmm_log_prob(fn: DiscreteHMM, value: torch.Tensor) -> Optional[torch.Tensor]:
    # Under autograd, Pyro's parallel scan (a graph log T deep) suits better than T steps.
    return None if torch.is_grad_enabled() else hmm_log_prob(fn, value)


_KERNELS[td.MultivariateNormal] = _mvn_log_prob
_KERNELS[DiscreteHMM] = _hmm_log_prob


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
    value = value.long().unsqueeze(-1)
    value, log_pmf = torch.broadcast_tensors(value, fn.probs.log())
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


def _independent_log_prob(fn: td.Independent, value: torch.Tensor) -> Optional[torch.Tensor]:
    """Independent Bernoulli pixels (a Bernoulli mixture's emission) as one matrix product:
    ``sum_d log p(x_d) = x @ logit(p)^T + sum_d log(1 - p_d)``, one column per component, never
    the components x data x pixels tensor. Probabilities of exactly 0 or 1 take the
    elementwise kernel (0 * log 0 must be 0, not NaN)."""
    base = fn.base_dist
    if fn.reinterpreted_batch_ndims != 1 or not isinstance(base, td.Bernoulli) or not _given_probs(base):
        return _sum_rightmost(log_prob(base, value), fn.reinterpreted_batch_ndims)
    probs = compact(base.probs)
    D = probs.shape[-1]
    batch = torch.broadcast_shapes(fn.batch_shape, value.shape[:-1])
    layout = _layout(batch, [probs.shape[:-1]], value.shape[:-1])
    if value.numel() < _MIN_ELEMENTS or layout is None or bool(((probs == 0) | (probs == 1)).any()):
        return _sum_rightmost(log_prob(base, value), 1)
    comp_shape, (p_b,) = layout
    if fn._validate_args:
        fn._validate_sample(value)
    P = probs.reshape(p_b + (D,)).expand(comp_shape + (D,)).reshape(-1, D)
    X = value.reshape(-1, D).to(P.dtype)
    log_1mp = (-P).log1p()
    result = torch.addmm(log_1mp.sum(-1), X, (P.log() - log_1mp).T)  # (data, components)
    return result.T.reshape(batch)


_KERNELS[td.Categorical] = _categorical_log_prob
_KERNELS[td.Bernoulli] = _bernoulli_log_prob
_KERNELS[td.Independent] = _independent_log_prob
