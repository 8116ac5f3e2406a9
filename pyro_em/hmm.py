"""Forward-backward for :class:`~pyro.distributions.DiscreteHMM`: log likelihood and posteriors.

Pyro's ``DiscreteHMM`` has a hidden state ``z[-1] ~ initial``, then for ``t = 0 .. T-1``
``z[t] ~ transition[t][z[t-1]]`` and ``x[t] ~ observation[z[t]]``. Its own ``log_prob`` uses a
parallel scan (depth log T, work T K^3). Here the forward and backward recursions run in
probability space with per-step normalization (Rabiner's scaling, as in hmmlearn's
``implementation="scaling"``): work T K^2, no underflow at any length or precision, and the
posteriors come out of one pass: the start state's, the pairwise ``(z[t-1], z[t])`` ones of
the transitions (xi) and the per-step ones of the observations (gamma), which are exactly
the weights of Baum-Welch's closed-form updates.
"""

from typing import NamedTuple, Tuple

import torch
from pyro.distributions import DiscreteHMM


class HMMPosterior(NamedTuple):
    """Output of :func:`forward_backward` (batch dims ``...`` of the HMM).

    :ivar log_z: ``(...)`` log likelihood of each sequence.
    :ivar initial: ``(..., K)`` posterior of ``z[-1]``.
    :ivar transition: ``(..., T, K, K)`` posterior of ``(z[t-1], z[t])``.
    :ivar observation: ``(..., T, K)`` posterior of ``z[t]``.
    """

    log_z: torch.Tensor
    initial: torch.Tensor
    transition: torch.Tensor
    observation: torch.Tensor


def hmm_factors(fn: DiscreteHMM, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized ``initial (..., K)``, ``transition (..., T, K, K)`` (expanded) and
    observation ``(..., T, K)`` log factors of ``fn`` at ``value``."""
    obs = fn.observation_dist.log_prob(value.unsqueeze(-1 - fn.observation_dist.event_dim))
    K = obs.shape[-1]
    trans = fn.transition_logits
    time_shape = torch.broadcast_shapes(trans.shape[:-2], obs.shape[:-1])
    trans = trans.expand(time_shape + (K, K))
    batch = torch.broadcast_shapes(fn.initial_logits.shape[:-1], time_shape[:-1])
    return fn.initial_logits.expand(batch + (K,)), trans, obs.expand(time_shape + (K,))


class _Forward(NamedTuple):
    alphas: torch.Tensor  # (T + 1, ..., K): filtered state probabilities, alphas[0] = initial
    scales: torch.Tensor  # (T, ...): per-step normalizers of the shifted likelihoods
    log_z: torch.Tensor  # (...)
    b: torch.Tensor  # (T, ..., K): observation likelihoods, shifted to max 1 per step
    probs: torch.Tensor  # (..., T or 1, K, K): transition probabilities


def _forward(initial: torch.Tensor, trans: torch.Tensor, obs: torch.Tensor) -> _Forward:
    T = obs.shape[-2]
    # A homogeneous chain was expanded over time: exponentiate one matrix, not T copies.
    probs = (trans[..., :1, :, :] if trans.stride(-3) == 0 else trans).exp()
    shift = obs.max(-1).values.clamp_min(torch.finfo(obs.dtype).min)  # (..., T)
    b = (obs - shift.unsqueeze(-1)).exp().movedim(-2, 0)
    batch = torch.broadcast_shapes(initial.shape[:-1], obs.shape[:-2])
    alphas = obs.new_empty((T + 1,) + batch + obs.shape[-1:])
    alphas[0] = initial.exp()
    scales = obs.new_empty((T,) + batch)
    for t in range(T):
        a = (alphas[t].unsqueeze(-2) @ _at(probs, t)).squeeze(-2) * b[t]
        torch.sum(a, -1, out=scales[t])
        torch.div(a, scales[t].unsqueeze(-1), out=alphas[t + 1])
    log_z = scales.log().sum(0) + shift.sum(-1)
    return _Forward(alphas, scales, log_z, b, probs)


def _at(probs: torch.Tensor, t: int) -> torch.Tensor:
    return probs[..., 0 if probs.shape[-3] == 1 else t, :, :]


def hmm_log_prob(fn: DiscreteHMM, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)`` by the scaled forward pass (not differentiable)."""
    with torch.no_grad():
        return _forward(*hmm_factors(fn, value)).log_z


def forward_backward(fn: DiscreteHMM, value: torch.Tensor) -> HMMPosterior:
    """The log likelihood and every posterior of ``fn`` at ``value`` (see :class:`HMMPosterior`)."""
    with torch.no_grad():
        fwd = _forward(*hmm_factors(fn, value))
        T = fwd.scales.shape[0]
        # betas[t] is p(x[t+1:] | z[t]) divided by the later scales, so alphas[t+1] * betas[t]
        # is the posterior of z[t]; the loop leaves beta as that of z[-1].
        betas = torch.empty_like(fwd.b)
        beta = torch.ones_like(fwd.alphas[0])
        for t in range(T - 1, -1, -1):
            betas[t] = beta
            beta = (_at(fwd.probs, t) @ (fwd.b[t] * beta / fwd.scales[t].unsqueeze(-1)).unsqueeze(-1)).squeeze(-1)
        observation = (fwd.alphas[1:] * betas).movedim(0, -2)
        b_beta = (fwd.b * betas / fwd.scales.unsqueeze(-1)).movedim(0, -2)
        transition = fwd.alphas[:-1].movedim(0, -2).unsqueeze(-1) * fwd.probs * b_beta.unsqueeze(-2)
        return HMMPosterior(fwd.log_z, fwd.alphas[0] * beta, transition, observation)


def viterbi(fn: DiscreteHMM, value: torch.Tensor) -> torch.Tensor:
    """The most probable state path of each sequence: ``(..., T)`` states ``z[0 .. T-1]``.

    Example, after fitting a model whose site ``"x"`` is a ``DiscreteHMM``::

        trace = poutine.trace(em.fitted_model).get_trace(data)
        paths = viterbi(trace.nodes["x"]["fn"], data)
    """
    with torch.no_grad():
        initial, trans, obs = hmm_factors(fn, value)
        T = obs.shape[-2]
        score = initial  # (..., K): best log joint of a path ending in each state, z[-1] first
        backpointers = []
        for t in range(T):
            step = trans[..., t, :, :] + score.unsqueeze(-1)  # (..., K_prev, K)
            score, best_prev = step.max(-2)
            score = score + obs[..., t, :]
            backpointers.append(best_prev)
        state = score.argmax(-1)
        path = [state]
        for best_prev in reversed(backpointers[1:]):
            state = best_prev.gather(-1, state.unsqueeze(-1)).squeeze(-1)
            path.append(state)
        return torch.stack(path[::-1], -1)
