"""Fused Markov chains: a ``pyro.markov`` HMM fitted without tracing the model at every step.

A model written with ``pyro.markov`` costs one Pyro sample statement per state and per
observation at every EM step. When the trace has exactly that shape, the chain is rebuilt
once as the equivalent :class:`~pyro.distributions.DiscreteHMM`, whose arguments are gathered
from the current params by the plan's ids. A step is then one forward-backward pass and the
usual closed-form rules, pooled into the original params. The shape:

* Categorical states, ``z[0] ~ start`` and ``z[t] ~ trans[z[t-1]]``, the same tables at every
  step; the DiscreteHMM's first transition is the identity;
* emission sites at each step that depend on ``z[t]`` alone, the same at every step; several
  become one :class:`~pyro_em.hmm.JointEmission`; an emission may sit in plates of its own on
  the rightmost dims (examples/hmm.py's tones), read as event dims;
* every param used directly (as the plan found) and updated in closed form;
* MAP sites (:mod:`pyro_em.map_sites`) with fixed priors, as in examples/hmm.py and the
  enumeration tutorial: their priors are evaluated at the current MAP values at each step,
  for the loss and for the conjugate rules' pseudo-counts;
* masks that only switch sequences off for good. Past a sequence's end the emissions are
  masked and the chain runs on unseen, which changes neither the likelihood nor the earlier
  posteriors; the statistics leave those transitions out.

Anything else takes the general path. A mixture is the chain of length one: a plate with one
Categorical latent ``z ~ weights`` and emissions that depend on ``z`` alone step as a
DiscreteHMM with ``T = 1``, without tracing the model either.
"""

import functools
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
import torch.distributions as td
from pyro.poutine.trace_struct import Trace

from ._validation import MAP_FLAG
from .missing import MissingMultivariateNormal
from .closed_form import MStepPlan, Use, components, distribution_args, solve_passes, unwrap
from .estep import enum_symbols, packed_scale
from .hmm import JointEmission, forward_backward, hmm_log_prob
from .rules import find_rule
from .tracking import compact

SITE = "_chain"
_MAX_TABLE = 1 << 24  # K x K entries at most (K = 4096)


@dataclass
class FusedChain:
    """A recognized chain, ready to be rebuilt from the current params (see module docs)."""

    values: torch.Tensor  # (S, T, *event) observations
    active: Optional[torch.Tensor]  # (S, T): steps before each sequence's end, None if all
    start: Tuple[str, torch.Tensor, str]  # (param, ids (K,), "probs" or "logits")
    trans: Optional[Tuple[str, torch.Tensor, str]]  # (param, ids (K, K), "probs" or "logits"); None: a mixture
    emissions: List["_Emission"]  # each step's emissions (a JointEmission of them if several)
    plan: MStepPlan
    priors: Dict[str, Tuple[td.Distribution, str, bool]] = field(default_factory=dict)  # MAP site -> (prior, param, unmasked)
    states: List[str] = field(default_factory=list)  # the state sites, in order
    plate: bool = True  # the states sit in a plate (the sequences)

    def marginals(self) -> Dict[str, torch.Tensor]:
        """The posterior marginal of every state site at the current params, by one
        forward-backward pass, as :func:`~pyro_em.posterior.site_marginals` gives them from a
        traced E-step: ``(S, K)`` in the sequences' plate, ``(K,)`` without one. (Chains with
        sequences that end are not read so: the traced marginals are zero past each end.)"""
        with torch.no_grad():
            observation = forward_backward(self.distribution(), self.values).observation
        return {name: observation[:, t] if self.plate else observation[0, t] for t, name in enumerate(self.states)}

    def log_marginal(self) -> torch.Tensor:
        """The loss's negative at the current params by one forward pass, without tracing the
        model: the chain's log marginal likelihood plus the MAP sites' log prior densities."""
        with torch.no_grad():
            return hmm_log_prob(self.distribution(), self.values).sum() + self.prior_parts()[1]

    def prior_parts(self, counted: bool = True) -> Tuple[Dict[str, Dict[str, tuple]], float]:
        """Each MAP site's parts for the closed-form rules (its prior at the param's current
        value, with unit weight as the traced E-step gives them) and the sum of their log
        prior densities, which the loss includes; weight and sum zero unless ``counted`` (the
        priors are counted in one batch only)."""
        store = pyro.get_param_store()
        parts, log_prior = {}, 0.0
        for site, (prior, param, included) in self.priors.items():
            value = store[param].detach()
            log_prob = prior.log_prob(value)
            log_prior = log_prior + log_prob.sum() if counted and included else log_prior
            weight = torch.full_like(log_prob, float(counted and included))
            parts[site] = {p[0]: p[1:] for p in components(prior, value, weight)}
        return parts, log_prior

    def distribution(self) -> dist.DiscreteHMM:
        """The chain as one DiscreteHMM, at the current param values."""
        store = pyro.get_param_store()

        def logits(spec):
            name, ids, arg = spec
            value = store[name].detach().reshape(-1)[ids]
            return value.log() if arg == "probs" else value

        start = logits(self.start)
        S, T = self.values.shape[:2]
        K = start.shape[-1]
        identity = torch.eye(K, dtype=start.dtype, device=start.device).log()
        transitions = identity.expand(1, K, K)
        if self.trans is not None:
            transitions = torch.cat([transitions, logits(self.trans).expand(T - 1, K, K)])
        parts = [e.distribution() for e in self.emissions]
        emission = parts[0] if len(parts) == 1 else JointEmission(parts)
        if self.active is not None:
            emission = emission.expand((S, T, K)).mask(self.active[..., None])
        return dist.DiscreteHMM(start, transitions, emission, validate_args=False)  # (built from params)

    def parts(self, fn: dist.DiscreteHMM, weight: torch.Tensor) -> Dict[str, tuple]:
        """The weighted parts of the chain (see :func:`~pyro_em.closed_form.components`), its
        transitions past each sequence's end weighted zero."""
        parts = {p[0]: p[1:] for p in components(fn, self.values, weight)}
        if self.active is not None:
            fn, value, post = parts[""]
            first, *rest = post.transition_factors
            parts[""] = (fn, value, post._replace(transition_factors=(first * self.active[..., None, None], *rest)))
        return parts


