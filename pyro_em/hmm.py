"""Forward-backward for :class:`~pyro.distributions.DiscreteHMM`: log likelihood and posteriors.

Pyro's ``DiscreteHMM`` has a hidden state ``z[-1] ~ initial``, then for ``t = 0 .. T-1``
``z[t] ~ transition[t][z[t-1]]`` and ``x[t] ~ observation[z[t]]``. Its own ``log_prob`` uses a
parallel scan (depth log T, work T K^3). Here the forward and backward recursions run in
probability space with per-step normalization (Rabiner's scaling, as in hmmlearn's
``implementation="scaling"``): work T K^2, no underflow at any length or precision, and the
posteriors come out of one pass: the start state's, the pairwise ``(z[t-1], z[t])`` ones of
the transitions (xi) and the per-step ones of the observations (gamma), which are exactly
the weights of Baum-Welch's closed-form updates.

:func:`parallel_forward_backward` is the log-depth alternative (as dynamax's parallel
smoother, Särkkä and García-Fernández 2021): ``log Z`` by Pyro's own tree of log-space matrix
products, every posterior as its gradient. It does K times the work but only ``2 log2 T``
sequential steps, so it wins where each sequential step is cheap but many (a GPU, or few short
state spaces over long sequences); :func:`forward_backward` chooses (see
:func:`use_parallel`).
"""

import functools
import operator
from typing import NamedTuple, Optional, Tuple

import torch
from pyro.distributions import DiscreteHMM
from pyro.distributions.hmm import _sequential_logmatmulexp

from .tracking import compact


class HMMPosterior(NamedTuple):
    """Output of :func:`forward_backward` (batch dims ``...`` of the HMM).

    :ivar log_z: ``(...)`` log likelihood of each sequence.
    :ivar initial: ``(..., K)`` posterior of ``z[-1]``.
    :ivar observation: ``(..., T, K)`` posterior of ``z[t]``.
    :ivar transition_factors: tensors whose product, ``(..., T, K, K)``, is the posterior of
        ``(z[t-1], z[t])``; kept apart so that expected counts are one contraction.
    """

    log_z: torch.Tensor
    initial: torch.Tensor
    observation: torch.Tensor
    transition_factors: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    @property
    def transition(self) -> torch.Tensor:
        """``(..., T, K, K)`` posterior of ``(z[t-1], z[t])``."""
        return functools.reduce(operator.mul, self.transition_factors)

    def scaled(self, weight: torch.Tensor) -> "HMMPosterior":
        """The posteriors times a per-sequence ``weight`` (a site's scale and mask)."""
        first, *rest = self.transition_factors
        return HMMPosterior(
            self.log_z, self.initial * weight[..., None], self.observation * weight[..., None, None],
            (first * weight[..., None, None, None], *rest),
        )


