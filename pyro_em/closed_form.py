"""Plan and run the closed-form part of the M-step.

:func:`plan_m_step` decides, once, how each param is updated: in closed form when every use of
it is a direct argument (or a conjugate prior's value) that a registered
:class:`~pyro_em.rules.Rule` handles, and by gradient otherwise, with the reason.
:func:`summarize` adds up a param's sufficient statistics from the weighted sites of a batch of
data, :func:`solve` turns the pooled statistics into its new value and :func:`write` puts it in
Pyro's param store (see :mod:`pyro_em.iteration`).
"""

import functools
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import pyro
import pyro.poutine as poutine
import torch
import torch.distributions as td
from pyro.distributions import DiscreteHMM
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.ops import packed
from pyro.poutine.trace_struct import Trace
from torch.distributions import constraints, transform_to
from torch.distributions.utils import lazy_property

from .estep import EStep, enum_model, pack_shapes
from .hmm import JointEmission, forward_backward
from ._validation import INTEGRATED_FLAG, MAP_FLAG, interval, model_errors, unrepresentable, unset_validation
from .map_sites import UnconstrainedDensity, unbounded_prior_message
from .rules import Collapse, Rule, UnboundedMAP, UseContext, find_rule
from .tracking import BIJECTIONS, TrackParams, Tracked, apply_maps, compact, param_dependencies

logger = logging.getLogger("pyro_em")


@dataclass
class Use:
    """A param used directly at a site: as argument ``arg`` of its distribution (or of the
    site's ``part``, such as a DiscreteHMM's ``"observation"``), or as its value
    (``arg == "value"``), element ``e`` being param element ``ids[e]``."""

    site: str
    part: str
    arg: str
    ids: torch.Tensor
    rule: Rule
    joint: bool = False
    jacobian: bool = False  # a MAP prior in unconstrained coordinates (map_space)
    maps: tuple = ()  # bijections between the param and the argument (tracking.BIJECTIONS)


@dataclass
class MStepPlan:
    """How each param is updated. ``str(plan)`` prints it as a table.

    :ivar dict closed_form: param name -> its uses, in update order (means before scales).
    :ivar dict gradient: param name -> why it takes the gradient M-step.
    :ivar list passes: the closed-form params in solve order, a list per pass over the data: a
        param whose rule reads (:meth:`~pyro_em.rules.Rule.reads`) one earlier in the plan
        starts a new pass, which reads that param's new value.
    """

    closed_form: Dict[str, List[Use]] = field(default_factory=dict)
    gradient: Dict[str, str] = field(default_factory=dict)
    passes: List[List[str]] = field(default_factory=list)
    tracked_args: Dict[Tuple[str, str], Dict[str, Tuple[str, torch.Tensor]]] = field(default_factory=dict)
    maps: Dict[Tuple[str, str, str], tuple] = field(default_factory=dict)
    read_unobserved: set = field(default_factory=set)
    """Unobserved halves of ``obs_mask`` sites (integrated out) whose value a later site reads."""
    notes: Dict[str, List[str]] = field(default_factory=dict)
    """What EM does with sites that are not params (``obs_mask``'s unobserved halves) -> those
    sites, printed after the params."""
    batch_free: bool = True
    """Whether the plan holds nothing that varies along a plate (no param indexed by the
    data): it then serves every batch of the same shapes (see :class:`~pyro_em.planner.PlanCache`)."""
    runs: Optional[Callable[[], str]] = None
    """How the latest batch's steps run (its E-step backend and programs), in words, printed
    last (see :attr:`pyro_em.EM.plan`): the planner's ``describe``."""

    @property
    def params(self) -> List[str]:
        """Every param the plan updates, closed-form first."""
        return [*self.closed_form, *self.gradient]

    def __str__(self) -> str:
        lines = []
        for name, uses in self.closed_form.items():
            where = ", ".join(_grouped_sites([(type(u.rule).__name__, u.site) for u in uses]))
            lines.append(f"{name}: closed form ({where})")
        for name, why in self.gradient.items():
            lines.append(f"{name}: gradient ({why})")
        for what, sites in self.notes.items():
            lines.extend(f"{phrase}: {what}" for phrase in _grouped_sites([("obs_mask", site) for site in sites]))
        runs = self.runs() if self.runs is not None else ""
        if runs:
            lines.append(runs)
        return "\n".join(lines)


