"""Posterior marginals of enumerated latent sites, read off an E-step."""

from typing import Dict

import torch
from pyro.distributions import DiscreteHMM
from pyro.ops import packed

from .closed_form import unwrap
from .estep import EStep, align, enum_symbols
from .hmm import forward_backward


def site_marginals(estep: EStep, max_plate_nesting: int, smooth_hmm: bool = True) -> Dict[str, torch.Tensor]:
    """The posterior marginal ``p(z | x)`` of every enumerated latent site, and the smoothed
    state marginals ``(..., T, K)`` of every :class:`~pyro.distributions.DiscreteHMM` site.

    :param estep: the result of :func:`~pyro_em.estep.e_step`.
    :param max_plate_nesting: the model's plate nesting, as used in the E-step.
    :param smooth_hmm: include the DiscreteHMM sites' smoothed marginals (a forward-backward
        pass each).
    :returns: ``{name: probs}`` where ``probs`` has the site's plate dims (as a batch shape
        would) followed by one dim over the site's values, in the order of
        ``site["fn"].enumerate_support()``; each row sums to one, except where the site is
        masked out (``poutine.mask``, or the ``*_unobserved`` half of ``obs_mask``): zero there.
    """
    trace = estep.trace
    sum_dims = enum_symbols(trace)
    marginals = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        fn, value, _ = unwrap(site["fn"], site["value"], None)
        if isinstance(fn, DiscreteHMM):
            if smooth_hmm:
                marginals[name] = forward_backward(fn, value).observation
            continue
        if "_enumerate_symbol" not in site["infer"]:
            continue
        own = site["infer"]["_enumerate_symbol"]
        w = estep.weights[name]
        other = [i for i, d in enumerate(w._pyro_dims) if d in sum_dims and d != own]
        probs = w.sum(other) if other else w
        probs._pyro_dims = "".join(d for i, d in enumerate(w._pyro_dims) if i not in other)
        probs = _unscaled(probs, estep.scale)
        probs = packed.unpack(probs, trace.symbol_to_dim)
        # Restore size-1 dims that packing dropped, then move the site's enumeration dim to
        # the right of the plate dims.
        enum_dim = site["infer"]["_enumerate_dim"]
        probs = probs.reshape((1,) * max(0, -enum_dim - probs.dim()) + probs.shape)
        probs = probs.unsqueeze(-1).transpose(-1, enum_dim - 1)
        num_plates = -min((f.dim for f in site["cond_indep_stack"] if f.vectorized), default=0)
        probs = probs.reshape(probs.shape[-(max_plate_nesting + 1) :])
        marginals[name] = probs.reshape(probs.shape[max_plate_nesting - num_plates :])
    return marginals


def _unscaled(probs: torch.Tensor, scale) -> torch.Tensor:
    """Divide a site's weights by the scale they carry (per-datum weights included)."""
    if isinstance(scale, float):
        result = probs / scale
    else:
        scale = align(scale, probs._pyro_dims)
        result = torch.where(scale > 0, probs / scale, probs.new_zeros(()))
    result._pyro_dims = probs._pyro_dims
    return result
