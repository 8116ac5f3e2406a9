"""E-step: exact posterior marginals of every factor of a Pyro model.

The model is traced once under :class:`~pyro.poutine.enum_messenger.EnumMessenger`, so every
discrete latent site holds all of its values along a dimension of its own. Each sample site
contributes one *term*, its packed log density. :func:`log_marginal` contracts the terms with
:func:`pyro.ops.contract.contract_tensor_tree` (sum over enumerated dims in log space, product
over plates), giving the log marginal likelihood ``log Z``. Because
``d log Z / d log f(z) = p(z | x)`` for every factor ``f``, one backward pass through that
contraction yields the exact posterior marginal of every factor at once: responsibilities for a
mixture, pairwise ``(z[t-1], z[t])`` marginals for a transition factor, and so on.
"""

import functools
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple

import torch
import pyro.poutine as poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import config_enumerate
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.rings import MapRing
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

from . import hmm, kernels  # noqa: F401 (hmm registers DiscreteHMM's forward pass as a kernel)
from .tracking import broadcast_shapes
from ._validation import check_enumerated_trace, explain_bad_log_z, explain_log_prob_error, model_errors


@dataclass
class EStep:
    """Result of an E-step at fixed parameters.

    :ivar torch.Tensor log_z: log marginal likelihood of the observations (scaled as the model
        says, plus the log prior density of MAP sites), a detached scalar.
    :ivar Trace trace: the enumerated trace; ``trace.nodes[name]`` holds each site's ``fn``,
        ``value``, plates and enumeration info.
    :ivar dict weights: for each sample site, ``d log Z / d term``, a packed tensor of the shape
        of the site's packed unscaled log density. It is the posterior marginal of the
        enumerated values the term depends on, times the site's scale and mask: the weight of
        each term in the expected complete-data log likelihood ``Q``. (An enumerated site
        enters ``log Z`` unmasked, as in ``TraceEnum_ELBO``; its weight is masked all the same.)
    :ivar scale: the common :func:`~pyro.poutine.scale` of the enumerated factors: a number,
        or a packed tensor of per-datum weights.
    """

    log_z: torch.Tensor
    trace: Trace
    weights: Dict[str, torch.Tensor]
    scale: Any


def enum_model(model: Callable, first_available_dim: int) -> Callable:
    """Wrap ``model`` so that every discrete latent site is enumerated in parallel.

    Existing ``infer={"enumerate": ...}`` marks are kept (see :func:`config_enumerate`).
    """
    return poutine.enum(config_enumerate(model, default="parallel"), first_available_dim)


def trace_model(model: Callable, args: tuple, kwargs: dict, first_available_dim: int, shapes_only: bool = False,
                subsample: bool = False, record: bool = False) -> Trace:
    """Trace ``model`` with parallel enumeration and compute packed log densities.

    :param shapes_only: give each site a log density of the right shape made of zeros (a
        broadcast view: no memory, no work), for analyses that need the trace's structure only.
    :param subsample: allow plates that subsample (stepwise EM).
    :param record: for a run that :mod:`pyro_em.program` captures: no checks, and each site's
        own ``log_prob`` (the kernels choose their path by looking at values).
    :raises ValueError: if a latent site cannot be enumerated or an observation is not finite.
    """
    with model_errors(args, kwargs):
        trace = poutine.trace(enum_model(model, first_available_dim)).get_trace(*args, **kwargs)
    if shapes_only:
        return pack_shapes(trace, subsample)
    trace = prune_subsample_sites(trace)
    if not record:
        check_enumerated_trace(trace, subsample)
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            fn, value = site["fn"], site["value"]
            try:
                lp = kernels.log_prob(fn, value) if not (site["args"] or site["kwargs"] or record) else (
                    fn.log_prob(value, *site["args"], **site["kwargs"])
                )
            except (ValueError, IndexError, RuntimeError) as e:
                raise ValueError(explain_log_prob_error(name, fn, value, e)) from e
            site["unscaled_log_prob"] = lp
            site["log_prob"] = scale_and_mask(lp, site["scale"], site["mask"])
    trace.pack_tensors()
    return trace