def _grouped_sites(pairs: List[Tuple[str, str]]) -> List[str]:
    """``"Rule at 'site'"`` phrases, with sites that differ only in their numbers (the steps
    of a ``pyro.markov`` chain) grouped into one: ``"Rule at 'x_{t}' for t in 0..199"``."""
    groups: Dict[Tuple[str, str], List[List[int]]] = {}
    for rule, site in pairs:
        template = re.sub(r"\d+", "{}", site)
        groups.setdefault((rule, template), []).append([int(n) for n in re.findall(r"\d+", site)])
    phrases = []
    for (rule, template), numbers in groups.items():
        if len(numbers) == 1:
            phrases.append(f"{rule} at '{template.format(*numbers[0])}'")
            continue
        names = ["t"] if len(numbers[0]) == 1 else [f"i{k}" for k in range(len(numbers[0]))]
        ranges = " and ".join(
            f"{n} in {min(col)}..{max(col)}" for n, col in zip(names, zip(*numbers)) if min(col) != max(col)
        )
        shown = template.format(*(f"{{{n}}}" if min(col) != max(col) else col[0] for n, col in zip(names, zip(*numbers))))
        phrases.append(f"{rule} at '{shown}' for {ranges} ({len(numbers)} sites)")
    return phrases


def unwrap(fn: td.Distribution, value: torch.Tensor, weight: Optional[torch.Tensor]):
    """Strip ``Independent``, masks, expansion and one-hot encoding off a site's distribution.

    :returns: ``(leaf distribution, its value, weight broadcastable to its log_prob)``.
    """
    while True:
        if isinstance(fn, td.Independent):
            if weight is not None:
                weight = weight.reshape(weight.shape + (1,) * fn.reinterpreted_batch_ndims)
            fn = fn.base_dist
        elif isinstance(fn, MaskedDistribution):
            if weight is not None:
                weight = weight * fn._mask
            fn = fn.base_dist
        elif isinstance(fn, (ExpandedDistribution, UnconstrainedDensity)):
            fn = fn.base_dist
        elif isinstance(fn, td.OneHotCategorical):
            value = value.argmax(-1)
            fn = fn._categorical
        else:
            return fn, value, weight


def components(fn: td.Distribution, value: torch.Tensor, weight: Optional[torch.Tensor]):
    """The parts of a site that closed-form rules see: ``(part, fn, value, weight)`` tuples.

    A plain site is one part. A :class:`~pyro.distributions.DiscreteHMM` is two: itself (its
    ``initial_logits`` and ``transition_logits``, with an :class:`~pyro_em.hmm.HMMPosterior` as
    weight) and ``"observation"``, its observation distribution at every step, weighted by the
    posterior of the state at that step; a :class:`~pyro_em.hmm.JointEmission` observation
    is one part per emission, ``"observation.0"``, ``"observation.1"``, ...
    """
    fn, value, weight = unwrap(fn, value, weight)
    if not isinstance(fn, DiscreteHMM):
        yield "", fn, value, weight
        return
    post = None if weight is None else forward_backward(fn, value).scaled(weight)
    yield "", fn, None, post
    obs_value = value.unsqueeze(-1 - fn.observation_dist.event_dim)
    obs, obs_value, obs_weight = unwrap(fn.observation_dist, obs_value, None if post is None else post.observation)
    if not isinstance(obs, JointEmission):
        yield "observation", obs, obs_value, obs_weight
        return
    for i, (part, part_value) in enumerate(zip(obs.parts, obs.split(obs_value))):
        yield (f"observation.{i}",) + unwrap(part, part_value, obs_weight)


