"""Hidden Markov models written with pyro.markov: Baum-Welch equals hmmlearn iteration by
iteration (float64, 1e-6), with variable-length sequences, posteriors and Viterbi paths."""

import contextlib
import contextvars
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hmmlearn import hmm
from pyro import poutine
from pyro.infer import config_enumerate, infer_discrete
from torch.distributions import constraints

from pyro_em import EM
from pyro_em.hmm import forward_backward, parallel_forward_backward, viterbi

K, D, M, ITERS = 3, 2, 4, 5
LENGTHS = [25, 17, 30]


def force_algorithm(monkeypatch, name):
    """Every forward-backward pass of the test uses ``name`` (``None``: chosen per call), as
    inside ``pyro_em.hmm.algorithm(name)``."""
    monkeypatch.setattr("pyro_em.hmm._ALGORITHM", contextvars.ContextVar("algorithm", default=name))


def random_simplex(g, *shape):
    t = torch.rand(*shape, generator=g) + 0.3
    return t / t.sum(-1, keepdim=True)


def sequential_hmm(emission, init):
    """z_0 ~ start, z_t ~ trans[z_{t-1}], x_t ~ emission(z_t); steps past a sequence's end masked."""

    def model(X, lengths):
        start = pyro.param("start", init["start"].clone(), constraint=constraints.simplex)
        trans = pyro.param("trans", init["trans"].clone(), constraint=constraints.simplex)
        with pyro.plate("seqs", X.shape[0], dim=-1):
            z = None
            for t in pyro.markov(range(X.shape[1])):
                with poutine.mask(mask=t < lengths):
                    z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                    pyro.sample(f"x_{t}", emission(z), obs=X[:, t])

    return model


def vectorized_hmm(emission, init):
    """The same HMM as one DiscreteHMM site. hmmlearn's first state is drawn from ``start``:
    in DiscreteHMM's terms (a state before the first step) the first transition is the
    identity. Past a sequence's end the state stays put and emits nothing."""

    def model(X, lengths):
        S, T = X.shape[:2]
        start = pyro.param("start", init["start"].log())
        trans = pyro.param("trans", init["trans"].log())
        K = trans.shape[-1]
        identity = torch.eye(K, dtype=X.dtype).log()
        active = torch.arange(T) < lengths[:, None]  # (S, T)
        transitions = torch.cat([identity.expand(1, K, K), trans.expand(T - 1, K, K)])
        transitions = torch.where(active[..., None, None], transitions, identity)
        observation = emission(torch.arange(K))
        observation = observation.expand((S, T, K)).mask(active[..., None])
        with pyro.plate("seqs", S):
            pyro.sample("x", dist.DiscreteHMM(start, transitions, observation), obs=X)

    return model


def padded(sequences):
    """Stack variable-length sequences, padding with each sequence's first entry."""
    T = max(len(s) for s in sequences)
    return torch.stack([torch.cat([s, s[:1].expand(T - len(s), *s.shape[1:])]) for s in sequences])


def fit_one_iteration(model, X, lengths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, lengths)