def pack_shapes(trace: Trace, subsample: bool = False) -> Trace:
    """``trace`` (from an enumerated run of the model) checked and packed with log densities of
    the right shapes made of zeros (broadcast views: no memory, no work), for analyses that
    need its structure only (see :func:`trace_model`)."""
    trace = prune_subsample_sites(trace)
    check_enumerated_trace(trace, subsample)
    for site in trace.nodes.values():
        if site["type"] == "sample":
            fn, value = site["fn"], site["value"]
            shape = broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - fn.event_dim])
            zeros = torch.zeros((), dtype=torch.get_default_dtype(), device=value.device)
            site["unscaled_log_prob"] = site["log_prob"] = zeros.expand(shape)
    trace.pack_tensors()
    return trace


def site_terms(trace: Trace) -> "OrderedDict[str, torch.Tensor]":
    """Each sample site's packed, unscaled and unmasked log density."""
    return OrderedDict(
        (name, site["packed"]["unscaled_log_prob"])
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    )


def enum_symbols(trace: Trace) -> set:
    """The packed symbols of the trace's enumerated dims."""
    return {
        site["infer"]["_enumerate_symbol"]
        for site in trace.nodes.values()
        if site["type"] == "sample" and "_enumerate_symbol" in site["infer"]
    }


def packed_scale(site: dict):
    """A site's :func:`~pyro.poutine.scale` as a number, or as a packed tensor over its plates
    (per-datum weights)."""
    scale = site["scale"]
    if isinstance(scale, torch.Tensor) and scale.dim():
        return packed.pack(scale, site["infer"]["_dim_to_symbol"])
    return float(scale)


def _common_scale(trace: Trace, names):
    scales = {}
    for name in names:
        scale = packed_scale(trace.nodes[name])
        key = scale if isinstance(scale, float) else (scale._pyro_dims, tuple(scale.shape), scale.cpu().numpy().tobytes())
        scales.setdefault(key, (name, scale))
    if len(scales) > 1:
        raise ValueError(
            "Sites that depend on enumerated latents must share one poutine.scale, but "
            + ", ".join(f"'{n}' has {f'{s:g}' if isinstance(s, float) else 'a tensor'}" for n, s in scales.values())
            + "."
        )
    return next(iter(scales.values()), (None, 1.0))[1]


def _scaled(term: torch.Tensor, scale, what: str) -> torch.Tensor:
    """``scale * term`` for a packed ``term`` and a number or packed tensor ``scale``."""
    if isinstance(scale, float):
        return term * scale
    if not set(scale._pyro_dims) <= set(term._pyro_dims):
        raise ValueError(
            f"A per-datum poutine.scale at {what} needs every enumerated latent those sites "
            "depend on to lie inside the scale's plates: a datum's weight applies to its own "
            "log marginal likelihood. Move the latent inside the plate, or use a scalar scale."
        )
    return term * align(scale, term._pyro_dims)


def log_marginal(trace: Trace, terms: Mapping[str, torch.Tensor], temperature: int = 1) -> Tuple[torch.Tensor, Any]:
    """Sum out every enumerated latent: ``log Z`` as a differentiable function of ``terms``.

    :param trace: a trace from :func:`trace_model`, giving each site's plates, mask and scale.
    :param terms: packed unscaled log density of each sample site (e.g. :func:`site_terms`).
    :param temperature: 1 to sum over the latents' values (log-sum-exp); 0 to maximize
        (max-product, Pyro's :class:`~pyro.ops.rings.MapRing`): the log density of the joint
        MAP completion, whose gradient is the indicator of that completion (hard EM).
    :returns: ``(log_z, scale)``, the 0-dim log marginal likelihood and the common scale of the
        sites that depend on enumerated latents (a number, or a packed tensor of per-datum
        weights).
    """
    sum_dims = enum_symbols(trace)
    tree = OrderedDict()
    independent = []
    for name, term in terms.items():
        site = trace.nodes[name]
        mask = site["packed"]["mask"]
        mask_dims = mask._pyro_dims if isinstance(mask, torch.Tensor) else ""
        if sum_dims.isdisjoint(term._pyro_dims + mask_dims):
            term = packed.scale_and_mask(term, mask=mask)
            independent.append(_scaled(term, packed_scale(site), f"site '{name}'"))
            continue
        if "_enumerate_symbol" in site["infer"]:
            term = _masked_gradient(term, mask)
        else:
            # Masks apply inside the log expectation, the scale outside (as in TraceEnum_ELBO).
            term = packed.scale_and_mask(term, mask=mask)
        ordinal = frozenset(
            trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
        )
        tree.setdefault(ordinal, []).append((name, term))

    sums = [t.sum() for t in independent]
    names = [n for ts in tree.values() for n, _ in ts]
    scale = _common_scale(trace, names)
    if tree:
        # (a model may mix float32 and float64 sites: each term in the widest of their dtypes)
        dtype = functools.reduce(torch.promote_types, [t.dtype for ts in tree.values() for _, t in ts])
        tree = OrderedDict((o, [_as_dtype(t, dtype) for _, t in ts]) for o, ts in tree.items())
        contracted = contract_tensor_tree(tree, sum_dims, ring=MapRing() if temperature == 0 else None)
        what = "sites " + ", ".join(f"'{n}'" for n in names)
        sums.append(_total(_scaled(t, scale, what).sum() for ts in contracted.values() for t in ts))
    return _total(sums), scale


