"""Input checks whose messages name the culprit (site or argument) and say how to fix it."""

import math
import numbers
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Tuple

import torch
from pyro.distributions import constraints
from torch.distributions import constraints as torch_constraints
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace

#: ``site["infer"]`` key marking a latent site that EM estimates as a point (MAP) value.
MAP_FLAG = "_em_map"
INTEGRATED_FLAG = "_em_integrated"  # the unobserved half of obs_mask, integrated out


def check_enumerated_trace(trace: Trace, subsample: bool = False) -> None:
    """Check that every latent site was enumerated and every observation is finite (and, unless
    ``subsample``, that no plate subsamples)."""
    sample_sites = [s for s in trace.nodes.values() if s["type"] == "sample"]
    if not sample_sites:
        raise ValueError("The model has no pyro.sample sites: there is nothing to fit by EM.")
    if not any(s["is_observed"] and not s["infer"].get(MAP_FLAG) for s in sample_sites):
        raise ValueError(
            "The model has no observed site (pyro.sample(name, fn, obs=data)): EM has no data "
            "to fit. Was a guide passed in place of the model? EM(model) needs the model only."
        )
    for site in sample_sites:
        for f in site["cond_indep_stack"]:
            if not subsample and subsampled(f):
                raise ValueError(
                    f"{subsampled(f)}: an EM step needs every datum of the plate at once. Remove "
                    "the subsampling and pass the data in full, or fit by stepwise EM (OnlineEM)."
                )
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
                    f"Observed site '{name}' has NaN or inf values. If NaN marks missing entries, "
                    "fit with EM(model, nan_policy='omit'), which integrates them out (Normal, "
                    "MultivariateNormal and other elementwise families); or replace them by a "
                    "finite placeholder and hide them with poutine.mask(mask=...) or obs_mask."
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
    for name, site in trace.nodes.items():
        value = site["value"] if site["type"] == "sample" and site["is_observed"] else None
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            big = float(value.abs().max())
            if big > torch.finfo(value.dtype).max ** 0.5:
                return (
                    f"The log density of site '{name}' overflowed: its values reach {big:.3g}, "
                    f"whose square exceeds the {value.dtype} range (so log densities become "
                    "infinite). Rescale the data, e.g. standardize them."
                )
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
            "collapsed onto a data point (e.g. a zero scale or a singular covariance). Set "
            "reg_covar > 0 (EM(model, reg_covar=1e-6)), add a prior, or bound that scale below."
        )
    neg_sites = [n for n, t in terms.items() if bool((t == -math.inf).any())]
    return (
        "The log marginal likelihood is -inf: no completion of the latent variables explains "
        f"the observations under the current parameters (sites with zero density somewhere: "
        f"{_names(neg_sites)}). A probability of exactly 0 stays 0 under EM, so data that need "
        "it are impossible. Check the data against the model's supports and initial values."
    )


def structure(trace: Trace) -> tuple:
    """What must not change from step to step: each sample site's name, value shape and
    plates (names and sizes)."""
    return tuple(
        (name, tuple(site["value"].shape) if isinstance(site["value"], torch.Tensor) else (),
         tuple((f.name, f.size) for f in site["cond_indep_stack"]))
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    )


def structure_change(before: tuple, after: tuple) -> Optional[str]:
    """How two :func:`structure` s differ, at their first differing site, or ``None``."""
    if before == after:
        return None
    old, new = dict((s[0], s[1:]) for s in before), dict((s[0], s[1:]) for s in after)
    changed = [n for n in {**old, **new} if old.get(n) != new.get(n)]
    name = changed[0] if changed else "?"
    return f"site '{name}': {old.get(name, 'absent')} became {new.get(name, 'absent')}, as (value shape, plates)"


def check_same_structure(before: tuple, after: tuple) -> None:
    """Raise if the model's trace changed shape between two steps on the same data."""
    change = structure_change(before, after)
    if change is not None:
        raise RuntimeError(
            f"The model's structure changed between EM steps on the same data ({change}). EM "
            "needs a model whose sites, shapes and plate sizes do not depend on its parameter "
            "values."
        )


def _names(names) -> str:
    return ", ".join(f"'{n}'" for n in names) or "none found"


def check_fit_args(max_iter, tol) -> Tuple[int, float]:
    """Validate :meth:`pyro_em.EM.fit` arguments (any integral / real number type, numpy's
    included) and return them as ``int`` and ``float``."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}.")
    return int(max_iter), float(tol)


def unrepresentable(unconstrained: torch.Tensor) -> bool:
    """Whether an unconstrained param value is NaN or +inf. (``-inf`` is how a probability of
    exactly 0, a structural zero, is held in a simplex or logits param.)"""
    return bool(torch.isnan(unconstrained).any() or (unconstrained == math.inf).any())


def base_constraint(constraint):
    """The constraint of one element, under any ``independent`` wrapping."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint


def interval(constraint: constraints.Constraint) -> Optional[Tuple[float, float]]:
    """``(lower, upper)`` bounds of an elementwise interval constraint (the tightest over
    tensor bounds), or ``None`` for any other kind."""
    c = base_constraint(constraint)
    if isinstance(c, torch_constraints._Real):
        return -math.inf, math.inf
    if not isinstance(c, (torch_constraints._GreaterThan, torch_constraints._GreaterThanEq, torch_constraints._Interval,
                          torch_constraints._HalfOpenInterval, torch_constraints._LessThan)):
        return None
    lo, hi = getattr(c, "lower_bound", -math.inf), getattr(c, "upper_bound", math.inf)
    return float(torch.as_tensor(lo).max()), float(torch.as_tensor(hi).min())