def distribution_args(fn: td.Distribution, value) -> Dict[str, torch.Tensor]:
    """The distribution's tensor arguments and its value. Untracked lazy properties (say
    ``logits`` computed from given ``probs``) are derived, not arguments: skipped here, while
    the dependency walk over the log density still sees any param behind them; but the one
    given of a pair that are both lazy (a Binomial's ``probs`` or ``logits``, torch's
    ``_param``) is an argument, tracked or not (``Binomial(10, urn / 10)``)."""
    given = getattr(fn, "_param", None)
    args = {
        k: v
        for k, v in vars(fn).items()
        if not k.startswith("_")
        and isinstance(v, torch.Tensor)
        and (isinstance(v, Tracked) or v is given or not isinstance(getattr(type(fn), k, None), lazy_property))
    }
    if isinstance(fn, td.Multinomial):  # its probs or logits live on an inner Categorical
        args.update(distribution_args(fn._categorical, None))
    if value is not None:
        args["value"] = value
    return args


def analysis_traces(model: Callable, args: tuple, kwargs: dict, first_available_dim: int,
                    subsample: bool = False) -> Tuple[Trace, Trace]:
    """The traces a plan is made from, ``(tracked, scored)``: one run of the model under
    autograd with param values :class:`~pyro_em.tracking.Tracked`, packed with log-density
    *shapes* (:func:`~pyro_em.estep.pack_shapes`: no log density is computed, so planning costs
    no more memory than running the model). Both names are the same trace."""
    # Argument checks are the E-step's job (it runs next, on the same data): skipped here.
    with torch.enable_grad(), model_errors(args, kwargs), pyro.validation_enabled(False), unset_validation():
        tracked = poutine.trace(enum_model(TrackParams()(model), first_available_dim)).get_trace(*args, **kwargs)
    with torch.no_grad():
        tracked = pack_shapes(tracked, subsample)
    return tracked, tracked


