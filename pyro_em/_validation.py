"""Input checks whose messages name the culprit (site or argument) and say how to fix it."""

import math
from typing import Mapping

import torch
from pyro.poutine.trace_struct import Trace

#: ``site["infer"]`` key marking a latent site that EM estimates as a point (MAP) value.
MAP_FLAG = "_em_map"


def check_enumerated_trace(trace: Trace) -> None:
    """Check that every latent site was enumerated and every observation is finite."""
    sample_sites = [s for s in trace.nodes.values() if s["type"] == "sample"]
    if not sample_sites:
        raise ValueError("The model has no pyro.sample sites: there is nothing to fit by EM.")
    for site in sample_sites:
        name, fn = site["name"], site["fn"]
        if site["infer"].get(MAP_FLAG):
            continue
        if site["is_observed"]:
            value = site["value"]
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and not bool(torch.isfinite(value).all())
            ):
                raise ValueError(
                    f"Observed site '{name}' has NaN or inf values. Replace missing entries by "
                    "any finite placeholder and hide them with poutine.mask(mask=...) or the "
                    "site's obs_mask argument."
                )
            continue
        if "_enumerate_dim" in site["infer"]:
            continue
        how = site["infer"].get("enumerate")
        if fn.has_enumerate_support:
            raise ValueError(
                f"Latent site '{name}' is marked infer={{'enumerate': {how!r}}}; EM sums out "
                "discrete latents by parallel enumeration. Remove the mark or set it to 'parallel'."
            )
        if fn.support.is_discrete:
            raise ValueError(
                f"Latent site '{name}' has a discrete distribution with unbounded support "
                f"({type(fn).__name__}), which cannot be enumerated. Truncate it to a finite "
                "range, e.g. pyro.sample(name, dist.Categorical(logits=...)) over 0..K-1 with "
                "the original log probabilities, or observe it."
            )
        raise ValueError(
            f"Latent site '{name}' is continuous and was not replaced by a point estimate; "
            "run the model through pyro_em.EM, which estimates such sites by MAP."
        )


def explain_bad_log_z(trace: Trace, terms: Mapping[str, torch.Tensor], log_z: torch.Tensor) -> str:
    """A message for a non-finite log marginal likelihood, naming the offending sites."""
    nan_sites = [n for n, t in terms.items() if bool(torch.isnan(t).any())]
    if nan_sites:
        return (
            f"The log density of site(s) {_names(nan_sites)} is NaN at the current parameters; "
            "check those sites' parameters (e.g. a scale that is zero or negative)."
        )
    if log_z > 0:
        inf_sites = [n for n, t in terms.items() if bool((t == math.inf).any())]
        return (
            f"The log density of site(s) {_names(inf_sites)} is +inf: a distribution has "
            "collapsed onto a data point (e.g. a zero scale or a singular covariance). Add a "
            "prior or a lower bound on that scale."
        )
    neg_sites = [n for n, t in terms.items() if bool((t == -math.inf).any())]
    return (
        "The log marginal likelihood is -inf: no completion of the latent variables explains "
        f"the observations under the current parameters (sites with zero density: "
        f"{_names(neg_sites)}). Check the data against the model's supports and initial values."
    )


def _names(names) -> str:
    return ", ".join(f"'{n}'" for n in names) or "none found"


def check_fit_args(max_iter: int, tol: float) -> None:
    """Validate :meth:`pyro_em.EM.fit` arguments."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}.")


def check_params_finite(params: Mapping[str, torch.Tensor]) -> None:
    """Check unconstrained parameter values before an M-step moves them. ``-inf`` is allowed:
    it is how a probability of exactly 0 (a structural zero, as in a left-right HMM's
    transitions) is held in a simplex or logits param."""
    for name, p in params.items():
        if bool(torch.isnan(p).any() or (p == math.inf).any()):
            raise ValueError(
                f"Param '{name}' has a NaN or +inf unconstrained value: its value is NaN or lies "
                "on a boundary of its constraint that it cannot keep (e.g. a probability of "
                "exactly 1 in a unit_interval param). Initialize it strictly inside."
            )