def make_case(family, g):
    init = {"start": random_simplex(g, K), "trans": random_simplex(g, K, K)}
    if family == "categorical":
        init["emit"] = random_simplex(g, K, M)
        seqs = [torch.randint(M, (n,), generator=g) for n in LENGTHS]
        reference = hmm.CategoricalHMM(K, n_iter=1, tol=0, init_params="", params="ste")
        reference.emissionprob_ = init["emit"].numpy()

        def emission(z):
            return dist.Categorical(pyro.param("emit", init["emit"].clone(), constraint=constraints.simplex)[z])

        return init, seqs, reference, emission, lambda: {"emit": (pyro.param("emit"), reference.emissionprob_)}

    init["means"] = torch.randn(K, D, generator=g) * 2
    seqs = [torch.randn(n, D, generator=g) + 2 * torch.randint(K, (n, 1), generator=g) for n in LENGTHS]
    cov_type = family.split("_")[1]
    reference = hmm.GaussianHMM(K, covariance_type=cov_type, n_iter=1, tol=0, init_params="", params="stmc",
                                covars_prior=0, min_covar=0)
    reference.means_ = init["means"].numpy()
    if cov_type == "diag":
        init["scales"] = torch.rand(K, D, generator=g) + 0.5
        reference.covars_ = (init["scales"] ** 2).numpy()

        def emission(z):
            locs = pyro.param("means", init["means"].clone())
            scales = pyro.param("scales", init["scales"].clone(), constraint=constraints.positive)
            return dist.Normal(locs[z], scales[z]).to_event(1)

        def covariances():
            return pyro.param("scales") ** 2, np.diagonal(reference.covars_, axis1=1, axis2=2)
    else:
        A = torch.randn(K, D, D, generator=g)
        init["tril"] = torch.linalg.cholesky(A @ A.mT + torch.eye(D))
        reference.covars_ = (init["tril"] @ init["tril"].mT).numpy()

        def emission(z):
            locs = pyro.param("means", init["means"].clone())
            L = pyro.param("tril", init["tril"].clone(), constraint=constraints.lower_cholesky)
            return dist.MultivariateNormal(locs[z], scale_tril=L[z])

        def covariances():
            L = pyro.param("tril")
            return L @ L.mT, reference.covars_

    def params():
        return {"means": (pyro.param("means"), reference.means_), "covariances": covariances()}

    return init, seqs, reference, emission, params


@pytest.mark.jit_only
@pytest.mark.parametrize("form", ["sequential", "sequential-traced", "vectorized", "sequential-parallel",
                                  "vectorized-parallel", "sequential-blocked", "vectorized-blocked"])
@pytest.mark.parametrize("family", ["categorical", "gaussian_diag", "gaussian_full"])
def test_matches_hmmlearn_every_iteration_with_variable_lengths(family, form, monkeypatch):
    """"sequential" runs fused into one DiscreteHMM; "sequential-traced" the general path;
    "-parallel" and "-blocked" forms force that forward-backward algorithm (the others take
    the scaled sequential recursions at these lengths)."""
    traced = form == "sequential-traced"
    if traced:
        monkeypatch.setattr("pyro_em.planner.fuse_chain", lambda *args: None)
    form, _, algorithm = form.partition("-")
    force_algorithm(monkeypatch, algorithm if algorithm in ("parallel", "blocked") else None)
    g = torch.Generator().manual_seed(0)
    init, seqs, reference, emission, emission_params = make_case(family, g)
    reference.startprob_, reference.transmat_ = init["start"].numpy(), init["trans"].numpy()
    X_np = torch.cat(seqs).numpy()
    if family == "categorical":
        X_np = X_np.reshape(-1, 1)
    X, lengths = padded(seqs), torch.tensor(LENGTHS)

    build = vectorized_hmm if form == "vectorized" else sequential_hmm
    em = EM(build(emission, init), m_step="closed_form")
    probs = (lambda p: p.softmax(-1)) if form == "vectorized" else (lambda p: p)
    for _ in range(ITERS):
        em.step(X, lengths)
        assert (em.fused_chain is not None) == (form == "sequential" and not traced)
        fit_one_iteration(reference, X_np, LENGTHS)
        checks = {"start": (probs(pyro.param("start")), reference.startprob_),
                  "trans": (probs(pyro.param("trans")), reference.transmat_), **emission_params()}
        for name, (ours, theirs) in checks.items():
            np.testing.assert_allclose(ours.detach().numpy(), theirs, atol=1e-6, rtol=0, err_msg=name)
        assert -em.evaluate_loss(X, lengths) == pytest.approx(reference.score(X_np, LENGTHS), abs=1e-6)

    # Smoothed marginals and Viterbi paths agree too: the sequential form through
    # EM.posterior and Pyro's infer_discrete, the vectorized one through EM.posterior and
    # pyro_em.hmm.viterbi.
    posterior = em.posterior(X, lengths)
    expected = reference.predict_proba(X_np, LENGTHS)
    offsets = np.cumsum([0] + LENGTHS)
    _, viterbi_path = reference.decode(X_np, LENGTHS, algorithm="viterbi")
    if form != "vectorized":
        decoder = infer_discrete(config_enumerate(em.fitted_model), temperature=0, first_available_dim=-2)
        trace = poutine.trace(decoder).get_trace(X, lengths)
        marginals = torch.stack([posterior[f"z_{t}"] for t in range(X.shape[1])], 1)
        paths = torch.stack([trace.nodes[f"z_{t}"]["value"] for t in range(X.shape[1])], 1)
    else:
        marginals = posterior["x"]
        paths = viterbi(poutine.trace(em.fitted_model).get_trace(X, lengths).nodes["x"]["fn"], X)
    for s, n in enumerate(LENGTHS):
        np.testing.assert_allclose(marginals[s, :n].numpy(), expected[offsets[s]:offsets[s + 1]], atol=1e-6, rtol=0)
        assert paths[s, :n].tolist() == viterbi_path[offsets[s]:offsets[s + 1]].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["sequential", "blocked", "parallel"])