def _reachable_tensors(obj, seen=None):
    """Every tensor a distribution holds: its arguments, those of the distributions and
    transforms it wraps (``base_dist``, a DiscreteHMM's observations, a mixture's components),
    masks included. A param reaches the log density only through these."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _reachable_tensors(item, seen)
    elif isinstance(obj, (td.Distribution, td.Transform)):
        for value in vars(obj).values():
            yield from _reachable_tensors(value, seen)


def plan_m_step(tracked: Trace, scored: Trace, mode: str) -> MStepPlan:
    """Decide how each param is updated (see the module docs), from :func:`analysis_traces`.

    :param mode: ``"auto"``, ``"gradient"`` (everything by gradient) or ``"closed_form"``.
    :raises ValueError: with ``mode="closed_form"``, naming a param that has no closed form.
    """
    store = pyro.get_param_store()
    names = [n for n, s in tracked.nodes.items() if s["type"] == "param"]
    leaves = {p: n for n, p in store.named_parameters() if n in names}
    plan = MStepPlan(read_unobserved=_read_unobserved(tracked))
    _check_hierarchical_scales(tracked, leaves)
    if mode == "gradient":
        plan.gradient = {n: "m_step='gradient'" for n in names}
        return plan

    uses: Dict[str, List[Use]] = defaultdict(list)
    reasons: Dict[str, str] = {}
    memo: dict = {}  # graph nodes -> the params behind them, shared by all sites
    kept: dict = {}  # (rule, family, argument, param, maps) -> why its constraint is not kept
    for site_name, site in tracked.nodes.items():
        if site["type"] != "sample" or site["infer"].get(INTEGRATED_FLAG):  # (weighs nothing)
            continue
        direct = set()
        for part, fn, value, _ in components(site["fn"], site["value"], None):
            for arg, t in distribution_args(fn, value).items():
                if not isinstance(t, Tracked):
                    for p in param_dependencies(t, leaves, memo):
                        reasons.setdefault(p, f"enters site '{site_name}' through a computation")
                    continue
                ids = compact(t.ids)
                plan.tracked_args.setdefault((site_name, part), {})[arg] = (t.param_name, ids)
                if part or _varies_over_plates(ids, fn, site):
                    plan.batch_free = False
                if t.maps:
                    plan.maps[(site_name, part, arg)] = t.maps
                direct.add(t.param_name)
                rule = find_rule(type(fn), arg)
                if rule is None:
                    reasons.setdefault(
                        t.param_name, f"no rule for {type(fn).__name__}.{arg} at site '{site_name}'"
                    )
                    continue
                jacobian = isinstance(site["fn"], UnconstrainedDensity)
                ctx = UseContext(fn, value, None, ids, arg, store[t.param_name].numel(), lambda a: None, jacobian=jacobian)
                key = (type(rule), type(fn), arg, t.param_name, t.maps)  # (the same at every step of a chain)
                if key not in kept:
                    kept[key] = _constraint_not_kept(rule.solution_constraint(ctx), store._constraints[t.param_name],
                                                     t.maps, f"{type(fn).__name__}.{arg}")
                why = rule.check(ctx) or kept[key]
                if why:
                    reasons.setdefault(t.param_name, f"at site '{site_name}' {why}")
                else:
                    uses[t.param_name].append(Use(site_name, part, arg, ids, rule, jacobian=jacobian, maps=t.maps))
        # A param may also reach the log density along a path no argument shows.
        reached = set()
        for t in _reachable_tensors([site["fn"], site["value"]]):
            reached |= param_dependencies(t, leaves, memo)
        for p in reached - direct:
            reasons.setdefault(p, f"enters site '{site_name}' through a computation")

    for name in names:
        why = reasons.get(name) or _incompatible(uses.get(name, []))
        if why:
            plan.gradient[name] = why
        else:
            plan.closed_form[name] = uses[name]
    plan.closed_form = dict(
        sorted(plan.closed_form.items(), key=lambda kv: min(u.rule.priority for u in kv[1]))
    )
    _mark_joint_updates(plan)
    plan.passes = solve_passes(plan)
    if mode == "closed_form" and plan.gradient:
        name, why = next(iter(plan.gradient.items()))
        raise ValueError(f"m_step='closed_form', but param '{name}' has no closed-form update: {why}.")
    logger.info("pyro_em M-step plan:\n%s", plan)
    return plan


_SCALES = {td.Normal: ("scale",), td.MultivariateNormal: ("scale_tril", "covariance_matrix", "precision_matrix")}


def _check_hierarchical_scales(trace: Trace, leaves: Dict[torch.Tensor, str]) -> None:
    """Raise for a param that enters the model only as the scale (or covariance) of the prior
    of MAP-estimated sites: the MAP objective has no maximum, whatever the data (the values
    sit on their prior's mean, where the likelihood is finite, and the scale goes to 0), and
    the M-step, closed form or gradient, would drive it there."""
    sites = [(n, s) for n, s in trace.nodes.items() if s["type"] == "sample" and not s["infer"].get(INTEGRATED_FLAG)]
    as_scale: Dict[str, str] = {}  # param -> a MAP site it is the prior scale of
    for site_name, site in sites:
        for _, fn, value, _ in components(site["fn"], site["value"], None) if site["infer"].get(MAP_FLAG) else ():
            for arg, t in distribution_args(fn, value).items():
                if isinstance(t, Tracked) and any(isinstance(fn, f) and arg in a for f, a in _SCALES.items()):
                    as_scale.setdefault(t.param_name, site_name)
    if not as_scale:  # (most models: no walk through every site's computations)
        return
    elsewhere: set = set()  # params that enter any other way
    memo: dict = {}
    for site_name, site in sites:
        direct = set()
        for _, fn, value, _ in components(site["fn"], site["value"], None):
            for arg, t in distribution_args(fn, value).items():
                if isinstance(t, Tracked):
                    direct.add(t.param_name)
                    if as_scale.get(t.param_name) != site_name or not any(
                            isinstance(fn, f) and arg in a for f, a in _SCALES.items()):
                        elsewhere.add(t.param_name)
        for t in _reachable_tensors([site["fn"], site["value"]]):
            elsewhere |= param_dependencies(t, leaves, memo) - direct
    for name, site in as_scale.items():
        if name not in elsewhere:
            raise ValueError(
                f"Param '{name}' is the scale of the prior of MAP-estimated site '{site}' (a "
                "hierarchical scale): the MAP objective has no maximum, it grows without bound as "
                "the site's values approach their prior's mean and the scale goes to 0, and every "
                "M-step takes it nearer. Fix it to a number (or condition the model on a value "
                "with poutine.condition), or observe the site's values."
            )


def _read_unobserved(trace: Trace) -> set:
    """The integrated-out halves of ``obs_mask`` sites (see :class:`~pyro_em.map_sites.MapMessenger`)
    whose value reaches another site's distribution or value (not the deterministic site
    that merely reassembles the observation)."""
    fillers = {site["value"]: name for name, site in trace.nodes.items()
               if site["type"] == "sample" and site["infer"].get(INTEGRATED_FLAG)}
    read, memo = set(), {}
    for name, site in trace.nodes.items() if fillers else ():
        if site["type"] != "sample" or name in fillers.values() or site["infer"].get("_deterministic"):
            continue
        for t in _reachable_tensors([site["fn"], site["value"]]):
            read |= param_dependencies(t, fillers, memo)
    return read


def note_obs_mask(plan: MStepPlan, trace: Trace, read: set, prefix: str) -> None:
    """Say in ``plan`` what EM does with the unobserved halves of ``obs_mask`` sites: integrated
    out, or (those in ``read``, which a later site reads) MAP-estimated under ``prefix``."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["infer"].get(INTEGRATED_FLAG):
            what = "integrated out (the unobserved entries, read by no other site)"
        elif name in read:
            what = f"the unobserved entries are continuous latents, read by a later site: MAP values, params '{prefix}.<site>'"
        else:
            continue
        plan.notes.setdefault(what, []).append(name)


