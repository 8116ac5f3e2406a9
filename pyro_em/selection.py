"""Model selection and decoding after a fit: free parameters, BIC and AIC, joint MAP values.

Free parameters are counted from each fitted param's shape and constraint, the way
scikit-learn and hmmlearn count them: a simplex of K entries has K - 1, a ``lower_cholesky`` or
``positive_definite`` D x D matrix has D (D + 1) / 2, a correlation Cholesky factor
D (D - 1) / 2, anything else one per element. A MAP-estimated site counts like a param (its
value is one).
"""

from typing import Dict, Iterable

import torch
from pyro.distributions import DiscreteHMM
from pyro.distributions import constraints

from ._validation import MAP_FLAG, base_constraint
from .closed_form import unwrap
from .estep import EStep
from .hmm import viterbi
from .posterior import site_marginals


def free_parameters(value: torch.Tensor, constraint) -> int:
    """The number of free parameters of a param with this value and constraint."""
    c = base_constraint(constraint)
    if c is constraints.simplex:
        return value.numel() - value.numel() // value.shape[-1]
    if c in (constraints.lower_cholesky, constraints.positive_definite, constraints.positive_semidefinite):
        D = value.shape[-1]
        return value.numel() // (D * D) * D * (D + 1) // 2
    if c in (constraints.corr_cholesky, constraints.corr_matrix):
        D = value.shape[-1]
        return value.numel() // (D * D) * D * (D - 1) // 2
    return value.numel()


def count_free_parameters(store, names: Iterable[str]) -> int:
    """Free parameters of the params ``names`` in Pyro's param ``store``."""
    return sum(free_parameters(store[n].detach(), store._constraints[n]) for n in names)


def count_observations(estep: EStep) -> int:
    """The number of observations, as scikit-learn and hmmlearn count samples: the unmasked
    batch elements of every observed site (a DiscreteHMM contributes each of its steps)."""
    total = 0
    for site in estep.trace.nodes.values():
        if site["type"] != "sample" or not site["is_observed"] or site["infer"].get(MAP_FLAG):
            continue
        fn, value, mask = site["fn"], site["value"], site["mask"]
        plates = {f.dim: f.size for f in site["cond_indep_stack"] if f.vectorized}
        count = 0 if mask is False else int(torch.tensor(list(plates.values()), dtype=torch.long).prod())
        if isinstance(mask, torch.Tensor):
            # Count over the plates only (a mask may also vary along enumerated dims).
            rank = max([mask.dim()] + [-d for d in plates])
            mask = mask.reshape((1,) * (rank - mask.dim()) + mask.shape)
            other = [d for d in range(-mask.dim(), 0) if d not in plates and mask.shape[d] > 1]
            mask = mask.any(dim=other, keepdim=True) if other else mask
            count = int(mask.expand(tuple(plates.get(d, 1) for d in range(-mask.dim(), 0))).sum())
        if isinstance(unwrap(fn, value, None)[0], DiscreteHMM):
            count *= value.shape[value.dim() - fn.event_dim]
        total += count
    return total


def log_likelihood(estep: EStep) -> float:
    """The E-step's ``log_z`` without the (scaled, masked) log prior of the MAP sites."""
    return float(estep.log_z) - sum(
        float(site["log_prob"].sum())
        for site in estep.trace.nodes.values()
        if site["type"] == "sample" and site["infer"].get(MAP_FLAG)
    )


def decode(estep: EStep, max_plate_nesting: int) -> Dict[str, torch.Tensor]:
    """The joint MAP value of every enumerated site, from a temperature-0 E-step (whose weights
    are the indicator of that completion), and the Viterbi path of every DiscreteHMM site.

    :returns: ``{site: value}``, each with the site's plate shape (values from
        ``enumerate_support``); a DiscreteHMM site gives its ``(..., T)`` state path.
    """
    result = {}
    indicators = site_marginals(estep, max_plate_nesting, smooth_hmm=False)
    for name, site in estep.trace.nodes.items():
        if site["type"] != "sample":
            continue
        fn, value, _ = unwrap(site["fn"], site["value"], None)
        if isinstance(fn, DiscreteHMM):
            result[name] = viterbi(fn, value)
        elif name in indicators:
            support = site["fn"].enumerate_support(expand=False).reshape(-1)
            result[name] = support[indicators[name].argmax(-1)]
    return result