def hmm_factors(fn: DiscreteHMM, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized ``initial (..., K)``, ``transition (..., T, K, K)`` (expanded) and
    observation ``(..., T, K)`` log factors of ``fn`` at ``value``."""
    from .kernels import log_prob  # (kernels uses this module's forward pass for DiscreteHMM)

    obs = log_prob(fn.observation_dist, value.unsqueeze(-1 - fn.observation_dist.event_dim))
    trans = fn.transition_logits
    K = trans.shape[-1]  # the observation may broadcast over the states
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
    # Exponentiate the transitions before broadcasting: one matrix for a homogeneous chain,
    # one per step for a time-varying one, a batch of them only if they vary by sequence.
    probs = compact(trans).exp()
    shift = obs.max(-1).values.clamp_min(torch.finfo(obs.dtype).min)  # (..., T)
    b = (obs - shift.unsqueeze(-1)).exp().movedim(-2, 0)
    batch = torch.broadcast_shapes(initial.shape[:-1], obs.shape[:-2])
    alphas = obs.new_empty((T + 1,) + batch + obs.shape[-1:])
    alphas[0] = initial.exp()
    scales = obs.new_empty((T,) + batch)
    step = _steps(probs, T)
    for t in range(T):
        a = _matmul(alphas[t], step[t]).mul_(b[t])
        torch.sum(a, -1, out=scales[t])
        torch.div(a, scales[t].unsqueeze(-1), out=alphas[t + 1])
    log_z = scales.log().sum(0) + shift.sum(-1)
    return _Forward(alphas, scales, log_z, b, probs)


def _steps(probs: torch.Tensor, T: int) -> list:
    """The transition matrix of each step (views; one shared matrix if homogeneous), as
    plain K x K matrices unless they vary along a batch dim."""
    per_step = probs.movedim(-3, 0)
    if all(n == 1 for n in per_step.shape[1:-2]):
        per_step = per_step.reshape(per_step.shape[:1] + per_step.shape[-2:])
    return [per_step[0]] * T if per_step.shape[0] == 1 else list(per_step.unbind(0))


def _matmul(row: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``row @ A`` for a batch of rows ``(..., K)``, batched over ``A``'s leading dims if any."""
    return row @ A if A.dim() == 2 else (row.unsqueeze(-2) @ A).squeeze(-2)


_last_forward: list = []  # (fn, value, _Forward) of the latest E-step, reused by forward_backward


#: ``None`` to choose per call (:func:`use_parallel`); ``True`` or ``False`` to force.
PARALLEL: Optional[bool] = None


def use_parallel(batch: int, T: int, K: int, device: torch.device) -> bool:
    """Whether :func:`parallel_forward_backward` is the faster here: always on a GPU (a
    sequential step is a kernel launch), on a CPU for long sequences whose steps carry little
    work (``batch * K**3`` small: the parallel tree's K^3 work per step against the sequential
    loop's Python overhead). Measured by ``benchmarks/bench_hmm.py --scan``."""
    if PARALLEL is not None:
        return PARALLEL
    if device.type != "cpu":
        return T > 1
    return T >= 64 and batch * K**3 <= 4096


def hmm_log_prob(fn: DiscreteHMM, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)`` by a forward pass (not differentiable). The pass is kept for a
    :func:`forward_backward` on the same ``fn`` and ``value`` (the M-step after an E-step)."""
    with torch.no_grad():
        factors = hmm_factors(fn, value)
    if _parallel(*factors):
        post = parallel_forward_backward(*factors)
        _last_forward[:] = [fn, value, post]
        return post.log_z
    with torch.no_grad():
        fwd = _forward(*factors)
    _last_forward[:] = [fn, value, fwd]
    return fwd.log_z


def _parallel(initial: torch.Tensor, trans: torch.Tensor, obs: torch.Tensor) -> bool:
    batch = torch.broadcast_shapes(initial.shape[:-1], obs.shape[:-2]).numel()
    return use_parallel(batch, obs.shape[-2], obs.shape[-1], obs.device)


def forward_backward(fn: DiscreteHMM, value: torch.Tensor) -> HMMPosterior:
    """The log likelihood and every posterior of ``fn`` at ``value`` (see :class:`HMMPosterior`),
    by the scaled forward-backward recursions or :func:`parallel_forward_backward`."""
    cached = _last_forward[2] if _last_forward and _last_forward[0] is fn and _last_forward[1] is value else None
    _last_forward.clear()
    if isinstance(cached, HMMPosterior):
        return cached
    with torch.no_grad():
        factors = hmm_factors(fn, value) if cached is None else None
    if cached is None and _parallel(*factors):
        return parallel_forward_backward(*factors)
    with torch.no_grad():
        fwd = cached if cached is not None else _forward(*factors)
        T = fwd.scales.shape[0]
        # betas[t] is p(x[t+1:] | z[t]) divided by the later scales, so alphas[t+1] * betas[t]
        # is the posterior of z[t]; b_beta[t] = b[t] * betas[t] / scales[t], and the loop
        # leaves beta as the posterior weight of z[-1].
        b_beta = fwd.b / fwd.scales.unsqueeze(-1)  # b[t] / scales[t], times beta[t] below
        beta = torch.ones_like(fwd.alphas[0])
        step = _steps(fwd.probs.mT, T)  # A^T per step: beta_{t-1} = b_beta_t @ A_t^T
        for t in range(T - 1, -1, -1):
            beta = _matmul(b_beta[t].mul_(beta), step[t])
        prev, b_beta = fwd.alphas[:-1].movedim(0, -2), b_beta.movedim(0, -2)  # (..., T, K)
        # The posterior of z[t] is that of (z[t-1], z[t]) summed over z[t-1]: one batched matmul.
        observation = (prev.unsqueeze(-2) @ fwd.probs).squeeze(-2) * b_beta
        factors = (prev.unsqueeze(-1), fwd.probs, b_beta.unsqueeze(-2))
        return HMMPosterior(fwd.log_z, fwd.alphas[0] * beta, observation, factors)


def parallel_forward_backward(initial: torch.Tensor, trans: torch.Tensor, obs: torch.Tensor) -> HMMPosterior:
    """Every posterior of an HMM with log factors ``initial (..., K)``, ``trans (..., T, K, K)``
    and ``obs (..., T, K)`` (see :func:`hmm_factors`) in ``O(log T)`` sequential steps: ``log Z``
    is a tree of log-space matrix products (Pyro's, as ``DiscreteHMM.log_prob``), and
    ``d log Z / d factor`` is the posterior of that factor's states, so one backward pass
    through the tree gives the start state's, each transition's (pairwise) and each step's.
    """
    batch = torch.broadcast_shapes(initial.shape[:-1], obs.shape[:-2])
    with torch.enable_grad():
        init = initial.detach().expand(batch + initial.shape[-1:]).requires_grad_()
        # One (K, K) factor per step: the transition into z[t] and the observation of z[t].
        steps = (trans.detach() + obs.detach().unsqueeze(-2)).expand(batch + trans.shape[-3:]).contiguous().requires_grad_()
        log_z = (init.unsqueeze(-1) + _sequential_logmatmulexp(steps)).logsumexp(-1).logsumexp(-1)
        g_init, g_steps = torch.autograd.grad(log_z.sum(), [init, steps])
    return HMMPosterior(log_z.detach(), g_init, g_steps.sum(-2), (g_steps,))


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