def _constraint_not_kept(solution: Optional[constraints.Constraint], constraint: constraints.Constraint,
                         maps: tuple, where: str) -> Optional[str]:
    """Why a rule whose solutions satisfy ``solution`` (in the argument's space, reached from
    the param through ``maps``) may leave the param's ``constraint``, or ``None`` where every
    solution keeps it (up to the bounds themselves: a rate of 0 under ``positive`` is the
    degenerate case that :func:`write` rejects). Constraints that are not intervals (a
    simplex, a Cholesky factor) are compared as equal or trusted to the rule."""
    own, kept = interval(constraint), interval(solution) if solution is not None else None
    if own is None or kept is None:
        return None
    lo, hi = (torch.tensor(b, dtype=torch.float64) for b in kept)
    for name in reversed(maps):  # the bijections are increasing: they map bounds to bounds
        inverse = BIJECTIONS[name][1]
        if name in ("softmax", "log_softmax"):
            return None
        lo, hi = inverse(lo), inverse(hi)
    if own[0] <= float(lo) and own[1] >= float(hi):
        return None
    return (f"its constraint {constraint} is narrower than what the closed form of {where} keeps "
            f"({solution}): the constrained maximum is found by gradient")


def _varies_over_plates(ids: torch.Tensor, fn: td.Distribution, site: dict) -> bool:
    """Whether a tracked argument's param slots change along one of the site's plates (a param
    indexed by the data), or might: dims it cannot place count as plates."""
    event = max(0, ids.dim() - len(fn.batch_shape))
    batch = ids.dim() - event
    for f in site["cond_indep_stack"]:
        if f.vectorized and 0 <= batch + f.dim < batch and ids.shape[batch + f.dim] > 1:
            return True
    return False