def subsampled(frame) -> Optional[str]:
    """``"Plate 'n' subsamples 10 of 50 (...)"`` for a plate frame that subsamples, else None."""
    if frame.vectorized and frame.full_size is not None and frame.size != frame.full_size:
        return f"Plate '{frame.name}' subsamples {frame.size} of {frame.full_size} (subsample_size or subsample)"
    return None


def check_params_finite(params: Mapping[str, torch.Tensor]) -> None:
    """Check unconstrained parameter values before an M-step moves them. ``-inf`` is allowed:
    it is how a probability of exactly 0 (a structural zero, as in a left-right HMM's
    transitions) is held in a simplex or logits param."""
    for name, p in params.items():
        if unrepresentable(p):
            raise ValueError(
                f"Param '{name}' has a NaN or +inf unconstrained value: its value is NaN or lies "
                "on a boundary of its constraint that it cannot keep (e.g. a probability of "
                "exactly 1 in a unit_interval param). Initialize it strictly inside."
            )


class _LastSite(Messenger):
    """Remembers the last site the model reached, for error messages."""

    name = None

    def _process_message(self, msg) -> None:
        if msg["type"] in ("sample", "param"):
            self.name = msg["name"]


@contextmanager
def model_errors(args: tuple, kwargs: dict) -> Iterator[None]:
    """Turn a raw error from inside the model's run (numpy or list data, an empty plate, ...)
    into a ``ValueError`` naming the last site reached and the likely fix."""
    last = _LastSite()
    try:
        with last:
            yield
    except (AttributeError, TypeError, ZeroDivisionError, NotImplementedError, IndexError) as e:
        where = f"after site '{last.name}'" if last.name else "before its first site"
        hint = ""
        if isinstance(e, ZeroDivisionError) and "size cannot be zero" in str(e):
            hint = " A plate has size 0: are the data empty?"
        elif any(isinstance(a, (list, tuple)) for a in (*args, *kwargs.values())):
            hint = " An argument is a list or tuple: pass data as torch tensors (torch.as_tensor(data))."
        raise ValueError(f"The model raised {type(e).__name__} {where}: {e}.{hint}") from e


def explain_log_prob_error(name: str, fn, value, error: Exception) -> str:
    """A message for a failed ``log_prob``: the first value outside the distribution's support
    (index and value, not the whole tensor), or the error itself."""
    try:
        inside = fn.support.check(value)
    except Exception:  # shapes that do not even broadcast: the original error says more
        inside = None
    if isinstance(inside, torch.Tensor) and not bool(inside.all()):
        index = tuple(int(i) for i in (~inside).nonzero()[0])
        bad = value[index] if value.dim() >= len(index) else value
        return (
            f"Site '{name}' has the value {bad.tolist()} at index {index}, outside the support "
            f"{fn.support} of its {type(fn).__name__}. Check the data (e.g. categories must lie "
            "in 0..K-1)."
        )
    return f"Error while computing log_prob at site '{name}': {error}"


def check_observations(trace: Trace) -> None:
    """With Pyro's validation on (its default), raise as Pyro's ``log_prob`` would for an
    observed value outside its site's support (a Bernoulli observation of 2 or 0.5), naming
    the site and the first such value: a step that never evaluates the model's own
    distributions (a fused chain) must not run on it silently. A distribution made with
    ``validate_args=False`` is not checked, as its own ``log_prob`` would not be (``trace``
    must come from a run under :func:`unset_validation`, which tells it apart)."""
    from pyro.infer.util import is_validation_enabled

    if not is_validation_enabled():
        return
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or not isinstance(site["value"], torch.Tensor):
            continue
        fn = site["fn"]
        if not _validates(fn):
            continue
        try:
            inside = fn.support.check(site["value"])
        except Exception:  # noqa: BLE001 (no support to check against: the E-step's log_prob says)
            continue
        if isinstance(inside, torch.Tensor) and not bool(inside.all()):
            raise ValueError(explain_log_prob_error(name, fn, site["value"], None))


class _Unset:
    """The default ``validate_args`` of distributions made inside :func:`unset_validation`:
    false (no checks), and not ``False``, which a distribution's maker passed on purpose."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()


@contextmanager
def unset_validation() -> Iterator[None]:
    """Inside: distributions check nothing by default (as under ``pyro.validation_enabled(False)``),
    but one made with ``validate_args=False`` keeps that ``False``, so that a trace shows which
    sites the model itself exempted from Pyro's validation (see :func:`check_observations`)."""
    old = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution._validate_args = UNSET
    try:
        yield
    finally:
        torch.distributions.Distribution._validate_args = old


def _validates(fn) -> bool:
    """Whether ``fn.log_prob`` checks its value under Pyro's validation: not where the
    innermost distribution was made with ``validate_args=False`` (``Independent``,
    ``MaskedDistribution`` and ``ExpandedDistribution`` pass the value on to their base
    distribution, whose own setting decides)."""
    from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution

    while isinstance(fn, (torch.distributions.Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return getattr(fn, "_validate_args", UNSET) is not False