def test_long_sequence_in_float32_matches_float64(algorithm, monkeypatch):
    """T = 10,000 steps: no forward-backward algorithm underflows or drifts in float32."""
    force_algorithm(monkeypatch, algorithm)
    g = torch.Generator().manual_seed(0)
    T = 10_000
    states = torch.zeros(T, dtype=torch.long)
    for t in range(1, T):  # a sticky two-state chain
        states[t] = states[t - 1] if torch.rand((), generator=g) < 0.95 else 1 - states[t - 1]
    X64 = (torch.randn(T, generator=g) + 3.0 * states).reshape(1, T, 1)

    results = {}
    for dtype in (torch.float32, torch.float64):
        pyro.clear_param_store()
        X = X64.to(dtype)
        # Fresh tensors each time: Pyro keeps an unconstrained init tensor as the param itself.
        init = {"start": torch.tensor([0.5, 0.5], dtype=dtype), "trans": torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=dtype),
                "means": torch.tensor([[0.5], [2.0]], dtype=dtype), "scales": torch.ones(2, 1, dtype=dtype)}

        def emission(z):
            locs = pyro.param("means", init["means"])
            scales = pyro.param("scales", init["scales"], constraint=constraints.positive)
            return dist.Normal(locs[z], scales[z]).to_event(1)

        em = EM(vectorized_hmm(emission, init), m_step="closed_form")
        losses = [em.step(X, torch.tensor([T])) for _ in range(5)]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
        results[dtype] = (losses, {n: v.detach().double() for n, v in pyro.get_param_store().items()})
    (l32, p32), (l64, p64) = results[torch.float32], results[torch.float64]
    # 1e-3 relative (losses and every param) is the agreement the issue asks of float32 at this
    # length: float32 carries ~7 digits, and sums over 10,000 steps lose a few of them.
    np.testing.assert_allclose(l32, l64, rtol=1e-3)
    for name in p64:
        torch.testing.assert_close(p32[name], p64[name], rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("variant", ["per_step_emission", "gap_in_mask"])
def test_chains_that_cannot_be_fused_take_the_general_path(variant):
    g = torch.Generator().manual_seed(0)
    S, T = 2, 6
    X = torch.randint(M, (S, T), generator=g)
    init = {"start": random_simplex(g, K), "trans": random_simplex(g, K, K), "emit": random_simplex(g, T, K, M)}
    mask = torch.ones(S, T, dtype=torch.bool)
    if variant == "gap_in_mask":
        mask[0, 2] = False  # a missing step in the middle, not an end

    def model(X):
        start = pyro.param("start", init["start"].clone(), constraint=constraints.simplex)
        trans = pyro.param("trans", init["trans"].clone(), constraint=constraints.simplex)
        with pyro.plate("seqs", S):
            z = None
            for t in pyro.markov(range(T)):
                emit = pyro.param(f"emit_{t if variant == 'per_step_emission' else 0}", init["emit"][t].clone(),
                                  constraint=constraints.simplex)
                with poutine.mask(mask=mask[:, t]):
                    z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                    pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])

    em = EM(model, m_step="closed_form")
    losses = [em.step(X) for _ in range(3)]
    assert em.fused_chain is None
    assert losses[2] <= losses[1] <= losses[0]


