"""Forward-backward for :class:`~pyro.distributions.DiscreteHMM`: log likelihood and posteriors.

Pyro's ``DiscreteHMM`` has a hidden state ``z[-1] ~ initial``, then for ``t = 0 .. T-1``
``z[t] ~ transition[t][z[t-1]]`` and ``x[t] ~ observation[z[t]]``. Its own ``log_prob`` uses a
parallel scan (depth log T, work T K^3). Here the forward and backward recursions run in
probability space with per-step normalization (Rabiner's scaling, as in hmmlearn's
``implementation="scaling"``): work T K^2, no underflow at any length or precision, and the
posteriors come out of one pass: the start state's, the pairwise ``(z[t-1], z[t])`` ones of
the transitions (xi) and the per-step ones of the observations (gamma), which are exactly
the weights of Baum-Welch's closed-form updates.

Two variants cut the ``2 T`` sequential steps, which cost more than their arithmetic when a
step is small (few sequences and states): the blocked recursions (:func:`_forward_blocked`)
give the same numbers in about ``5 sqrt(T)`` steps for ``K`` times the work of the first
pass, and :func:`parallel_forward_backward` is the log-depth one (as dynamax's parallel
smoother, Särkkä and García-Fernández 2021): ``log Z`` by Pyro's own tree of log-space
matrix products, every posterior as its gradient, in ``2 log2 T`` steps.
:func:`choose_algorithm` picks one per call.
"""

import contextlib
import contextvars
import functools
import math
import operator
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
from pyro.distributions import DiscreteHMM
from pyro.distributions.hmm import _logmatmulexp
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

from . import kernels, memo
from .tracking import broadcast_shapes, compact, expanded


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
        if bool((weight == 1).all()):
            return self
        first, *rest = self.transition_factors
        return HMMPosterior(
            self.log_z, self.initial * weight[..., None], self.observation * weight[..., None, None],
            (first * weight[..., None, None, None], *rest),
        )


class JointEmission(TorchDistribution):
    """Several independent emissions of one state as one observation distribution, for a
    :class:`~pyro.distributions.DiscreteHMM` whose steps emit more than one site: its value is
    theirs, each flattened, concatenated along one event dim (as floats), its log density the
    sum of theirs. :mod:`pyro_em.chain` builds one for a ``pyro.markov`` chain with several
    emission sites per step, and the closed-form rules see each part as a part of its own.

    :param parts: distributions of one batch shape, each with its own event shape.

    Example::

        emission = JointEmission([dist.Normal(locs, scales), dist.Categorical(probs)])
        value = torch.stack([x, y.double()], -1)     # x and y side by side
        x_again, y_again = emission.split(value)
    """

    arg_constraints: dict = {}
    support = constraints.real

    def __init__(self, parts, validate_args=None):
        self.parts = list(parts)
        self.sizes = [p.event_shape.numel() for p in self.parts]
        batch = broadcast_shapes(*(p.batch_shape for p in self.parts))
        super().__init__(batch, torch.Size([sum(self.sizes)]), validate_args=False)

    def split(self, value: torch.Tensor) -> list:
        """Each part's value, ``(..., *event_i)``, from the joint one."""
        out, start = [], 0
        for part, n in zip(self.parts, self.sizes):
            out.append(value[..., start : start + n].reshape(value.shape[:-1] + part.event_shape))
            start += n
        return out

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return sum(p.log_prob(v) for p, v in zip(self.parts, self.split(value)))


