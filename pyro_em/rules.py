"""Closed-form M-step rules: weighted maximum likelihood (or MAP) updates of exponential families.

A rule handles one distribution argument (``Normal.loc``, ``Categorical.probs``, ...) or, for
conjugate priors on MAP sites, a distribution's *value* (``Dirichlet`` over a probs param).
Following pomegranate's summarize / from_summaries split, :meth:`Rule.summarize` returns
additive sufficient statistics pooled into the param's slots, and :meth:`Rule.solve` turns the
statistics of all uses of a param into its new value. Uses of one param must share a ``kind``
(the meaning of the statistics), which is how a prior's pseudo-counts add to the data's counts.

Register a rule for your own distribution with :func:`register_m_step`.
"""

import functools
import math
import string
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributions as td
from torch.distributions import constraints
from pyro.distributions import DiscreteHMM

from .kernels import feature_major
from .missing import MissingMultivariateNormal
from .tracking import broadcast_shapes, compact

Stats = Dict[str, torch.Tensor]


@dataclass
class UseContext:
    """Everything a rule needs about one use of a param at one site.

    :ivar fn: the site's distribution, unwrapped from ``Independent``, masks and expansion.
    :ivar value: the site's value (observations, enumerated values, or the MAP value).
    :ivar weight: posterior weight of each element of ``fn.log_prob(value)`` (broadcastable).
    :ivar ids: for each element of the argument, the flat index of the param element it is
        (-1 for a constant element).
    :ivar arg: the argument name (``"value"`` for a use as the site's value).
    :ivar current: ``current(arg)`` is the up-to-date value of another argument of ``fn``
        (parameters updated earlier in this M-step included).
    :ivar reg_covar: non-negative number added to variances and covariance diagonals.
    :ivar joint: whether the rule's ``partner`` argument is updated in closed form right after
        this param, over the same slots (so a joint, profile-likelihood update is exact).
    :ivar jacobian: for a conjugate prior's use, whether the MAP objective is taken in
        unconstrained coordinates (see :meth:`pseudo`).
    """

    fn: td.Distribution
    value: torch.Tensor
    weight: torch.Tensor
    ids: torch.Tensor
    arg: str
    numel: int
    current: Callable[[str], torch.Tensor]
    reg_covar: float = 0.0
    joint: bool = False
    jacobian: bool = False

    def pseudo(self, concentration: torch.Tensor) -> torch.Tensor:
        """A conjugate prior's pseudo-counts: ``concentration - 1`` at the mode of the value's
        density, ``concentration`` at the mode of its unconstrained coordinates' density
        (``map_space="unconstrained"``, whose log-Jacobian adds one count)."""
        return concentration if self.jacobian else concentration - 1

    def pool(self, *factors: torch.Tensor) -> torch.Tensor:
        """Sum the product of ``factors`` (each broadcastable to the argument's elements) into
        the param's flat slots. The product is contracted by one ``einsum``, so weighted sums
        over the data are matrix products, never materialized element-wise."""
        # Data may be integer counts or of another float precision than the weights: the
        # statistics take the widest floating type among the factors.
        floats = [f.dtype for f in factors if f.is_floating_point()]
        dtype = functools.reduce(torch.promote_types, floats) if floats else torch.get_default_dtype()
        factors = [f.to(dtype) for f in factors]
        full = broadcast_shapes(*(f.shape for f in factors), self.ids.shape)
        n = len(full)

        def letters(shape):
            shape = (1,) * (n - len(shape)) + tuple(shape)
            return "".join(_LETTERS[i] for i, size in enumerate(shape) if size > 1)

        inputs = [letters(f.shape) for f in factors]
        present = set("".join(inputs))
        output = "".join(c for c in letters(self.ids.shape) if c in present)
        ops = [f.reshape(tuple(s for s in f.shape if s > 1)) for f in factors]
        summed = torch.einsum(",".join(inputs) + "->" + output, *ops)
        # Restore the size-1 dims (and those along which only the ids vary) to the ids' shape.
        shape = [full[_LETTERS.index(c)] if c in output else 1 for c in map(_LETTERS.__getitem__, range(n))]
        summed = summed.reshape(shape[n - self.ids.dim():]).expand(self.ids.shape).reshape(-1)
        return self._place(summed, self.ids.reshape(-1))

    def pool_at(self, weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Expected counts: add ``weight`` into the slot of category ``value`` along the
        argument's last dim (its categories), with no one-hot tensor (K may be large)."""
        K = self.ids.shape[-1]
        value = value.long()
        # Sum the weight first over the dims along which neither the value nor the slots vary
        # (the data of an enumerated latent): K counts to place, not K x N.
        n = max(weight.dim(), value.dim(), self.ids.dim() - 1)
        shapes = [(1,) * (n - len(t)) + tuple(t) for t in (weight.shape, value.shape, self.ids.shape[:-1])]
        pooled = [i for i in range(n) if shapes[0][i] > 1 and shapes[1][i] == 1 and shapes[2][i] == 1]
        if pooled:
            weight = weight.reshape(shapes[0]).sum(pooled, keepdim=True)
            shapes[0] = tuple(1 if i in pooled else s for i, s in enumerate(shapes[0]))
        full = broadcast_shapes(*shapes)
        data = [i for i in range(n) if shapes[2][i] == 1 and full[i] > 1]  # where slots are fixed
        rest = [i for i in range(n) if i not in data]
        if data and all(shapes[1][i] == 1 for i in rest):
            # The value varies only where the slots do not (the data): add the weight into its
            # category by the value first, rows of the slot dims at once, then place the
            # K x (slot dims) counts into the slots.
            w = weight.reshape(shapes[0]).expand(full)
            data.sort(key=lambda i: -w.stride(i))  # in the weight's memory order: a view if it can
            w = w.permute(data + rest).reshape(-1, math.prod(full[i] for i in rest))
            v = value.reshape(shapes[1]).expand([full[i] if i in data else 1 for i in range(n)])
            counts = w.new_zeros(K, w.shape[1]).index_add_(0, v.permute(data + rest).reshape(-1), w).T
            slots = self.ids.reshape(shapes[2] + (K,)).expand([1 if i in data else full[i] for i in range(n)] + [K])
            slots = slots.permute(data + rest + [n]).reshape(-1)
            return self._place(counts.reshape(-1), slots)
        batch = broadcast_shapes(self.ids.shape[:-1], value.shape)
        slots = self.ids.expand(batch + (K,)).gather(-1, value.expand(batch).unsqueeze(-1)).squeeze(-1)
        slots, weight = torch.broadcast_tensors(slots, weight)
        return self._place(weight.reshape(-1), slots.reshape(-1))

    def _place(self, summed: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Add ``summed`` into the param's flat slots; constant elements (id -1) belong to none."""
        if bool((self.ids < 0).any()):
            summed, slots = summed[slots >= 0], slots[slots >= 0]
        return summed.new_zeros(self.numel).index_add_(0, slots, summed)


_LETTERS = string.ascii_letters


class Rule:
    """A closed-form update for one distribution argument.

    :ivar kind: what the statistics mean; all uses of a param must have the same kind.
    :ivar priority: lower runs first (means before the scales that depend on them).
    :ivar partner: another argument of the same distribution whose joint update this rule can
        make exact (see :attr:`UseContext.joint`), e.g. a Gamma's rate for its concentration.
    """

    kind: str = ""
    priority: int = 0
    partner: Optional[str] = None

    def check(self, ctx: UseContext) -> Optional[str]:
        """Return why the rule cannot be used at this site, or ``None`` (called once, when
        the M-step is planned)."""
        return None

    def solution_constraint(self, ctx: UseContext) -> Optional[constraints.Constraint]:
        """The constraint every solution of this rule satisfies, in the argument's space: by
        default the distribution's own for the argument (its support for a prior's value).
        A param whose constraint is narrower (``interval(-1.5, 1.5)`` on a Normal's loc)
        takes the gradient M-step instead, in its constraint's coordinates."""
        if ctx.arg == "value":
            return ctx.fn.support
        return ctx.fn.arg_constraints.get(ctx.arg)

    def reads(self, arg: str, joint: bool) -> Tuple[str, ...]:
        """The other arguments of the distribution whose values :meth:`summarize` reads through
        ``ctx.current`` when this rule updates ``arg`` (``joint`` as :attr:`UseContext.joint`).
        A closed-form param among them that comes earlier in the plan is solved first, in an
        earlier pass over the data; one that comes later is read at its old value. Called
        once, when the M-step is planned."""
        return ()

    def summarize(self, ctx: UseContext) -> Stats:
        """Additive sufficient statistics of this use, each of shape ``(ctx.numel, ...)``."""
        raise NotImplementedError

    def solve(self, stats: Stats, old: torch.Tensor, ctx: UseContext) -> torch.Tensor:
        """The new constrained param value from the pooled statistics of all its uses
        (``ctx`` is one likelihood use, for ``ctx.arg`` and ``ctx.reg_covar``). Slots without
        data keep their ``old`` value. Prior-only rules need not implement it."""
        raise NotImplementedError


_RULES: Dict[tuple, Rule] = {}


def register_m_step(dist_type: type, arg: str) -> Callable[[type], type]:
    """Class decorator registering a :class:`Rule` for argument ``arg`` of ``dist_type``.

    Use ``arg="value"`` for a conjugate prior whose value is a MAP-estimated param. Subclasses
    of ``dist_type`` use the rule too.

    Example (a Rayleigh emission ``x ~ Rayleigh(sigma[z])``, whose MLE is
    ``sigma^2 = sum w x^2 / (2 sum w)``)::

        @register_m_step(Rayleigh, "scale")
        class RayleighScale(Rule):
            kind = "rayleigh_scale"

            def summarize(self, ctx):
                return {"sxx": ctx.pool(ctx.weight * ctx.value**2), "sw": ctx.pool(ctx.weight)}

            def solve(self, stats, old, ctx):
                return keep_old(old, (stats["sxx"] / (2 * stats["sw"])).sqrt(), stats["sw"])
    """

    def decorate(cls: type) -> type:
        _RULES[(dist_type, arg)] = cls()
        return cls

    return decorate


def find_rule(dist_type: type, arg: str) -> Optional[Rule]:
    """The rule registered for ``arg`` of ``dist_type`` or its nearest base class."""
    for base in dist_type.__mro__:
        rule = _RULES.get((base, arg))
        if rule is not None:
            return rule
    return None


def keep_old(old: torch.Tensor, new: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``new`` where a slot has positive statistical support, else ``old`` (no data, no update)."""
    support = support.reshape(support.shape + (1,) * (old.dim() - support.dim()))
    return torch.where(support > 0, new.reshape(old.shape), old)


def _slots(t: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return t.reshape(old.shape)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


class UnboundedMAP(ValueError):
    """Raised by :meth:`Rule.solve` when a conjugate prior's pseudo-counts are negative and
    outweigh the data: the MAP objective grows without bound towards the boundary."""


class Collapse(ValueError):
    """Raised by :meth:`Rule.solve` when a component collapsed: a variance or covariance with
    posterior weight came out zero or singular. ``slots`` are the flat param slots."""

    def __init__(self, what: str, slots):
        super().__init__(what)
        self.what, self.slots = what, [int(i) for i in slots]


def check_bounded(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` (data plus prior pseudo-counts) with round-off below zero set to zero.

    :raises UnboundedMAP: if a count is negative beyond round-off.
    """
    tol = 64 * torch.finfo(counts.dtype).eps * counts.abs().max().clamp_min(1)
    if bool((counts < -tol).any()):  # (one boolean read: a recorded step guards it)
        raise UnboundedMAP()
    return counts.clamp_min(0)


# ---------------------------------------------------------------------------------------------
# Categorical and OneHotCategorical (unwrapped to Categorical): expected counts.


@register_m_step(td.Categorical, "probs")
@register_m_step(td.Categorical, "logits")
class CategoricalRule(Rule):
    kind = "categorical"

    def summarize(self, ctx):
        return {"counts": ctx.pool_at(ctx.weight, ctx.value)}

    def solve(self, stats, old, ctx):
        counts = check_bounded(_slots(stats["counts"], old))
        total = counts.sum(-1, keepdim=True)
        # A probability with no expected count is exactly 0 (a structural zero stays one).
        probs = _ratio(counts, total)
        return keep_old(old, probs if ctx.arg == "probs" else probs.log(), total.squeeze(-1))


@register_m_step(td.Multinomial, "probs")
@register_m_step(td.Multinomial, "logits")
class MultinomialRule(CategoricalRule):
    """Expected counts are the weighted observed count vectors (hmmlearn's MultinomialHMM)."""

    def summarize(self, ctx):
        return {"counts": ctx.pool(ctx.weight.unsqueeze(-1), ctx.value)}


@register_m_step(td.Dirichlet, "value")
class DirichletPrior(Rule):
    kind = "categorical"

    def summarize(self, ctx):
        return {"counts": ctx.pool(ctx.weight.unsqueeze(-1), ctx.pseudo(ctx.fn.concentration))}


# DiscreteHMM's own arguments: expected counts of the state before the first step and of each
# transition, from the forward-backward posteriors (ctx.weight is an HMMPosterior).


@register_m_step(DiscreteHMM, "initial_logits")
class HMMInitialRule(CategoricalRule):
    def summarize(self, ctx):
        return {"counts": ctx.pool(ctx.weight.initial)}


@register_m_step(DiscreteHMM, "transition_logits")
class HMMTransitionRule(CategoricalRule):
    def summarize(self, ctx):
        return {"counts": ctx.pool(*ctx.weight.transition_factors)}


# ---------------------------------------------------------------------------------------------
# Bernoulli and Binomial: successes over trials.


class _SuccessRule(Rule):
    kind = "bernoulli"

    def solve(self, stats, old, ctx):
        s1, n = check_bounded(_slots(stats["successes"], old)), _slots(stats["trials"], old)
        n = s1 + check_bounded(n - s1)
        eps = torch.finfo(old.dtype).eps
        p = _ratio(s1, n).clamp(eps, 1 - eps)
        return keep_old(old, p if ctx.arg == "probs" else p.log() - (-p).log1p(), n)


@register_m_step(td.Bernoulli, "probs")
@register_m_step(td.Bernoulli, "logits")
class BernoulliRule(_SuccessRule):
    def summarize(self, ctx):
        return {"successes": ctx.pool(ctx.weight, ctx.value), "trials": ctx.pool(ctx.weight)}


@register_m_step(td.Binomial, "probs")
@register_m_step(td.Binomial, "logits")
class BinomialRule(_SuccessRule):
    def summarize(self, ctx):
        return {
            "successes": ctx.pool(ctx.weight, ctx.value),
            "trials": ctx.pool(ctx.weight, ctx.fn.total_count),
        }


@register_m_step(td.Beta, "value")
class BetaPrior(Rule):
    kind = "bernoulli"

    def summarize(self, ctx):
        a, b = ctx.pseudo(ctx.fn.concentration1), ctx.pseudo(ctx.fn.concentration0)
        return {"successes": ctx.pool(ctx.weight, a), "trials": ctx.pool(ctx.weight, a + b)}


# ---------------------------------------------------------------------------------------------
# Rates: Poisson (events per unit of exposure) and Exponential (units of time per event) share
# the statistics (events, exposure), and so a Gamma prior: a - 1 pseudo-events, b of exposure.


class _RateRule(Rule):
    kind = "rate"

    def solve(self, stats, old, ctx):
        events, exposure = check_bounded(_slots(stats["events"], old)), _slots(stats["exposure"], old)
        rate = _ratio(events, exposure).clamp_min(torch.finfo(old.dtype).tiny)
        return keep_old(old, rate, exposure)


@register_m_step(td.Poisson, "rate")
class PoissonRule(_RateRule):
    def summarize(self, ctx):
        return {"events": ctx.pool(ctx.weight, ctx.value), "exposure": ctx.pool(ctx.weight)}


@register_m_step(td.Exponential, "rate")
class ExponentialRule(_RateRule):
    def summarize(self, ctx):
        return {"events": ctx.pool(ctx.weight), "exposure": ctx.pool(ctx.weight, ctx.value)}


@register_m_step(td.Gamma, "value")
class GammaPrior(Rule):
    kind = "rate"

    def summarize(self, ctx):
        return {
            "events": ctx.pool(ctx.weight, ctx.pseudo(ctx.fn.concentration)),
            "exposure": ctx.pool(ctx.weight, ctx.fn.rate),
        }


# ---------------------------------------------------------------------------------------------
# Gamma: the concentration has no closed form; a few Newton steps on its score equation
# (Minka 2002) replace it. Jointly with a closed-form rate over the same slots, the profile
# likelihood gives the exact joint maximizer; otherwise the update is the exact maximizer given
# the current rate.


def _solve_digamma(target: torch.Tensor, guess: torch.Tensor, profile: bool) -> torch.Tensor:
    """Solve ``log a - digamma(a) = target`` (profile) or ``digamma(a) = target`` by Newton."""
    a = guess
    for _ in range(30):
        if profile:
            f, df = a.log() - torch.digamma(a) - target, 1 / a - torch.polygamma(1, a)
        else:
            f, df = torch.digamma(a) - target, torch.polygamma(1, a)
        step = f / df
        a = torch.where(a - step > 0, a - step, a / 2)
        if bool((step.abs() <= 1e-14 * a).all()):
            break
    return a


@register_m_step(td.Gamma, "concentration")
class GammaConcentrationRule(Rule):
    kind = "gamma_concentration"
    partner = "rate"

    def reads(self, arg, joint):
        return () if joint else ("rate",)

    def summarize(self, ctx):
        stats = {"w": ctx.pool(ctx.weight), "wlogx": ctx.pool(ctx.weight, ctx.value.log())}
        if ctx.joint:
            stats["wx"] = ctx.pool(ctx.weight, ctx.value)
        else:
            stats["wlogb"] = ctx.pool(ctx.weight, ctx.current("rate").log())
        return stats

    def solve(self, stats, old, ctx):
        w = _slots(stats["w"], old)
        mean_log_x = _ratio(_slots(stats["wlogx"], old), w)
        if ctx.joint:
            s = (_ratio(_slots(stats["wx"], old), w).log() - mean_log_x).clamp_min(torch.finfo(old.dtype).eps)
            guess = (3 - s + ((s - 3) ** 2 + 24 * s).sqrt()) / (12 * s)
            new = _solve_digamma(s, guess, profile=True)
        else:
            new = _solve_digamma(mean_log_x + _ratio(_slots(stats["wlogb"], old), w), old, profile=False)
        return keep_old(old, new, w)


@register_m_step(td.Gamma, "rate")
class GammaRateRule(Rule):
    """``rate = sum w a / sum w x`` with the current (just updated) concentrations ``a``."""

    kind = "gamma_rate"
    priority = 1

    def reads(self, arg, joint):
        return ("concentration",)

    def summarize(self, ctx):
        return {"wa": ctx.pool(ctx.weight, ctx.current("concentration")), "wx": ctx.pool(ctx.weight, ctx.value)}

    def solve(self, stats, old, ctx):
        wx = _slots(stats["wx"], old)
        return keep_old(old, _ratio(_slots(stats["wa"], old), wx), wx)


# ---------------------------------------------------------------------------------------------
# Beta: Newton steps on the score equations digamma(a) - digamma(a + b) = mean log x and
# digamma(b) - digamma(a + b) = mean log(1 - x), jointly in (a, b) when both are closed-form
# params over the same slots, else for one given the other's current value.


def _beta_newton(a, b, log_x, log_1mx, update_a: bool, update_b: bool):
    for _ in range(50):
        psi_ab, tri_ab = torch.digamma(a + b), torch.polygamma(1, a + b)
        ga = torch.digamma(a) - psi_ab - log_x
        gb = torch.digamma(b) - psi_ab - log_1mx
        haa, hbb = torch.polygamma(1, a) - tri_ab, torch.polygamma(1, b) - tri_ab
        if update_a and update_b:
            det = haa * hbb - tri_ab**2
            da, db = (hbb * ga + tri_ab * gb) / det, (haa * gb + tri_ab * ga) / det
        else:
            da = ga / haa if update_a else torch.zeros_like(a)
            db = gb / hbb if update_b else torch.zeros_like(b)
        a = torch.where(a - da > 0, a - da, a / 2)
        b = torch.where(b - db > 0, b - db, b / 2)
        if bool((da.abs() <= 1e-14 * a).all() and (db.abs() <= 1e-14 * b).all()):
            break
    return a, b


class _BetaRule(Rule):
    def reads(self, arg, joint):
        return ("concentration0" if arg == "concentration1" else "concentration1",)

    def summarize(self, ctx):
        other = "concentration0" if ctx.arg == "concentration1" else "concentration1"
        return {
            "w": ctx.pool(ctx.weight),
            "wlogx": ctx.pool(ctx.weight, ctx.value.log()),
            "wlog1mx": ctx.pool(ctx.weight, (-ctx.value).log1p()),
            "wother": ctx.pool(ctx.weight, ctx.current(other)),
        }

    def solve(self, stats, old, ctx):
        w = _slots(stats["w"], old)
        log_x, log_1mx = _ratio(_slots(stats["wlogx"], old), w), _ratio(_slots(stats["wlog1mx"], old), w)
        other = _ratio(_slots(stats["wother"], old), w).where(w > 0, torch.ones_like(old))
        first = ctx.arg == "concentration1"
        a, b = (old, other) if first else (other, old)
        a, b = _beta_newton(a, b, log_x, log_1mx, first or ctx.joint, not first or ctx.joint)
        return keep_old(old, a if first else b, w)


@register_m_step(td.Beta, "concentration1")
class BetaConcentration1Rule(_BetaRule):
    """Exact given concentration0; exact jointly when both are closed form (``joint``). The
    conditional case averages the other concentration over the slot, exact when it is
    constant there."""

    kind = "beta_concentration1"
    partner = "concentration0"


@register_m_step(td.Beta, "concentration0")
class BetaConcentration0Rule(_BetaRule):
    kind = "beta_concentration0"
    priority = 1
    partner = "concentration1"


# ---------------------------------------------------------------------------------------------
# Normal: precision-weighted means, then variances about the updated means.


@register_m_step(td.Normal, "loc")
class NormalLocRule(Rule):
    """``loc = sum w x / s^2 / sum w / s^2`` with the current scales ``s``: the exact maximizer
    given the scales (joint with them when the scale is constant within each loc slot, as in
    every mixture written with ``locs[z]``)."""

    kind = "normal_loc"

    def summarize(self, ctx):
        # Three factors, contracted by one einsum: the data's weighted sums are a matrix
        # product, never a components x data x dims tensor.
        precision = compact(ctx.fn.scale) ** -2  # over the scale's own slots, not broadcast
        return {"wx": ctx.pool(ctx.weight, precision, ctx.value), "w": ctx.pool(ctx.weight, precision)}

    def solve(self, stats, old, ctx):
        w = _slots(stats["w"], old)
        return keep_old(old, _ratio(_slots(stats["wx"], old), w), w)


@register_m_step(td.Normal, "value")
class NormalPrior(Rule):
    kind = "normal_loc"

    def summarize(self, ctx):
        precision = ctx.weight / ctx.fn.scale**2
        return {"wx": ctx.pool(precision, ctx.fn.loc), "w": ctx.pool(precision)}


@register_m_step(td.Normal, "scale")
class NormalScaleRule(Rule):
    kind = "normal_scale"
    priority = 1

    def reads(self, arg, joint):
        return ("loc",)

    def summarize(self, ctx):
        # Squared deviations about the new means, exactly (no x^2 - 2 x m + m^2 cancellation).
        loc = ctx.current("loc")
        deviation = ctx.value - loc
        return {
            "ss": ctx.pool(ctx.weight, deviation.pow_(2) if deviation.is_floating_point() else deviation**2),
            "w": ctx.pool(ctx.weight, torch.ones_like(ctx.value)),
            # (the squared means, for the round-off floor of the variance: a statistic, so that
            # the solve reads nothing of one batch's tensors)
            "mm": ctx.pool(ctx.weight, loc.detach().square().expand(deviation.shape)),
        }

    def solve(self, stats, old, ctx):
        w = _slots(stats["w"], old)
        var = _ratio(_slots(stats["ss"], old), w) + ctx.reg_covar
        # A deviation at the round-off of the means is none: the points coincide (a component
        # on one datum, MAP values on their prior's loc), where the likelihood is unbounded.
        eps, tiny = torch.finfo(var.dtype).eps, torch.finfo(var.dtype).tiny
        floor = (8 * eps) ** 2 * _ratio(_slots(stats["mm"], old), w).max().to(var.dtype)
        collapsed = ((var.sqrt() <= tiny) | (var <= floor)) & (w > 0)
        if bool(collapsed.any()):
            raise Collapse("a variance is zero up to round-off (a component collapsed onto one point, "
                           "or MAP-estimated values onto their prior's mean)", collapsed.reshape(-1).nonzero().reshape(-1))
        return keep_old(old, var.sqrt(), w)


# ---------------------------------------------------------------------------------------------
# MultivariateNormal: weighted means, scatter matrices about the updated means.


def _varies_within(t: torch.Tensor, ids: torch.Tensor, event_dims: int) -> bool:
    """Whether ``t`` changes along a batch dim over which ``ids`` (one param slot) is pooled."""
    batch = broadcast_shapes(t.shape[: t.dim() - event_dims], ids.shape[: ids.dim() - 1])
    t = t.expand(batch + t.shape[t.dim() - event_dims :])
    ids_batch = ids.shape[: ids.dim() - 1]
    offset = len(batch) - len(ids_batch)
    for dim, size in enumerate(batch):
        pooled = dim < offset or ids_batch[dim - offset] == 1
        if pooled and size > 1 and not bool((t == t.narrow(dim, 0, 1)).all()):
            return True
    return False


@register_m_step(td.MultivariateNormal, "loc")
class MultivariateNormalLocRule(Rule):
    kind = "mvn_loc"

    def check(self, ctx):
        L = ctx.fn._unbroadcasted_scale_tril
        if _varies_within(L, ctx.ids, 2):
            return "the covariance varies within one of its mean's slots (a shared mean)"
        return None

    def summarize(self, ctx):
        w = ctx.weight.unsqueeze(-1)
        value = ctx.value
        if isinstance(ctx.fn, MissingMultivariateNormal):  # (missing coordinates at their expectations)
            value = ctx.fn.conditional(value)[0]
        return {"wx": ctx.pool(w, value), "w": ctx.pool(w)}

    solve = NormalLocRule.solve


class _CovarianceRule(Rule):
    """Covariance ``sum w (x - mu)(x - mu)^T / sum w`` (+ ``reg_covar`` on the diagonal),
    pooled over the slots of a ``scale_tril``, ``covariance_matrix`` or ``precision_matrix``
    param (one per component, or tied). The scatter matrices are batched matmuls over the
    data, never an N x K x D x D tensor."""

    kind = "mvn_cov"
    priority = 1

    def reads(self, arg, joint):
        return ("loc",)

    def check(self, ctx):
        D = ctx.ids.shape[-1]
        first = ctx.ids[..., :1, :1]
        block = torch.arange(D * D, device=ctx.ids.device).reshape(D, D)
        if not bool((ctx.ids == first + block).all()):
            return "its matrices are not contiguous D x D blocks of the param"
        return None

    def summarize(self, ctx):
        D = ctx.ids.shape[-1]
        loc, value, weight = ctx.current("loc"), ctx.value, ctx.weight
        blocks = []
        if isinstance(ctx.fn, MissingMultivariateNormal):  # (missing coordinates at their expectations)
            value, blocks = ctx.fn.conditional(value)
        batch = broadcast_shapes(weight.shape, loc.shape[:-1], value.shape[:-1], ctx.ids.shape[:-2])
        slot = ctx.ids[..., 0, 0] // (D * D)
        slot = slot.reshape((1,) * (len(batch) - slot.dim()) + slot.shape)
        groups = [i for i, n in enumerate(slot.shape) if n > 1]
        pooled = [i for i, n in enumerate(slot.shape) if n == 1]
        g = math.prod(batch[i] for i in groups)
        n = len(batch)
        loc_b, value_b = [(1,) * (n - t.dim() + 1) + tuple(t.shape[:-1]) for t in (loc, value)]
        if not blocks and g <= 1024 and all(loc_b[i] == 1 for i in pooled) and all(value_b[i] == 1 for i in groups):
            # Each slot's mean is one vector and the data the same for all slots (a mixture):
            # one slot at a time, as scikit-learn does, never the N x K x D tensor.
            X = value.reshape(value_b + value.shape[-1:]).permute(pooled + groups + [n]).reshape(-1, D)
            means = loc.reshape(loc_b + (D,)).expand(tuple(batch[i] if i in groups else 1 for i in range(n)) + (D,))
            means = means.permute(groups + pooled + [n]).reshape(g, D)
            W = weight.expand(batch).permute(groups + pooled).reshape(g, -1)
            Xt, root_w = feature_major(X), W.sqrt()
            scatter = torch.stack([_weighted_scatter(Xt, means[j], root_w[j]) for j in range(g)])
            slot = slot.permute(groups + pooled).reshape(-1)
            n_slots = ctx.numel // (D * D)
            S = scatter.new_zeros(n_slots, D, D).index_add_(0, slot, scatter)
            w = W.sum(-1)
            return {"scatter": S, "w": w.new_zeros(n_slots).index_add_(0, slot, w)}
        # sqrt(w) (x - mu), arranged (slot groups, pooled elements, D): one N x K x D tensor.
        diff = value - loc
        scaled = diff.expand(batch + (D,)).contiguous() if diff.shape[:-1] != batch else diff
        scaled.mul_(weight.sqrt().unsqueeze(-1))
        scaled = scaled.permute(groups + pooled + [len(batch)])
        scaled = scaled.reshape(g, -1, D)
        scatter = scaled.mT @ scaled
        for rows, C in blocks:  # + the conditional covariance of the missing coordinates
            scatter = scatter + _pooled_block(weight * rows, C, batch, groups, pooled)
        slot = slot.permute(groups + pooled).reshape(-1)  # g slots: pooled dims have size 1
        n_slots = ctx.numel // (D * D)
        S = scatter.new_zeros(n_slots, D, D).index_add_(0, slot, scatter)
        w = weight.expand(batch).permute(groups + pooled).reshape(g, -1).sum(-1)
        return {"scatter": S, "w": w.new_zeros(n_slots).index_add_(0, slot, w)}

    def solve(self, stats, old, ctx):
        W = stats["w"]
        eye = torch.eye(old.shape[-1], dtype=old.dtype, device=old.device)
        cov = stats["scatter"] / W.clamp_min(torch.finfo(old.dtype).tiny)[:, None, None] + ctx.reg_covar * eye
        cov = cov.reshape(old.shape)
        L, info = torch.linalg.cholesky_ex(cov)
        bad = (info > 0) & (W.reshape(info.shape) > 0)
        if bool(bad.any()):
            raise Collapse(
                "a covariance is not positive definite (a component collapsed onto fewer than "
                "D + 1 points)", bad.reshape(-1).nonzero().reshape(-1)
            )
        if ctx.arg == "scale_tril":
            new = L
        elif ctx.arg == "covariance_matrix":
            new = cov
        else:
            new = torch.cholesky_inverse(L)
        return keep_old(old, new, W.reshape(old.shape[:-2]))


def _pooled_block(weight: torch.Tensor, C: torch.Tensor, batch: tuple, groups: list, pooled: list) -> torch.Tensor:
    """``sum w C`` over the pooled dims, arranged ``(slot groups, D, D)`` as the scatter is:
    ``C`` (one matrix per covariance, the same for all rows of a missingness pattern) times the
    weights summed over the dims it does not vary along, never a rows x D x D tensor."""
    n, D = len(batch), C.shape[-1]
    C = C.reshape((1,) * (n + 2 - C.dim()) + C.shape)
    w = weight.reshape((1,) * (n - weight.dim()) + weight.shape).expand(batch)
    flat = [i for i in range(n) if C.shape[i] == 1 and batch[i] > 1]
    w = w.sum(flat, keepdim=True) if flat else w
    T = w[..., None, None] * C
    spread = [i for i in pooled if T.shape[i] > 1]
    T = T.sum(spread, keepdim=True) if spread else T
    T = T.expand(tuple(batch[i] if i in groups else 1 for i in range(n)) + (D, D))
    return T.permute(groups + pooled + [n, n + 1]).reshape(-1, D, D)


def _weighted_scatter(Xt: torch.Tensor, mean: torch.Tensor, root_w: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n (x_n - mean)(x_n - mean)^T`` for the data as columns ``Xt (D, N)``, given
    ``sqrt(w)``."""
    d = (Xt - mean.unsqueeze(-1)).mul_(root_w)
    return d @ d.T


for _arg in ("scale_tril", "covariance_matrix", "precision_matrix"):
    register_m_step(td.MultivariateNormal, _arg)(type(f"MultivariateNormal_{_arg}", (_CovarianceRule,), {}))