@pytest.mark.parametrize("homogeneous", [False, True])
@pytest.mark.parametrize("algorithm", ["parallel", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_forward_backward_equals_the_sequential_one(dtype, algorithm, homogeneous, monkeypatch):
    """Log-depth (a tree of log-space matrix products, posteriors by its gradient) and blocked
    (blocks of L steps, all at once) against the scaled sequential recursions: transitions with
    structural zeros (left-right), time-varying or one matrix, masked steps, steps no state can
    emit from, an initial distribution shared by all sequences, a T that leaves the last block
    short; log Z also against Pyro's own DiscreteHMM.log_prob (in log space)."""
    g = torch.Generator().manual_seed(0)
    S, T, K, M = 4, 37, 5, 6
    trans = random_simplex(g, 1 if homogeneous else T, K, K).triu().log()  # left-right
    trans = trans - trans.logsumexp(-1, keepdim=True)
    emit = random_simplex(g, K, M)
    emit[:, 0] = 0  # symbol 0 is emitted by no state: its steps have a zero likelihood
    emit[-1, 0] = 1e-30
    X = torch.randint(M, (S, T), generator=g)
    mask = torch.rand(S, T, 1, generator=g) > 0.2
    fn = dist.DiscreteHMM(random_simplex(g, K).log().to(dtype), trans.to(dtype),
                          dist.Categorical(emit.to(dtype)).expand((S, T, K)).mask(mask))
    from pyro_em.hmm import hmm_factors

    force_algorithm(monkeypatch, "sequential")
    expected = forward_backward(fn, X)
    force_algorithm(monkeypatch, algorithm)
    got = forward_backward(fn, X)
    if algorithm == "parallel":
        with torch.no_grad():  # as the E-step runs (log of probs taken exactly, zeros too)
            factors = hmm_factors(fn, X)
        assert_same = parallel_forward_backward(*factors)
        torch.testing.assert_close(assert_same.log_z, got.log_z)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.log_z, expected.log_z, **tol)
    # Pyro's own log_prob, from logits: with probs it would clamp the zeros to 2e-16.
    exact = dist.DiscreteHMM(fn.initial_logits, fn.transition_logits,
                             dist.Categorical(logits=emit.to(dtype).log()).expand((S, T, K)).mask(mask))
    torch.testing.assert_close(got.log_z, exact.log_prob(X), **tol)
    for name in ("initial", "observation", "transition"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name).expand_as(getattr(got, name)), **tol)
    assert bool((got.transition[..., 1:, :, :].tril(-1) == 0).all())  # structural zeros stay zero


@pytest.mark.parametrize("algorithm", ["sequential", "blocked"])
def test_likelihoods_that_underflow_in_float32(algorithm, monkeypatch):
    """Well-separated Gaussian states: most likelihood ratios underflow float32 (below e^-87,
    which the forward pass flushes to zero, sparing the CPU's slow path for such exps).
    log Z still equals Pyro's log-space DiscreteHMM.log_prob and the posteriors the float64
    ones."""
    force_algorithm(monkeypatch, algorithm)
    g = torch.Generator().manual_seed(0)
    S, T, K = 3, 90, 3
    states = torch.randint(K, (S, T), generator=g)
    X = 30.0 * states.double() + torch.randn(S, T, generator=g, dtype=torch.float64)
    posteriors = {}
    for dtype in (torch.float32, torch.float64):
        g.manual_seed(1)  # the same tables in both precisions
        fn = dist.DiscreteHMM(random_simplex(g, K).log().to(dtype), random_simplex(g, K, K).log().to(dtype),
                              dist.Normal(torch.tensor([0.0, 30.0, 60.0], dtype=dtype), 1.0))
        post = forward_backward(fn, X.to(dtype))
        tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
        torch.testing.assert_close(post.log_z, fn.log_prob(X.to(dtype)), **tol)
        posteriors[dtype] = post.observation
    torch.testing.assert_close(posteriors[torch.float32].double(), posteriors[torch.float64], rtol=0, atol=1e-5)