def _canonical(ids: torch.Tensor, enum_dim: Optional[int], event_dims: int, K: int) -> Optional[torch.Tensor]:
    """Reshape compact ids to ``(K, *event)`` indexed by the state at ``enum_dim`` (or just
    ``(*event)`` with ``enum_dim=None``); None if they vary along any other batch dim."""
    batch = ids.dim() - event_dims
    if enum_dim is not None:
        pos = enum_dim - event_dims
        if -pos > ids.dim():
            ids = ids.reshape((1,) * (-pos - ids.dim()) + ids.shape)
            batch = ids.dim() - event_dims
        ids = ids.movedim(pos, 0)
        rest = ids.shape[1:batch]
    else:
        rest = ids.shape[:batch]
    if any(n != 1 for n in rest):
        return None
    event = ids.shape[batch:]
    if enum_dim is None:
        return ids.reshape(event)
    return ids.reshape((ids.shape[0],) + event).expand((K,) + event)


def fuse_chain(tracked: Trace, scored: Trace, plan: MStepPlan) -> Optional[FusedChain]:
    """Recognize a fusable Markov chain (see module docs) in the traces a ``plan`` was made
    from (:func:`~pyro_em.closed_form.analysis_traces`), or return None."""
    if plan.gradient or not plan.closed_form or plan.maps:
        return None
    symbols = enum_symbols(scored)
    sites = [(n, s) for n, s in scored.nodes.items() if s["type"] == "sample"]
    priors = _priors(sites, plan)
    if priors is None:
        return None
    frames = {n: tuple(f for f in s["cond_indep_stack"] if f.vectorized) for n, s in sites}
    if any(f.full_size is not None and f.size != f.full_size for fs in frames.values() for f in fs):
        return None  # a subsample: each step draws its own data
    prior_plates = {f.name for n in priors for f in frames[n]}
    sites = [(n, s) for n, s in sites if n not in priors]
    if any(not _unit_scale(s) for _, s in sites):
        return None

    states: List[str] = []
    emissions: List[List[str]] = []  # the emission sites of each state, in order
    for name, site in sites:
        deps = symbols.intersection(site["packed"]["log_prob"]._pyro_dims)
        own = site["infer"].get("_enumerate_symbol")
        if own is not None:
            prev = scored.nodes[states[-1]]["infer"]["_enumerate_symbol"] if states else None
            if deps != ({own} if prev is None else {own, prev}) or (states and not emissions[-1]):
                return None
            states.append(name)
            emissions.append([])
        else:
            if not states or deps != {scored.nodes[states[-1]]["infer"]["_enumerate_symbol"]}:
                return None
            emissions[-1].append(name)
    T = len(states)
    if T < 1 or not emissions[-1] or len({len(e) for e in emissions}) != 1:
        return None
    # The states share one plate (the sequences) or none.
    outer = {frames[n] for n in states}
    if len(outer) != 1 or len(next(iter(outer))) > 1:
        return None
    outer = next(iter(outer))
    if any(f.name in prior_plates for f in outer):
        return None  # MAP values local to the sequences

    state_fns = [unwrap(scored.nodes[n]["fn"], scored.nodes[n]["value"], None)[0] for n in states]
    if not all(isinstance(f, td.Categorical) for f in state_fns):
        return None
    K = state_fns[0]._num_events
    if K * K > _MAX_TABLE:
        return None  # a K x K transition table too large to hold: the traced path needs none

    def state_spec(t: int):
        tracked_args = plan.tracked_args.get((states[t], ""), {})
        if len(tracked_args) != 1:
            return None
        arg, (name, ids) = next(iter(tracked_args.items()))
        enum_dim = None if t == 0 else scored.nodes[states[t - 1]]["infer"]["_enumerate_dim"]
        ids = _canonical(ids, enum_dim, 1, K)
        # Constant elements (id -1, as in torch.cat([p, zeros])) are not rebuilt from the param.
        return None if ids is None or bool((ids < 0).any()) else (name, ids, arg)

    start, trans = state_spec(0), state_spec(1) if T > 1 else None
    if start is None or (T > 1 and trans is None):
        return None
    for t in range(2, T):
        spec = state_spec(t)
        if spec is None or spec[0] != trans[0] or spec[2] != trans[2] or not torch.equal(spec[1], trans[1]):
            return None

    found = [_emission(tracked, scored, plan, [step[e] for step in emissions], states, frames, outer, K)
             for e in range(len(emissions[0]))]
    if any(f is None for f in found):
        return None
    specs, values = [f[0] for f in found], [f[1] for f in found]
    plate_size = outer[0].size if outer else None
    values = [torch.stack(v, 1) if plate_size is not None else torch.stack(v, 0).unsqueeze(0) for v in values]
    if plate_size is not None and values[0].shape[0] != plate_size:
        return None
    if len(values) > 1:  # a JointEmission's value: each emission's flattened, side by side
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in values if v.is_floating_point()], torch.get_default_dtype())
        values = [torch.cat([v.reshape(v.shape[:2] + (-1,)).to(dtype) for v in values], -1)]
    values = values[0]

    dim = outer[0].dim if outer else None
    masks = [_step_mask(scored.nodes[n]["mask"], dim) for n in states]
    if any(m is False for m in masks) or any(
        not _same_mask(_step_mask(scored.nodes[e]["mask"], dim), m) for step, m in zip(emissions, masks) for e in step
    ):
        return None
    S = values.shape[0]
    active = None
    if any(m is not None for m in masks):
        active = torch.stack([torch.ones(S, dtype=torch.bool) if m is None else m.expand(S) for m in masks], 1)
        if not bool(active[:, 0].all()) or bool((active[:, 1:] & ~active[:, :-1]).any()):
            return None  # only sequences that end, never gaps, are fused

    # The DiscreteHMM's transitions: identity first (z[0] ~ start), the param's ids after.
    trans_ids = torch.full((1, K, K), -1, dtype=start[1].dtype)
    if trans is not None:
        trans_ids = torch.cat([trans_ids, trans[1].expand(T - 1, K, K)])
    fused = MStepPlan()
    parts = ["observation"] if len(specs) == 1 else [f"observation.{e}" for e in range(len(specs))]
    for part, spec in zip(parts, specs):
        fused.tracked_args[(SITE, part)] = {a: v for a, v in spec.args.items() if v[0] is not None}
    for name in plan.closed_form:
        uses = []
        if name == start[0]:
            uses.append(Use(SITE, "", start[2], start[1], find_rule(dist.DiscreteHMM, "initial_logits")))
        if trans is not None and name == trans[0]:
            uses.append(Use(SITE, "", trans[2], trans_ids, find_rule(dist.DiscreteHMM, "transition_logits")))
        for part, spec, step in zip(parts, specs, zip(*emissions)):
            for arg, (pname, ids) in spec.args.items():
                if pname != name:
                    continue
                # The rule the plan found at the first step's emission site serves every step.
                like = next((u for u in plan.closed_form[name] if u.site == step[0] and u.arg == arg), None)
                if like is None:
                    return None
                uses.append(Use(SITE, part, arg, ids, like.rule, like.joint))
        uses += [u for u in plan.closed_form[name] if u.site in priors]  # as planned: traced
        if not uses:
            return None
        fused.closed_form[name] = uses
    fused.passes = solve_passes(fused)
    return FusedChain(values, active, start, trans, specs, fused, priors, states, plate_size is not None)