def solve_passes(plan: MStepPlan) -> List[List[str]]:
    """The closed-form params cut into passes: a param whose rule reads a param of the
    current pass starts the next one."""
    passes: List[List[str]] = [[]]
    for name, uses in plan.closed_form.items():
        read = {plan.tracked_args.get((u.site, u.part), {}).get(arg, (None,))[0]
                for u in uses for arg in u.rule.reads(u.arg, u.joint)}
        if read & set(passes[-1]):
            passes.append([])
        passes[-1].append(name)
    return passes if passes[0] else []


def _mark_joint_updates(plan: MStepPlan) -> None:
    """A use is joint when its rule's partner argument is a closed-form param updated later,
    over exactly the same slots (same param shape, same ids); all uses of a param must agree."""
    order = list(plan.closed_form)
    for name, uses in plan.closed_form.items():
        for use in uses:
            partner = plan.tracked_args.get((use.site, use.part), {}).get(use.rule.partner) if use.rule.partner else None
            if partner is not None and partner[0] in order[order.index(name) + 1 :]:
                p_ids = partner[1]
                same_shape = pyro.get_param_store()[partner[0]].shape == pyro.get_param_store()[name].shape
                use.joint = same_shape and p_ids.shape == use.ids.shape and bool((p_ids == use.ids).all())
        if not all(u.joint for u in uses):
            for u in uses:
                u.joint = False


def _incompatible(uses: List[Use]) -> Optional[str]:
    if not uses:
        return "no direct use with a closed-form rule"
    kinds = {u.rule.kind for u in uses}
    if len(kinds) > 1:
        return f"its uses need different statistics ({', '.join(sorted(kinds))})"
    solvers = {(type(u.rule).solve, u.arg) for u in uses if type(u.rule).solve is not Rule.solve}
    if len({u.maps for u in uses if type(u.rule).solve is not Rule.solve}) > 1:
        return "its uses pass it through different maps (" + ", ".join(
            sorted({".".join(u.maps) or "itself" for u in uses})
        ) + ")"
    if not solvers:
        return "only a prior uses it"
    if len(solvers) > 1:
        return "it is used as different arguments (" + ", ".join(sorted(a for _, a in solvers)) + ")"
    return None