def hmm_factors(fn: DiscreteHMM, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized ``initial (..., K)``, ``transition (..., T, K, K)`` (expanded) and
    observation ``(..., T, K)`` log factors of ``fn`` at ``value``."""
    obs = kernels.log_prob(fn.observation_dist, value.unsqueeze(-1 - fn.observation_dist.event_dim))
    trans = fn.transition_logits
    K = trans.shape[-1]  # the observation may broadcast over the states
    time_shape = broadcast_shapes(trans.shape[:-2], obs.shape[:-1])
    trans = trans.expand(time_shape + (K, K))
    batch = broadcast_shapes(fn.initial_logits.shape[:-1], time_shape[:-1])
    return fn.initial_logits.expand(batch + (K,)), trans, obs.expand(time_shape + (K,))


class _Blocked(NamedTuple):
    """The blocked forward pass's state that its backward pass reuses (see :func:`_forward`)."""

    blocks: "_Blocks"
    transitions: torch.Tensor  # (K, K), or (L, C, K, K) one per step
    products: torch.Tensor  # (C, K, S, K): each block's product of A_t diag(b_t), rescaled,
    # entry (i, j) of sequence s at [c, j, s, i]
    starts: torch.Tensor  # (C, S, K): the filtered state at each block's start (alphas[c L])
    b: torch.Tensor  # (C L, S, K): b, padded with ones
    scales: torch.Tensor  # (C L, S): scales, padded


class _Forward(NamedTuple):
    alphas: torch.Tensor  # (T + 1, ..., K): filtered state probabilities (alphas[0] see prev)
    scales: torch.Tensor  # (T, ...): per-step normalizers of the shifted likelihoods
    log_z: torch.Tensor  # (...)
    b: torch.Tensor  # (T, ..., K): observation likelihoods, shifted to max 1 per step (blocked:
    # a view of the buffer the backward pass turns into b * beta / scale in place)
    probs: torch.Tensor  # (..., T or 1, K, K): transition probabilities
    first: torch.Tensor  # (..., K): the initial distribution, not broadcast over the sequences
    blocked: Optional[_Blocked] = None  # set by the blocked algorithm

    @property
    def prev(self) -> torch.Tensor:
        """``(T, ..., K)``: the filtered state before each step. With one step (a mixture) it
        is the initial distribution broadcast, a view: ``alphas[0]`` is not written then."""
        if self.alphas.shape[0] == 2:
            return self.first.expand(self.alphas.shape[1:]).unsqueeze(0)
        return self.alphas[:-1]


def _forward(initial: torch.Tensor, trans: torch.Tensor, obs: torch.Tensor, algorithm: str) -> _Forward:
    T = obs.shape[-2]
    # Exponentiate the transitions before broadcasting: one matrix for a homogeneous chain,
    # one per step for a time-varying one, a batch of them only if they vary by sequence.
    probs = compact(trans).exp()
    shift = obs.max(-1).values.clamp_min(torch.finfo(obs.dtype).min)  # (..., T)
    batch = broadcast_shapes(initial.shape[:-1], obs.shape[:-2])
    first = compact(initial).exp()
    if algorithm == "blocked":
        return _forward_blocked(first, probs, obs, shift, batch)
    b = _exp_flushed(obs - shift.unsqueeze(-1)).movedim(-2, 0)
    alphas = obs.new_empty((T + 1,) + batch + obs.shape[-1:])
    if T > 1:  # read by the statistics of the second transition on (see _Forward.prev)
        alphas[0] = first
    scales = obs.new_empty((T,) + batch)
    step = _steps(probs, T)
    for t in range(T):
        # The first step from the initial distribution before it is broadcast: K rows, not one
        # per sequence.
        a = _matmul(first, step[0]) * b[0] if t == 0 else _matmul(alphas[t], step[t]).mul_(b[t])
        scales[t] = a.sum(-1)  # (assignments, not out=: vmap runs restarts through them)
        alphas[t + 1] = a / scales[t].unsqueeze(-1)
    log_z = scales.log().sum(0) + shift.sum(-1)
    return _Forward(alphas, scales, log_z, b, probs, first)


def _exp_flushed(x: torch.Tensor) -> torch.Tensor:
    """``x.exp()`` in place, results below the smallest normal number (relative likelihoods
    under 1e-38 in float32, 1e-308 in float64) flushed to zero, as a flush-to-zero CPU mode
    would: a CPU's exp takes 10 to 30 times as long on inputs whose results underflow, and
    well-separated mixture components give many (float32 below -87)."""
    cut = math.log(torch.finfo(x.dtype).tiny) + 1.0
    underflow = x < cut
    return x.clamp_min_(cut).exp_().masked_fill_(underflow, 0.0)


class _Blocks(NamedTuple):
    """Time ``0 .. T-1`` cut into ``C`` blocks of ``L`` steps, the last padded."""

    L: int
    C: int

    @staticmethod
    def of(T: int) -> "_Blocks":
        # 3 L + 2 C sequential steps in all (see _forward_blocked): fewest at L = sqrt(2 T / 3).
        L = max(1, round(math.sqrt(2 * T / 3)))
        return _Blocks(L, -(-T // L))

    def step(self, x: torch.Tensor, l: int) -> torch.Tensor:
        """Step ``l`` of every block of a time-major ``(C L, ...)`` tensor: a ``(C, ...)`` view."""
        return x.unflatten(0, (self.C, self.L))[:, l]


def _forward_blocked(initial: torch.Tensor, probs: torch.Tensor, obs: torch.Tensor, shift: torch.Tensor, batch: torch.Size) -> _Forward:
    """The scaled forward recursion in ``3 L + 2 C`` sequential steps instead of ``T``.

    With ``M_t = A_t diag(b_t)`` the unnormalized filter is ``alpha_T = pi M_0 ... M_{T-1}``.
    (1) Every block's product ``P_c`` is built in ``L`` steps, all blocks at once (K times the
    work of a step of the recursion); (2) the filtered state at each block's start follows in
    ``C`` steps, ``v_{c+1} = v_c P_c`` normalized; (3) the recursion itself runs in ``L``
    steps, all blocks at once, each from its own start: the same alphas and scales as the
    sequential loop, to round-off. Each product is rescaled by a positive number at every
    step, so nothing underflows; only its direction matters. Every T-long tensor is
    time-major and padded to ``C L`` steps, written and read through per-step views.
    """
    T, K = obs.shape[-2:]
    S = batch.numel()
    blocks = _Blocks.of(T)
    C, L = blocks.C, blocks.L
    b = obs.new_ones((C * L, S, K))  # padded steps: b = 1
    flat_obs = obs.expand(batch + (T, K)).reshape(S, T, K)
    flat_shift = shift.expand(batch + (T,)).reshape(S, T, 1)
    b[:T] = (flat_obs - flat_shift).transpose(0, 1)
    _exp_flushed(b[:T])
    steps = probs.reshape(probs.shape[-3:])  # (T or 1, K, K): _algorithm checked no batch dims
    # Padded steps change nothing: their b is one, their transition the identity, or the one
    # shared matrix (its rows sum to one, so the padded scales are one and the betas stay one).
    if steps.shape[0] == 1:
        A = steps[0]
    else:
        A = torch.cat([steps, torch.eye(K, dtype=obs.dtype, device=obs.device).expand(C * L - T, K, K)])
        A = A.unflatten(0, (C, L)).transpose(0, 1).contiguous()  # (L, C, K, K)
    # P[c, j, s, i] is entry (i, j) of block c's product for sequence s: a step left-multiplies
    # it by A_t^T, one matrix product over long rows, then scales row j by b_t[j].
    P = (A[0] if A.dim() == 4 else A).mT.unsqueeze(-2) * blocks.step(b, 0).transpose(1, 2).unsqueeze(-1)
    for l in range(1, L):
        norm = P.sum(3).sum(1, keepdim=True)  # (C, 1, S): rescale by the previous step's size
        step = A[l].mT if A.dim() == 4 else A.mT
        b_rows = blocks.step(b, l).transpose(1, 2) / norm  # (C, K, S)
        P = (step @ P.view(C, K, S * K)).view(C, K, S, K).mul_(b_rows.unsqueeze(-1))
    starts = obs.new_empty(C, S, K)
    starts[0] = initial.expand(batch + (K,)).reshape(S, K)
    for c in range(C - 1):
        v = (P[c] * starts[c]).sum(-1).T
        starts[c + 1] = v / v.sum(-1, keepdim=True)
    alphas, scales = obs.new_empty((C * L + 1, S, K)), obs.new_empty((C * L, S))
    alphas[0] = starts[0]
    alpha = starts
    for l in range(L):
        a = _block_matmul(alpha, A, l).mul_(blocks.step(b, l))
        scale = blocks.step(scales, l)
        scale[...] = a.sum(-1)
        alpha = blocks.step(alphas[1:], l)
        alpha[...] = a / scale.unsqueeze(-1)
    log_z = scales[:T].log().sum(0).view(batch) + shift.sum(-1)
    blocked = _Blocked(blocks, A, P, starts, b, scales)
    view = lambda x, n: x[:n].view((n,) + batch + x.shape[2:])  # noqa: E731
    return _Forward(view(alphas, T + 1), view(scales, T), log_z, view(b, T), probs, initial, blocked)


def _block_matmul(x: torch.Tensor, A: torch.Tensor, l: int, transpose: bool = False) -> torch.Tensor:
    """``x @ A_t`` for step ``l`` of every block: ``x`` is ``(C, S, ..., K)``, ``A`` one
    ``(K, K)`` matrix or ``(L, C, K, K)`` per step; one matrix product either way."""
    if A.dim() == 2:
        return (x.reshape(-1, x.shape[-1]) @ (A.mT if transpose else A)).view(x.shape)
    step = A[l].mT if transpose else A[l]
    return (x.reshape(x.shape[0], -1, x.shape[-1]) @ step).view(x.shape)


def _backward_blocked(fwd: _Forward) -> Tuple[torch.Tensor, torch.Tensor]:
    """The backward recursion of :func:`forward_backward` in ``C + L`` sequential steps, from
    the blocked forward pass's products: the backward message at each block's end comes from
    the next block's product (normalized so that it sums to one against that block's
    filtered start, as the exact scaled message does), then every block runs its ``L``
    steps at once. Returns the message of ``z[-1]`` and ``b_t beta_t / scale_t`` ``(T, ..., K)``."""
    blocks, A, P, starts, b, scales = fwd.blocked
    ends = torch.empty_like(starts)  # beta at each block's last step
    ends[-1] = 1
    for c in range(blocks.C - 1, 0, -1):
        w = (P[c] * ends[c].T.unsqueeze(-1)).sum(0)
        ends[c - 1] = w / (starts[c] * w).sum(-1, keepdim=True)
    b_beta = b.div_(scales.unsqueeze(-1))  # b is not needed again
    beta = ends
    for l in range(blocks.L - 1, -1, -1):
        beta = _block_matmul(blocks.step(b_beta, l).mul_(beta), A, l, transpose=True)
    T = fwd.scales.shape[0]
    return beta[0].view(fwd.alphas.shape[1:]), b_beta[:T].view(fwd.alphas[1:].shape)


def _steps(probs: torch.Tensor, T: int) -> list:
    """The transition matrix of each step (views; one shared matrix if homogeneous), as
    plain K x K matrices unless they vary along a batch dim."""
    per_step = probs.movedim(-3, 0)
    if all(n == 1 for n in per_step.shape[1:-2]):
        per_step = per_step.reshape(per_step.shape[:1] + per_step.shape[-2:])
    return [per_step[0]] * T if per_step.shape[0] == 1 else list(per_step.unbind(0))


def _propagate(alphas: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``alphas[t] @ A_t`` for every step at once: ``alphas (T, ..., K)``, transitions
    ``(..., T or 1, K, K)``; one matrix product unless the transitions vary by sequence, over
    the rows ``alphas`` holds (a broadcast one once)."""
    if expanded(alphas):
        rows = compact(alphas)
        return _propagate(rows, probs).expand(broadcast_shapes(alphas.shape, rows.shape[:-1] + alphas.shape[-1:]))
    steps = probs.movedim(-3, 0)
    if any(n > 1 for n in steps.shape[1:-2]):
        return (alphas.unsqueeze(-2) @ steps).squeeze(-2)
    steps = steps.reshape(steps.shape[:1] + steps.shape[-2:])
    flat = alphas.reshape(alphas.shape[0] if steps.shape[0] > 1 else 1, -1, alphas.shape[-1])
    return (flat @ steps).view(alphas.shape)


def _matmul(row: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``row @ A`` for a batch of rows ``(..., K)``, batched over ``A``'s leading dims if any."""
    return row @ A if A.dim() == 2 else (row.unsqueeze(-2) @ A).squeeze(-2)


ALGORITHMS = ("sequential", "blocked", "parallel")

_ALGORITHM: contextvars.ContextVar = contextvars.ContextVar("pyro_em_hmm_algorithm", default=None)


@contextlib.contextmanager
def algorithm(name: Optional[str]) -> Iterator[None]:
    """Inside the block, every forward-backward pass uses ``name`` (one of :data:`ALGORITHMS`);
    ``None`` keeps the enclosing block's choice, by default the one :func:`choose_algorithm`
    makes per call. ``EM(model, hmm_algorithm=...)`` runs its steps so.

    Example::

        with pyro_em.hmm.algorithm("parallel"):
            em.fit(data)

    :raises ValueError: if ``name`` is not ``None`` nor one of :data:`ALGORITHMS`."""
    if name is not None and name not in ALGORITHMS:
        raise ValueError(f"hmm_algorithm must be None or one of {ALGORITHMS}, got {name!r}.")
    token = _ALGORITHM.set(name if name is not None else _ALGORITHM.get())
    try:
        yield
    finally:
        _ALGORITHM.reset(token)


def choose_algorithm(batch: int, T: int, K: int, device: torch.device) -> str:
    """The forward-backward algorithm for ``batch`` sequences of ``T`` steps over ``K``
    states, the fastest measured by ``benchmarks/bench_hmm.py --scan``:

    * ``"sequential"``: the scaled recursions, ``2 T`` sequential steps of ``batch K^2`` work;
    * ``"blocked"``: the same recursions in blocks of ``L ~ sqrt(2 T / 3)`` steps, about
      ``5 sqrt(T)`` sequential steps and ``batch K^3`` more work per time step: on a CPU
      where a step's work is small against its fixed cost (``batch K^3 <= 350,000``);
    * ``"parallel"``: :func:`parallel_forward_backward`, ``2 log2 T`` steps of ``K`` times
      the blocked one's work: on a GPU (a sequential step is a kernel launch), and on a CPU
      for a long sequence over very few states (``batch K^3 <= 64``, ``T >= 4096``).
    """
    forced = _ALGORITHM.get()
    if forced is not None:
        return forced
    if device.type != "cpu":
        return "parallel" if T > 1 else "sequential"
    if T >= 4096 and batch * K**3 <= 64:
        return "parallel"
    return "blocked" if T >= 64 and batch * K**3 <= 350_000 else "sequential"


def hmm_log_prob(fn: DiscreteHMM, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)`` by a forward pass (not differentiable). Within a
    :func:`pyro_em.memo.scope` the pass is kept for a :func:`forward_backward` on the same
    ``fn`` and ``value`` (the M-step after an E-step)."""
    with torch.no_grad():
        factors = hmm_factors(fn, value)
    algorithm = _algorithm(*factors)
    if algorithm == "parallel":
        fwd = parallel_forward_backward(*factors)
    else:
        with torch.no_grad():
            fwd = _forward(*factors, algorithm)
    store = memo.current()
    if store is not None:
        store["hmm_forward"] = (fn, value, fwd)
    return fwd.log_z


def _algorithm(initial: torch.Tensor, trans: torch.Tensor, obs: torch.Tensor) -> str:
    batch = broadcast_shapes(initial.shape[:-1], obs.shape[:-2]).numel()
    algorithm = choose_algorithm(batch, obs.shape[-2], obs.shape[-1], obs.device)
    if algorithm == "blocked" and any(n > 1 for n in compact(trans).shape[:-3]):
        return "sequential"  # transitions that vary by sequence: not blocked (yet)
    return algorithm


def forward_backward(fn: DiscreteHMM, value: torch.Tensor) -> HMMPosterior:
    """The log likelihood and every posterior of ``fn`` at ``value`` (see :class:`HMMPosterior`),
    by the scaled forward-backward recursions (in blocks or not) or
    :func:`parallel_forward_backward`, as :func:`choose_algorithm` says."""
    store = memo.current()
    kept = store.pop("hmm_forward", None) if store is not None else None
    cached = kept[2] if kept is not None and kept[0] is fn and kept[1] is value else None
    if isinstance(cached, HMMPosterior):
        return cached
    with torch.no_grad():
        factors = hmm_factors(fn, value) if cached is None else None
    algorithm = _algorithm(*factors) if cached is None else None
    if algorithm == "parallel":
        return parallel_forward_backward(*factors)
    with torch.no_grad():
        fwd = cached if cached is not None else _forward(*factors, algorithm)
        # A mixture: one step whose transition is the identity (the chain's start is the
        # mixture weights), which multiplications by A may skip, exactly.
        K = fwd.probs.shape[-1]
        mixture = fwd.scales.shape[0] == 1 and fwd.probs.shape[-3:] == (1, K, K) and bool(
            (compact(fwd.probs) == torch.eye(K, dtype=fwd.probs.dtype, device=fwd.probs.device)).all())
        # betas[t] is p(x[t+1:] | z[t]) divided by the later scales, so alphas[t+1] * betas[t]
        # is the posterior of z[t]; b_beta[t] = b[t] * betas[t] / scales[t], and the loop
        # leaves beta as the posterior weight of z[-1].
        if fwd.blocked is not None:
            beta, b_beta = _backward_blocked(fwd)
        else:
            T = fwd.scales.shape[0]
            b_beta = fwd.b / fwd.scales.unsqueeze(-1)  # b[t] / scales[t], times beta[t] below
            beta = torch.ones_like(fwd.alphas[0])
            step = _steps(fwd.probs.mT, T)  # A^T per step: beta_{t-1} = b_beta_t @ A_t^T
            for t in range(T - 1, -1, -1):
                beta = b_beta[t].mul_(beta) if mixture else _matmul(b_beta[t].mul_(beta), step[t])
        # The posterior of z[t] is that of (z[t-1], z[t]) summed over z[t-1].
        observation = fwd.prev if mixture else _propagate(fwd.prev, fwd.probs)
        observation = (observation * b_beta if expanded(observation) else observation.mul_(b_beta)).movedim(0, -2)
        prev, b_beta = fwd.prev.movedim(0, -2), b_beta.movedim(0, -2)  # (..., T, K)
        factors = (prev.unsqueeze(-1), fwd.probs, b_beta.unsqueeze(-2))
        return HMMPosterior(fwd.log_z, fwd.first * beta, observation, factors)


def parallel_forward_backward(initial: torch.Tensor, trans: torch.Tensor, obs: torch.Tensor) -> HMMPosterior:
    """Every posterior of an HMM with log factors ``initial (..., K)``, ``trans (..., T, K, K)``
    and ``obs (..., T, K)`` (see :func:`hmm_factors`) in ``O(log T)`` sequential steps: ``log Z``
    is a tree of log-space matrix products (Pyro's, as ``DiscreteHMM.log_prob``), and
    ``d log Z / d factor`` is the posterior of that factor's states, so one backward pass
    through the tree gives the start state's, each transition's (pairwise) and each step's.
    """
    batch = broadcast_shapes(initial.shape[:-1], obs.shape[:-2])
    with torch.enable_grad():
        init = initial.detach().expand(batch + initial.shape[-1:]).requires_grad_()
        # One (K, K) factor per step: the transition into z[t] and the observation of z[t].
        steps = (trans.detach() + obs.detach().unsqueeze(-2)).expand(batch + trans.shape[-3:]).contiguous().requires_grad_()
        product, shift = _normalized_logmatmulexp(steps)
        log_z = (init.unsqueeze(-1) + product).logsumexp(-1).logsumexp(-1) + shift
        g_init, g_steps = torch.autograd.grad(log_z.sum(), [init, steps])
    return HMMPosterior(log_z.detach(), g_init, g_steps.sum(-2), (g_steps,))


def _normalized_logmatmulexp(steps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The log-space product of ``steps (..., T, K, K)`` by a tree of pairwise products, as
    Pyro's ``_sequential_logmatmulexp``, with every product shifted by its largest entry:
    ``(product, shift)`` with the product ``product + shift``. Unshifted, entries grow as
    ``-T`` and a float32 sum of two of them loses ``T eps`` absolutely (2e-3 in the posteriors
    at T = 100,000); shifted, they stay of the order of one step's. The shifts are detached:
    a product shifts with every entry of a factor, so the gradient, the posterior, is exact."""
    shift = steps.new_zeros(steps.shape[:-3])
    while steps.size(-3) > 1:
        T = steps.size(-3)
        even = T // 2 * 2
        x, y = steps[..., :even, :, :].reshape(steps.shape[:-3] + (even // 2, 2) + steps.shape[-2:]).unbind(-3)
        product = _logmatmulexp(x, y)
        top = product.detach().amax((-2, -1), keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # (paths that are impossible)
        product = product - top
        shift = shift + top.sum((-3, -2, -1))
        steps = torch.cat((product, steps[..., even:, :, :]), dim=-3) if T > even else product
    return steps.squeeze(-3), shift


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


def _hmm_kernel(fn: DiscreteHMM, value: torch.Tensor) -> Optional[torch.Tensor]:
    # Under autograd, Pyro's parallel scan (a graph log T deep) suits better than T steps.
    return None if torch.is_grad_enabled() else hmm_log_prob(fn, value)


def _joint_kernel(fn: JointEmission, value: torch.Tensor) -> torch.Tensor:
    """The sum of the parts' log densities, each by its kernel."""
    return sum(kernels.log_prob(p, v) for p, v in zip(fn.parts, fn.split(value)))


kernels.register(DiscreteHMM, _hmm_kernel)
kernels.register(JointEmission, _joint_kernel)
