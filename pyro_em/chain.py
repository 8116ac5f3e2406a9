"""Fused Markov chains: a ``pyro.markov`` HMM fitted without tracing the model at every step.

A model written with ``pyro.markov`` costs one Pyro sample statement per state and per
observation at every EM step. When the trace has exactly that shape -- Categorical states
``z[0] ~ start``, ``z[t] ~ trans[z[t-1]]``, one emission site per step that depends on
``z[t]`` alone, every param used directly (as the plan found), the same tables at every step,
masks that only switch sequences off for good -- the chain is rebuilt once as the equivalent
:class:`~pyro.distributions.DiscreteHMM` (identity first transition, masked emissions past each
sequence's end, where the chain runs on unseen and leaves the likelihood and the earlier
posteriors as they are, and whose transitions the statistics leave out), whose arguments are
gathered from the current params by the plan's ids. A step is then one forward-backward pass and the usual closed-form rules,
pooled into the original params. Anything else takes the general path.

The emission may sit in plates of its own on the rightmost dims (examples/hmm.py's tones),
read as event dims of one emission. MAP sites (:mod:`pyro_em.map_sites`) with fixed priors, as
in examples/hmm.py and the enumeration tutorial, are kept: their priors are evaluated at the
current MAP values at each step, for the loss and for the conjugate rules' pseudo-counts.

A mixture is the chain of length one: a plate with one Categorical latent ``z ~ weights`` and
one emission that depends on ``z`` alone steps as a DiscreteHMM with ``T = 1``, without tracing
the model either.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
import torch.distributions as td
from pyro.poutine.trace_struct import Trace

from ._validation import MAP_FLAG
from .closed_form import MStepPlan, Use, components, distribution_args, unwrap
from .estep import enum_symbols, packed_scale
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
    emission_type: type
    emission_args: Dict[str, Tuple[Optional[str], torch.Tensor]]  # arg -> (param, ids) or (None, value)
    emission_event_dims: int  # dims reinterpreted by .to_event, and the emission's own plates
    plan: MStepPlan
    priors: Dict[str, Tuple[td.Distribution, str, bool]] = field(default_factory=dict)  # MAP site -> (prior, param, unmasked)

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
        args = {
            arg: store[name].detach().reshape(-1)[ids] if name is not None else ids
            for arg, (name, ids) in self.emission_args.items()
        }
        emission = self.emission_type(**args, validate_args=False)
        if self.emission_event_dims:
            emission = emission.to_event(self.emission_event_dims)
        if self.active is not None:
            emission = emission.expand((S, T, K)).mask(self.active[..., None])
        return dist.DiscreteHMM(start, transitions, emission)

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
    emissions: List[str] = []
    for name, site in sites:
        deps = symbols.intersection(site["packed"]["log_prob"]._pyro_dims)
        own = site["infer"].get("_enumerate_symbol")
        if own is not None:
            prev = scored.nodes[states[-1]]["infer"]["_enumerate_symbol"] if states else None
            if deps != ({own} if prev is None else {own, prev}) or len(emissions) != len(states):
                return None
            states.append(name)
        else:
            if not states or deps != {scored.nodes[states[-1]]["infer"]["_enumerate_symbol"]} or len(emissions) != len(states) - 1:
                return None
            emissions.append(name)
    T = len(states)
    if T < 1 or len(emissions) != T:
        return None
    # The states share one plate (the sequences) or none; the emissions may add plates of
    # their own on the rightmost dims (examples/hmm.py's tones), read as event dims.
    outer = {frames[n] for n in states}
    if len(outer) != 1 or len(next(iter(outer))) > 1:
        return None
    outer = next(iter(outer))
    if any(f.name in prior_plates for f in outer):
        return None  # MAP values local to the sequences
    inner = {tuple(sorted(set(frames[n]) - set(outer), key=lambda f: f.dim)) for n in emissions}
    if len(inner) != 1 or any(not set(outer) <= set(frames[n]) for n in emissions):
        return None
    inner = next(iter(inner))
    if [f.dim for f in inner] != list(range(-len(inner), 0)) or any(f.dim != -len(inner) - 1 for f in outer):
        return None
    inner_shape = tuple(f.size for f in inner)

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

    # Emissions: the same family and the same (state-indexed) arguments at every step.
    emission_args, emission_type, event_dims, values = None, None, None, []
    for t, name in enumerate(emissions):
        site = tracked.nodes[name]
        fn, event = site["fn"], 0
        while isinstance(fn, (td.Independent, dist.torch_distribution.ExpandedDistribution)):
            event += getattr(fn, "reinterpreted_batch_ndims", 0)
            fn = fn.base_dist
        if isinstance(fn, (dist.MaskedDistribution, td.OneHotCategorical)):
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
        event += len(inner)
        if emission_args is None:
            emission_args, emission_type, event_dims = spec, type(fn), event
        elif (
            type(fn) is not emission_type
            or event != event_dims
            or spec.keys() != emission_args.keys()
            or any(spec[a][0] != emission_args[a][0] or not torch.equal(spec[a][1], emission_args[a][1]) for a in spec)
        ):
            return None
        values.append(scored.nodes[name]["value"].detach())

    plate_size = outer[0].size if outer else None
    values = torch.stack(values, 1) if plate_size is not None else torch.stack(values, 0).unsqueeze(0)
    if plate_size is not None and values.shape[0] != plate_size:
        return None

    dim = outer[0].dim if outer else None
    masks = [_step_mask(scored.nodes[n]["mask"], dim) for n in states]
    if any(m is False for m in masks) or any(
        not _same_mask(_step_mask(scored.nodes[e]["mask"], dim), m) for e, m in zip(emissions, masks)
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
    generic = {(u.arg, name): u for name, uses in plan.closed_form.items() for u in uses}
    fused = MStepPlan()
    fused.tracked_args[(SITE, "observation")] = {a: v for a, v in emission_args.items() if v[0] is not None}
    for name in plan.closed_form:
        uses = []
        if name == start[0]:
            uses.append(Use(SITE, "", start[2], start[1], find_rule(dist.DiscreteHMM, "initial_logits")))
        if trans is not None and name == trans[0]:
            uses.append(Use(SITE, "", trans[2], trans_ids, find_rule(dist.DiscreteHMM, "transition_logits")))
        for arg, (pname, ids) in emission_args.items():
            if pname == name:
                like = generic[(arg, name)]
                uses.append(Use(SITE, "observation", arg, ids, like.rule, like.joint))
        uses += [u for u in plan.closed_form[name] if u.site in priors]  # as planned: traced
        if not uses:
            return None
        fused.closed_form[name] = uses
    return FusedChain(values, active, start, trans, emission_type, emission_args, event_dims, fused, priors)


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