@pytest.mark.jit_only
def test_several_emissions_per_step_step_as_one_fused_chain(monkeypatch):
    """Each step emits a scalar Normal, a Categorical and a 2-D diagonal Normal, all given the
    state: the chain fuses into one DiscreteHMM with a JointEmission, and its losses and iterates
    equal the traced path's, variable lengths included."""
    g = torch.Generator().manual_seed(0)
    S, T, D = 3, max(LENGTHS), 2
    x = torch.randn(S, T, generator=g)
    y = torch.randint(M, (S, T), generator=g)
    w = torch.randn(S, T, D, generator=g)
    lengths = torch.tensor(LENGTHS)
    init = {"start": random_simplex(g, K), "trans": random_simplex(g, K, K), "emit": random_simplex(g, K, M),
            "locs": torch.randn(K, generator=g), "means": torch.randn(K, D, generator=g)}

    def model(x, y, w, lengths):
        start = pyro.param("start", init["start"].clone(), constraint=constraints.simplex)
        trans = pyro.param("trans", init["trans"].clone(), constraint=constraints.simplex)
        emit = pyro.param("emit", init["emit"].clone(), constraint=constraints.simplex)
        locs = pyro.param("locs", init["locs"].clone())
        scales = pyro.param("scales", torch.ones(K), constraint=constraints.positive)
        means = pyro.param("means", init["means"].clone())
        with pyro.plate("seqs", S):
            z = None
            for t in pyro.markov(range(T)):
                with poutine.mask(mask=t < lengths):
                    z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                    pyro.sample(f"x_{t}", dist.Normal(locs[z], scales[z]), obs=x[:, t])
                    pyro.sample(f"y_{t}", dist.Categorical(emit[z]), obs=y[:, t])
                    pyro.sample(f"w_{t}", dist.Normal(means[z], 1.0).to_event(1), obs=w[:, t])

    assert_fused_equals_traced(model, (x, y, w, lengths), monkeypatch)


def assert_fused_equals_traced(model, args, monkeypatch, steps=4, kwargs=None, **em_kwargs):
    """``steps`` EM steps fused (the model is recognized as a chain) and traced (the general
    path) give the same losses and params to 1e-12, from the same start (MAP values drawn
    under one seed)."""
    runs = {}
    for fused in (True, False):
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr("pyro_em.planner.fuse_chain", lambda *a: None)
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            em = EM(model, **{"m_step": "closed_form", **em_kwargs})
            losses = [em.step(*args, **(kwargs or {})) for _ in range(steps)]
            assert (em.fused_chain is not None) == fused
        runs[fused] = losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-12)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, atol=1e-12, rtol=0, msg=k)


@pytest.mark.jit_only
def test_emissions_in_plates_of_their_own_fuse(monkeypatch):
    """An emission in a plate of its own, as examples/hmm.py's tones (here Normal with a
    state-indexed mean and a constant scale, sequences that end), and a mixture whose emission
    sits in a features plate: both fuse, with the traced path's iterates."""
    g = torch.Generator().manual_seed(0)
    S, T, D = 4, 12, 5
    X = torch.randn(S, T, D, generator=g)
    lengths = torch.tensor([12, 7, 9, 12])
    locs0 = torch.randn(K, D, generator=g)

    def hmm_with_tones(X, lengths):
        start = pyro.param("start", torch.ones(K) / K, constraint=constraints.simplex)
        trans = pyro.param("trans", torch.ones(K, K) / K + torch.eye(K), constraint=constraints.simplex)
        locs = pyro.param("locs", locs0.clone())
        tones = pyro.plate("tones", D, dim=-1)
        with pyro.plate("seqs", S, dim=-2):
            z = None
            for t in pyro.markov(range(T)):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]),
                                    infer={"enumerate": "parallel"})
                    with tones:
                        pyro.sample(f"x_{t}", dist.Normal(locs[z.squeeze(-1)], 1.0), obs=X[:, t])

    assert_fused_equals_traced(hmm_with_tones, (X, lengths), monkeypatch, steps=3)
    data = torch.randn(300, D, generator=g) + 3 * torch.randint(K, (300, 1), generator=g)

    def mixture_with_features(data):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", locs0.clone())
        scales = pyro.param("scales", torch.ones(K, D), constraint=constraints.positive)
        with pyro.plate("data", len(data), dim=-2):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            with pyro.plate("features", D, dim=-1):
                pyro.sample("x", dist.Normal(locs[z.squeeze(-1)], scales[z.squeeze(-1)]), obs=data)

    assert_fused_equals_traced(mixture_with_features, (data,), monkeypatch, steps=3)


