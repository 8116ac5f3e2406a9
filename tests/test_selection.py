"""After the fit: hard EM is Lloyd's k-means, BIC/AIC count parameters as scikit-learn does,
and decoding gives hmmlearn's Viterbi paths."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hmmlearn import hmm
from pyro import poutine
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch.distributions import constraints

from pyro_em import EM
from test_sklearn_parity import K, make_problem, pyro_gmm


def test_hard_em_is_lloyds_kmeans_iteration_by_iteration():
    """Equal fixed weights, one fixed spherical scale, temperature=0: each step assigns every
    point to its nearest centre and moves each centre to the mean of its points, exactly as
    scikit-learn's KMeans(algorithm="lloyd") from the same centres."""
    X, _, _ = make_problem()
    centres = X[:K].clone() + 0.5

    def model(X):
        locs = pyro.param("centres", centres.clone())
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(torch.ones(K) / K), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=X)

    em = EM(model, temperature=0)
    current = centres.numpy()
    for _ in range(6):
        em.step(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SklearnConvergenceWarning)
            km = KMeans(K, init=current, n_init=1, max_iter=1, tol=0, algorithm="lloyd").fit(X.numpy())
        current = km.cluster_centers_
        np.testing.assert_allclose(pyro.param("centres").detach().numpy(), current, atol=1e-10, rtol=0)
    labels = em.decode(X)["z"]
    assert (labels.numpy() == km.predict(X.numpy())).all()
    # The loss at temperature 0 is minus the log density of the MAP completion: a constant
    # plus half of scikit-learn's inertia.
    loss = em.evaluate_loss(X)
    const = len(X) * (np.log(K) + 0.5 * X.shape[1] * np.log(2 * np.pi))
    assert loss == pytest.approx(const + 0.5 * km.inertia_, rel=1e-10)


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_bic_and_aic_equal_scikit_learn(cov_type):
    X, weights, means = make_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        sk = GaussianMixture(K, covariance_type=cov_type, max_iter=5, random_state=0).fit(X.numpy())
    cov = torch.as_tensor(sk.covariances_)
    em = EM(pyro_gmm(cov_type, torch.as_tensor(sk.weights_), torch.as_tensor(sk.means_), cov))
    assert em.log_likelihood(X) == pytest.approx(sk.score(X.numpy()) * len(X), rel=1e-10)
    assert em.bic(X) == pytest.approx(sk.bic(X.numpy()), rel=1e-10)
    assert em.aic(X) == pytest.approx(sk.aic(X.numpy()), rel=1e-10)