def check_hard_em(trace: Trace) -> None:
    """Hard EM needs every latent summed out by the contraction: a DiscreteHMM site sums its
    own chain out by forward-backward, which has no max-product form here."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and isinstance(unwrap(site["fn"], site["value"], None)[0], DiscreteHMM):
            raise ValueError(
                f"temperature=0 (hard EM) is not available for the DiscreteHMM site '{name}': "
                "write the chain with pyro.markov, which hard EM fits by Viterbi training."
            )


def estep_parts(estep: EStep) -> Callable[[str], Dict[str, tuple]]:
    """Each site's :func:`components`, weighted by the posterior of ``estep`` (computed once
    per site: a DiscreteHMM runs forward-backward)."""
    trace = estep.trace

    @functools.lru_cache(maxsize=None)
    def parts(site_name: str) -> Dict[str, tuple]:
        site = trace.nodes[site_name]
        weight = packed.unpack(estep.weights[site_name], trace.symbol_to_dim)
        return {p[0]: p[1:] for p in components(site["fn"], site["value"], weight)}

    return parts


@dataclass
class Solver:
    """How a closed-form param's pooled statistics become its value: the rule and context of
    one of its likelihood uses, the maps into the rule's space, and its conjugate prior's
    ``(site, distribution name)`` if it has one (for the error when the prior is unbounded)."""

    rule: Rule
    ctx: UseContext
    maps: tuple
    prior: Optional[Tuple[str, str]]


def summarize(
    plan: MStepPlan, names: List[str], parts: Callable[[str], Dict[str, tuple]],
    new: Dict[str, torch.Tensor], reg_covar: float = 0.0,
) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, Solver]]:
    """The additive statistics and :class:`Solver` of the closed-form params ``names`` (a pass
    of :attr:`MStepPlan.passes`) from one batch of weighted sites ``parts`` (a site name ->
    ``{part: (fn, value, weight)}`` function, see :func:`estep_parts`). A rule that reads
    another argument of its distribution (a scale reads the mean) sees the values in ``new``:
    the params of earlier passes.

    :raises TypeError: naming the rule if it reads a param of this pass that its
        :meth:`~pyro_em.rules.Rule.reads` does not declare.
    """
    store = pyro.get_param_store()
    stats: Dict[str, Dict[str, torch.Tensor]] = {}
    solvers: Dict[str, Solver] = {}
    for i, name in enumerate(names):
        uses = plan.closed_form[name]
        # A rule works in its argument's space: the param maps there and back (e.g. a simplex
        # param used as logits=probs.log()).
        maps = next((u.maps for u in uses if type(u.rule).solve is not Rule.solve), ())
        numel = store._params[name].numel()
        own: Dict[str, torch.Tensor] = {}
        solver, prior = None, None
        for use in uses:
            fn, value, weight = parts(use.site)[use.part]
            ctx = UseContext(
                fn, value, weight, use.ids, use.arg, numel,
                _current(plan, use, fn, new, names[:i]), reg_covar, use.joint, use.jacobian,
            )
            for key, s in use.rule.summarize(ctx).items():
                own[key] = own[key] + s if key in own else s
            if solver is None and type(use.rule).solve is not Rule.solve:
                solver = Solver(use.rule, ctx, maps, None)
            if use.arg == "value" and prior is None:
                prior = (use.site, type(fn).__name__)
        solver.prior = prior
        stats[name], solvers[name] = own, solver
    return stats, solvers


def solve(name: str, stats: Dict[str, torch.Tensor], solver: Solver) -> torch.Tensor:
    """The new value of closed-form param ``name`` from its pooled statistics.

    :raises ValueError: naming the param if a component collapsed or a conjugate prior's
        MAP objective is unbounded.
    """
    old = apply_maps(solver.maps, pyro.get_param_store()[name].detach())
    try:
        return apply_maps(solver.maps, solver.rule.solve(stats, old, solver.ctx).to(old.dtype), inverse=True)
    except Collapse as e:
        raise ValueError(
            f"The closed-form update of param '{name}' collapsed at slot(s) {e.slots}: "
            f"{e.what}. Set reg_covar > 0 (e.g. EM(model, reg_covar=1e-6), as "
            "scikit-learn's), use fewer components, or put a prior on it (the scale of a prior "
            "over MAP-estimated sites, a hierarchical scale, has no maximum: fix it to a number)."
        ) from None
    except UnboundedMAP:
        raise ValueError(unbounded_prior_message(*solver.prior, name)) from None


def write(new: Dict[str, torch.Tensor]) -> None:
    """Write solved values into Pyro's param store.

    :raises ValueError: if a value is not finite or leaves its param's constraint.
    """
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in new.items():
            unconstrained = transform_to(store._constraints[name]).inv(value)
            if unrepresentable(unconstrained):
                raise ValueError(
                    f"The closed-form update of param '{name}' is not finite or leaves its "
                    "constraint; check the data and the model around it."
                )
            store._params[name].copy_(unconstrained)


def _current(plan: MStepPlan, use: Use, fn, new: Dict[str, torch.Tensor], earlier: List[str]):
    tracked = plan.tracked_args.get((use.site, use.part), {})

    def current(arg: str) -> torch.Tensor:
        if arg in tracked:
            name, ids = tracked[arg]
            if name in earlier:  # (a declared read would have put it in an earlier pass)
                raise TypeError(
                    f"{type(use.rule).__name__} reads argument '{arg}' (param '{name}', updated "
                    f"in the same M-step) without declaring it: its "
                    f"reads() must return '{arg}', so that '{name}' is solved first."
                )
            value = new.get(name)
            if value is None:
                value = pyro.get_param_store()[name].detach()
            value = apply_maps(plan.maps.get((use.site, use.part, arg), ()), value)
            gathered = value.reshape(-1)[ids.clamp_min(0)]
            return torch.where(ids >= 0, gathered, getattr(fn, arg)) if bool((ids < 0).any()) else gathered
        return getattr(fn, arg)

    return current
