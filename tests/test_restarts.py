"""Initialization and restarts: EM finds local optima; restarts keep the best run, reproducibly,
and a collapsed component is reported."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import pyro_em
from pyro_em import EM, CollapseWarning

K = 3


def data():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    return centres.repeat(40, 1) + 0.5 * torch.randn(120, 2, generator=g)


def model(X):
    w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: 3 * torch.rand(K, 2))  # a random start, in the model
    L = pyro.param("L", torch.eye(2).expand(K, 2, 2).clone(), constraint=constraints.lower_cholesky)
    with pyro.plate("data", len(X)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=X)


def fit_restarts(seed, **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    em = EM(model, reg_covar=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = em.fit(data(), max_iter=300, tol=1e-10, **kwargs)
    return em, result


def test_restarts_keep_the_best_run_reproducibly():
    em, result = fit_restarts(3, n_init=6)
    assert len(result.run_losses) == 6 and result.best_run == min(range(6), key=result.run_losses.__getitem__)
    assert max(result.run_losses) - min(result.run_losses) > 1.0  # the starts did differ
    assert em.evaluate_loss(data()) == pytest.approx(min(result.run_losses), rel=1e-12)
    _, again = fit_restarts(3, n_init=6)
    assert again.run_losses == result.run_losses


def test_kmeans_init_finds_the_clusters():
    """One run started by k-means++ and Lloyd (pyro_em.init) finds the three clusters."""

    def init(X):
        centres, labels = pyro_em.init.kmeans(X, K)
        weights, means, covs = pyro_em.init.moments(X, labels, K)
        pyro.param("w", weights, constraint=constraints.simplex)
        pyro.param("locs", means)
        pyro.param("L", torch.linalg.cholesky(covs), constraint=constraints.lower_cholesky)

    em, result = fit_restarts(0, init=init)
    _, best = fit_restarts(3, n_init=6)
    assert result.run_losses[0] == pytest.approx(min(best.run_losses), rel=1e-8)


def test_kmeans_plusplus_and_lloyd_are_reproducible_and_on_the_data():
    X = data()
    pyro.set_rng_seed(5)
    a = pyro_em.init.kmeans_plusplus(X, K)
    pyro.set_rng_seed(5)
    b = pyro_em.init.kmeans_plusplus(X, K)
    assert torch.equal(a, b) and all(bool((X == c).all(-1).any()) for c in a)
    centres, labels = pyro_em.init.kmeans(X, K, centres=a)
    from sklearn.cluster import KMeans

    km = KMeans(K, init=a.numpy(), n_init=1, max_iter=10, tol=0, algorithm="lloyd").fit(X.numpy())
    torch.testing.assert_close(centres, torch.as_tensor(km.cluster_centers_), atol=1e-10, rtol=0)
    r = pyro_em.init.random_responsibilities(7, K)
    torch.testing.assert_close(r.sum(-1), torch.ones(7))


def test_a_collapsed_weight_warns_with_param_and_slot():
    X = torch.randn(50, generator=torch.Generator().manual_seed(0))

    def far(X):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([0.0, 12.0]))
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=X)

    with pytest.warns(CollapseWarning, match="Param 'w' has a weight near 0 .* at slot\\(s\\) \\[1\\]"):
        EM(far).fit(X, max_iter=20)


def test_restart_arguments():
    with pytest.raises(ValueError, match="n_init must be an integer >= 1"):
        EM(model).fit(data(), n_init=0)
    with pytest.raises(TypeError, match="init must be a callable"):
        EM(model).fit(data(), init=3)