def _as_dtype(term: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if term.dtype == dtype:
        return term
    out = term.to(dtype)
    out._pyro_dims = term._pyro_dims
    return out


def _total(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of 0-dim tensors, keeping their device and dtype."""
    return functools.reduce(operator.add, tensors)


def _masked_gradient(term: torch.Tensor, mask) -> torch.Tensor:
    """An enumerated site's term as ``log Z`` sees it: unmasked in value (its factor sums to
    one, as in TraceEnum_ELBO) but with gradient only where the mask is on, so that
    ``d log Z / d term`` is the posterior weight of the site's data, zero where it is absent.
    The result has the dims of ``term`` and ``mask`` together (see :func:`_leaf`)."""
    if mask is None or mask is True:
        return term
    if mask is False:
        return term.detach()
    term, mask = packed.broadcast_all(term, mask)
    result = torch.where(mask, term, term.detach())
    result._pyro_dims = term._pyro_dims
    return result


def _leaf(term: torch.Tensor, site: dict, requires_grad: bool = True) -> torch.Tensor:
    """A leaf standing for ``term`` in :func:`log_marginal`, whose gradient is the site's
    posterior weight. An enumerated site whose mask depends on other dims (another latent's
    value, a plate the site does not vary along) gets a leaf over the dims of both, so that
    its weight is the joint posterior restricted to the mask, not a product of marginals."""
    mask, dims = site["packed"]["mask"], term._pyro_dims
    leaf = term.detach()
    if "_enumerate_symbol" in site["infer"] and isinstance(mask, torch.Tensor):
        broadcast = packed.broadcast_all(term, mask)[0]
        leaf, dims = broadcast.detach().clone(), broadcast._pyro_dims
    leaf.requires_grad_(requires_grad)
    leaf._pyro_dims = dims
    return leaf


def align(tensor: torch.Tensor, dims: str) -> torch.Tensor:
    """A packed ``tensor`` permuted and reshaped to broadcast against the packed dims ``dims``
    (a superset of its own): packed dims are named by symbols, never by position.

    :raises ValueError: if ``tensor`` has a dim that ``dims`` lacks.
    """
    own = tensor._pyro_dims
    if own == dims:
        return tensor
    missing = set(own) - set(dims)
    if missing:
        raise ValueError(f"packed dims {sorted(missing)} are not among {dims!r}")
    order = [own.index(d) for d in dims if d in own]
    sizes = dict(zip(own, tensor.shape))
    return tensor.permute(order).reshape(tuple(sizes.get(d, 1) for d in dims))


def e_step(model: Callable, args: tuple, kwargs: Dict[str, Any], first_available_dim: int, temperature: int = 1,
           subsample: bool = False) -> EStep:
    """Run the E-step: ``log Z`` and the posterior weight of every factor of ``model``.

    :param model: a Pyro model (MAP sites already replaced by params, see
        :class:`~pyro_em.map.MapMessenger`).
    :param args: positional arguments of the model.
    :param kwargs: keyword arguments of the model.
    :param first_available_dim: the first dim free for enumeration, ``-max_plate_nesting - 1``.
    :param temperature: 1 for posterior marginals (EM); 0 for the indicator of the joint MAP
        completion of the latents (hard EM, as k-means), ``log_z`` then being its log density.
    :param subsample: allow plates that subsample (stepwise EM).
    :returns: an :class:`EStep`.
    :raises ValueError: if the data are impossible (``log Z = -inf``) or a log density is NaN.
    """
    with torch.no_grad():  # the E-step needs no graph from the parameters to the terms
        trace = trace_model(model, args, kwargs, first_available_dim, subsample=subsample)
    transformed = torch._C._functorch.maybe_current_level() is not None  # (runs stepped together)
    leaves = OrderedDict((name, _leaf(t, trace.nodes[name], not transformed)) for name, t in site_terms(trace).items())
    if transformed:  # autograd's leaves cannot be made there: torch.func's reverse pass
        log_z, scale, grads = _vjp_log_marginal(trace, leaves, temperature)
    else:
        with torch.enable_grad():
            log_z, scale = log_marginal(trace, leaves, temperature)
            if not torch.isfinite(log_z):
                raise ValueError(explain_bad_log_z(trace, leaves, log_z))
            if log_z.requires_grad:
                grads = torch.autograd.grad(log_z, list(leaves.values()), allow_unused=True)
            else:  # every site is masked out
                grads = [None] * len(leaves)
    weights = {}
    for (name, leaf), g in zip(leaves.items(), grads):
        w = torch.zeros_like(leaf) if g is None else g
        w._pyro_dims = leaf._pyro_dims
        weights[name] = w
    return EStep(log_z.detach(), trace, weights, scale)


def _vjp_log_marginal(trace: Trace, leaves: "OrderedDict[str, torch.Tensor]", temperature: int):
    """``log Z``, its scale and its gradient in each leaf, by :func:`torch.func.vjp` (inside a
    functorch transform: :func:`torch.func.vmap` over runs, :mod:`pyro_em.batched`)."""
    names = list(leaves)

    def marginal(*values):
        for value, leaf in zip(values, leaves.values()):
            value._pyro_dims = leaf._pyro_dims
        log_z, scale = log_marginal(trace, OrderedDict(zip(names, values)), temperature)
        return log_z, scale

    with torch.enable_grad():
        log_z, pullback, scale = torch.func.vjp(marginal, *leaves.values(), has_aux=True)
    if not torch.isfinite(log_z):
        raise ValueError(explain_bad_log_z(trace, leaves, log_z))
    return log_z, scale, pullback(torch.ones_like(log_z))


def expected_log_joint(estep: EStep, trace: Trace) -> torch.Tensor:
    """``Q = sum_f <w_f, log f>``: the expected complete-data log density of a new trace.

    ``trace`` must come from :func:`trace_model` on the same model and data as ``estep``, under
    new parameters; terms where the posterior weight is zero are skipped, so structural zeros
    (``log f = -inf`` where ``p(z | x) = 0``) contribute nothing rather than NaN.
    """
    parts = []
    terms = site_terms(trace)
    if set(terms) != set(estep.weights):
        raise RuntimeError(
            "The model's structure changed between the E-step and the M-step: "
            + "; ".join(
                f"{what} site(s) {', '.join(repr(n) for n in sorted(names)[:5])}"
                for what, names in (("new", set(terms) - set(estep.weights)), ("missing", set(estep.weights) - set(terms)))
                if names
            )
            + ". EM needs a model whose sites do not depend on its parameter values (a loop "
            "or branch on a param's value, say): write the choice as a latent site, or fix it."
        )
    for name, term in terms.items():
        w = estep.weights[name]
        try:
            term = align(term, w._pyro_dims)
            broadcast_shapes(term.shape, w.shape)
        except (ValueError, RuntimeError):
            raise RuntimeError(
                f"Site '{name}' changed shape between the E-step (dims {w._pyro_dims!r}, shape "
                f"{tuple(w.shape)}) and the M-step (dims {term._pyro_dims!r}, shape "
                f"{tuple(term.shape)}); EM needs a model whose structure does not depend on its "
                "parameter values."
            ) from None
        positive = w > 0
        parts.append((w * torch.where(positive, term, term.new_zeros(()))).sum())
    return _total(parts)