def test_log_likelihood_leaves_out_map_priors():
    data = torch.tensor([0.0, 1.0, 9.0, 10.0])

    def model(data):
        w = pyro.sample("w", dist.Dirichlet(torch.full((2,), 2.0)))
        locs = pyro.param("locs", torch.tensor([0.0, 10.0]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

    em = EM(model)
    em.step(data)
    w = pyro.param("AutoDelta.w").detach()
    locs = pyro.param("locs").detach()
    expected = (w.log() + dist.Normal(locs, 1.0).log_prob(data[:, None])).logsumexp(-1).sum()
    assert em.log_likelihood(data) == pytest.approx(float(expected), rel=1e-12)
    log_prior = float(dist.Dirichlet(torch.full((2,), 2.0)).log_prob(w))
    assert -em.evaluate_loss(data) == pytest.approx(float(expected) + log_prior, rel=1e-12)
    # Free parameters: w (simplex of 2: one) and locs (two).
    assert em.aic(data) == pytest.approx(-2 * float(expected) + 2 * 3, rel=1e-12)


LENGTHS = [12, 7, 10]


def _hmm_problem():
    g = torch.Generator().manual_seed(0)
    start = torch.tensor([0.6, 0.3, 0.1])
    trans = torch.softmax(torch.randn(3, 3, generator=g) + 2 * torch.eye(3), -1)
    emit = torch.softmax(2 * torch.randn(3, 4, generator=g), -1)
    seqs = [torch.randint(4, (n,), generator=g) for n in LENGTHS]
    T = max(LENGTHS)
    X = torch.stack([torch.cat([s, s.new_zeros(T - len(s))]) for s in seqs])
    ref = hmm.CategoricalHMM(3)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = start.numpy(), trans.numpy(), emit.numpy()
    _, states = ref.decode(torch.cat(seqs).numpy().reshape(-1, 1), LENGTHS, algorithm="viterbi")
    return start, trans, emit, X, torch.tensor(LENGTHS), np.split(states, np.cumsum(LENGTHS)[:-1])


@pytest.mark.parametrize("form", ["sequential", "vectorized"])
def test_decode_equals_hmmlearn_viterbi(form):
    start, trans, emit, X, lengths, expected = _hmm_problem()
    S, T = X.shape

    def sequential(X, lengths):
        with pyro.plate("seqs", S):
            z = None
            for t in pyro.markov(range(T)):
                with poutine.mask(mask=t < lengths):
                    z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                    pyro.sample(f"x_{t}", dist.Categorical(pyro.param("emit", emit)[z]), obs=X[:, t])

    def vectorized(X, lengths):
        active = torch.arange(T) < lengths[:, None]
        eye = torch.eye(3).log()
        steps = torch.where(active[..., None, None], torch.cat([eye[None], trans.log().expand(T - 1, 3, 3)]), eye)
        obs = dist.Categorical(pyro.param("emit", emit)).expand((S, T, 3)).mask(active[..., None])
        with pyro.plate("seqs", S):
            pyro.sample("x", dist.DiscreteHMM(start.log(), steps, obs), obs=X)

    em = EM(sequential if form == "sequential" else vectorized)
    decoded = em.decode(X, lengths)
    paths = torch.stack([decoded[f"z_{t}"] for t in range(T)], -1) if form == "sequential" else decoded["x"]
    for s, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(paths[s, :n].numpy(), expected[s])


def test_bic_and_aic_equal_hmmlearn_with_variable_lengths():
    start, trans, emit, X, lengths, _ = _hmm_problem()
    S, T = X.shape

    def model(X, lengths):
        st = pyro.param("start", start, constraint=constraints.simplex)
        tr = pyro.param("trans", trans, constraint=constraints.simplex)
        em_ = pyro.param("emit", emit, constraint=constraints.simplex)
        with pyro.plate("seqs", S):
            z = None
            for t in pyro.markov(range(T)):
                with poutine.mask(mask=t < lengths):
                    z = pyro.sample(f"z_{t}", dist.Categorical(st if z is None else tr[z]))
                    pyro.sample(f"x_{t}", dist.Categorical(em_[z]), obs=X[:, t])

    ref = hmm.CategoricalHMM(3, n_features=4)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = start.numpy(), trans.numpy(), emit.numpy()
    flat = torch.cat([X[s, :n] for s, n in enumerate(LENGTHS)]).numpy().reshape(-1, 1)
    em = EM(model)
    assert em.bic(X, lengths) == pytest.approx(ref.bic(flat, LENGTHS), rel=1e-10)
    assert em.aic(X, lengths) == pytest.approx(ref.aic(flat, LENGTHS), rel=1e-10)


def test_hard_em_arguments():
    with pytest.raises(ValueError, match="temperature must be 1 \\(EM\\) or 0 \\(hard EM\\)"):
        EM(lambda: None, temperature=0.5)

    def model(X):
        trans = pyro.param("trans", torch.tensor([[0.9, 0.1], [0.2, 0.8]]), constraint=constraints.simplex)
        with pyro.plate("seqs", X.shape[0]):
            pyro.sample("x", dist.DiscreteHMM(torch.zeros(2), trans.log(), dist.Normal(torch.tensor([0.0, 3.0]), 1.0)), obs=X)

    with pytest.raises(ValueError, match="DiscreteHMM site 'x'.*pyro.markov"):
        EM(model, temperature=0).step(torch.randn(2, 5))