@pytest.mark.parametrize("algorithm", ["blocked", "parallel"])
def test_posteriors_of_one_long_float32_sequence(algorithm):
    """One sticky two-state Gaussian sequence of T = 100,000 steps in float32 (the parallel
    algorithm is the automatic choice on a GPU, where float32 is the rule): each step's
    posterior and the expected transition counts as float64 gives them. The log-depth tree
    used to sum unnormalized log products of size ~T: 1.8e-3 off, against 4e-6 blocked."""
    g = torch.Generator().manual_seed(0)
    T = 100_000
    states = torch.cumsum((torch.rand(T, generator=g) > 0.98).long(), 0) % 2
    x = torch.randn(T, generator=g) + 2.0 * states

    def posterior(dtype, algorithm):
        fn = dist.DiscreteHMM(
            torch.tensor([0.5, 0.5], dtype=dtype).log(),
            torch.tensor([[0.97, 0.03], [0.04, 0.96]], dtype=dtype).log(),
            dist.Normal(torch.tensor([0.0, 2.0], dtype=dtype), torch.tensor(1.0, dtype=dtype)),
        )
        with pytest.MonkeyPatch.context() as m:
            force_algorithm(m, algorithm)
            return forward_backward(fn, x.to(dtype))

    ref, post = posterior(torch.float64, "blocked"), posterior(torch.float32, algorithm)
    assert (post.observation.double() - ref.observation).abs().max() < 2e-5
    counts, expected = (p.transition.double().reshape(-1, 2, 2).sum(0) for p in (post, ref))
    assert ((counts - expected).abs() / expected).max() < 2e-5


@pytest.mark.jit_only
@pytest.mark.parametrize("which", ["sequences", "one_chain", "mixture"])
def test_posterior_of_a_fused_chain_is_the_traced_one(which):
    """``em.posterior`` of a fused chain (one forward-backward pass, no trace) equals the
    traced E-step's marginals that ``jit=False`` gives, site by site."""
    g = torch.Generator().manual_seed(0)
    if which == "mixture":
        x = torch.randn(40, generator=g) * 2

        def model(x):
            w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
            locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
    else:
        x = torch.randint(3, (6, 12) if which == "sequences" else (12,), generator=g)

        def model(x):
            start = pyro.param("start", torch.tensor([0.5, 0.3, 0.2]), constraint=constraints.simplex)
            trans = pyro.param("trans", torch.eye(3) * 0.6 + 0.4 / 3, constraint=constraints.simplex)
            emit = pyro.param("emit", torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]]),
                              constraint=constraints.simplex)
            steps = x.shape[-1]
            with pyro.plate("seqs", x.shape[0]) if x.dim() == 2 else contextlib.nullcontext():
                z = None
                for t in pyro.markov(range(steps)):
                    z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]),
                                    infer={"enumerate": "parallel"})
                    pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=x[..., t])

    em = EM(model)
    em.step(x)
    em.step(x)
    assert em.fused_chain is not None
    fused = em.posterior(x)
    traced = EM(model, jit=False).posterior(x)
    assert fused.keys() == traced.keys()
    for name in traced:
        torch.testing.assert_close(fused[name], traced[name], rtol=1e-10, atol=1e-12)