class _Emission(NamedTuple):
    """One emission of a fused chain's steps: its family, arguments (``arg -> (param, ids)``
    or ``(None, constant)``, indexed by the state first) and the dims ``.to_event`` makes
    (its own plates included)."""

    type: type
    args: Dict[str, Tuple[Optional[str], torch.Tensor]]
    event_dims: int

    def distribution(self) -> td.Distribution:
        """The emission at the current param values, batch ``(K,)``."""
        store = pyro.get_param_store()
        args = {arg: store[name].detach().reshape(-1)[ids] if name is not None else ids
                for arg, (name, ids) in self.args.items()}
        fn = self.type(**args, validate_args=False)
        return fn.to_event(self.event_dims) if self.event_dims else fn


def _emission(tracked: Trace, scored: Trace, plan: MStepPlan, names: List[str], states: List[str], frames: dict,
              outer: tuple, K: int) -> Optional[Tuple[_Emission, List[torch.Tensor]]]:
    """The emission sites ``names`` (one per step) as one :class:`_Emission`, with their values,
    if they share a family and (state-indexed) arguments; they may sit in plates of their own
    on the rightmost dims (examples/hmm.py's tones), read as event dims. Else None."""
    inner = {tuple(sorted(set(frames[n]) - set(outer), key=lambda f: f.dim)) for n in names}
    if len(inner) != 1 or any(not set(outer) <= set(frames[n]) for n in names):
        return None
    inner = next(iter(inner))
    if [f.dim for f in inner] != list(range(-len(inner), 0)) or any(f.dim != -len(inner) - 1 for f in outer):
        return None
    inner_shape = tuple(f.size for f in inner)
    found, values = None, []
    for t, name in enumerate(names):
        site = tracked.nodes[name]
        fn, event = site["fn"], 0
        while isinstance(fn, (td.Independent, dist.torch_distribution.ExpandedDistribution)):
            event += getattr(fn, "reinterpreted_batch_ndims", 0)
            fn = fn.base_dist
        if isinstance(fn, (dist.MaskedDistribution, td.OneHotCategorical, MissingMultivariateNormal)):
            return None
        # The emission's own plates count as event dims, to the left of the reinterpreted ones.
        enum_dim = scored.nodes[states[t]]["infer"]["_enumerate_dim"] + len(inner)
        spec = {}
        tracked_args = plan.tracked_args.get((name, ""), {})
        for arg, tensor in distribution_args(fn, None).items():
            # The argument's own event dims and the dims .to_event reinterpreted follow the state.
            arg_event = tensor.dim() - len(fn.batch_shape) + event + len(inner)
            pname, ids = tracked_args.get(arg, (None, compact(tensor)))
            ids = _canonical(ids, enum_dim, arg_event, K)
            if ids is None or (pname is not None and bool((ids < 0).any())):
                return None
            spec[arg] = (pname, ids.expand((K,) + inner_shape + ids.shape[1 + len(inner):]))
        this = _Emission(type(fn), spec, event + len(inner))
        if found is None:
            found = this
        elif (
            this.type is not found.type
            or this.event_dims != found.event_dims
            or spec.keys() != found.args.keys()
            or any(spec[a][0] != found.args[a][0] or not torch.equal(spec[a][1], found.args[a][1]) for a in spec)
        ):
            return None
        values.append(scored.nodes[name]["value"].detach())
    return found, values


def _priors(sites: list, plan: MStepPlan) -> Optional[Dict[str, Tuple[td.Distribution, str, bool]]]:
    """The MAP sites, ``{site: (prior, param, counted)}``, if each has a fixed prior (no param
    in its arguments), unit scale, no mask but True or False (``counted``) and its value one
    whole param; else None (no fused chain). Their plates, if any, are checked by the caller."""
    priors = {}
    for name, site in sites:
        if not site["infer"].get(MAP_FLAG):
            continue
        tracked = plan.tracked_args.get((name, ""), {})
        if not _unit_scale(site) or site["mask"] not in (None, True, False) or set(tracked) != {"value"}:
            return None
        param, ids = tracked["value"]
        if not torch.equal(ids.reshape(-1), torch.arange(ids.numel(), device=ids.device)):
            return None
        priors[name] = (site["fn"], param, site["mask"] is not False)
    return priors


def _unit_scale(site) -> bool:
    scale = packed_scale(site)
    return isinstance(scale, float) and scale == 1.0


def _step_mask(mask, dim: Optional[int]):
    """A site's mask as one flag per sequence (along the plate at ``dim``), None if it masks
    nothing, False if it varies along another dim (no fused chain)."""
    if mask is None or mask is True:
        return None
    if not isinstance(mask, torch.Tensor) or (dim is None and mask.numel() != 1):
        return False
    if dim is None:
        return mask.reshape(())
    mask = mask.reshape((1,) * max(0, -dim - mask.dim()) + mask.shape)
    if any(n != 1 for i, n in enumerate(mask.shape) if i != mask.dim() + dim):
        return False
    return mask.reshape(mask.shape[mask.dim() + dim])


def _same_mask(a, b) -> bool:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool((a == b).all())
