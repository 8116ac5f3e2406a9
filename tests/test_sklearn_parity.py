"""Closed-form EM on Gaussian mixtures written in Pyro equals scikit-learn's GaussianMixture,
iteration by iteration, for the four covariance types (float64, 1e-6)."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch.distributions import constraints

from pyro_em import EM

K, D, N, ITERS = 3, 3, 300, 8


def make_problem():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 1.0, -2.0], [-3.0, 4.0, 1.0]])
    X = centres[torch.randint(K, (N,), generator=g)] + torch.randn(N, D, generator=g) @ torch.tensor(
        [[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.0, 0.0, 1.2]]
    )
    weights = torch.tensor([0.2, 0.3, 0.5])
    means = centres + torch.randn(K, D, generator=g)
    return X, weights, means


def initial_covariances(cov_type):
    return {
        "full": torch.eye(D).expand(K, D, D) * torch.tensor([1.0, 2.0, 0.5])[:, None, None],
        "tied": torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]]),
        "diag": torch.tensor([[1.0, 2.0, 0.5], [0.7, 0.7, 1.5], [2.0, 1.0, 1.0]]),
        "spherical": torch.tensor([1.0, 2.0, 0.5]),
    }[cov_type]


def pyro_gmm(cov_type, weights, means, cov):
    def model(X):
        w = pyro.param("weights", weights.clone(), constraint=constraints.simplex)
        locs = pyro.param("locs", means.clone())
        if cov_type in ("full", "tied"):
            L = pyro.param("scale_tril", torch.linalg.cholesky(cov), constraint=constraints.lower_cholesky)
        else:
            s = pyro.param("scale", cov.sqrt(), constraint=constraints.positive)
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w))
            if cov_type == "full":
                obs = dist.MultivariateNormal(locs[z], scale_tril=L[z])
            elif cov_type == "tied":
                obs = dist.MultivariateNormal(locs[z], scale_tril=L)
            elif cov_type == "diag":
                obs = dist.Normal(locs[z], s[z]).to_event(1)
            else:
                obs = dist.Normal(locs[z], s[z].unsqueeze(-1)).to_event(1)
            pyro.sample("x", obs, obs=X)

    return model


def pyro_covariances(cov_type):
    if cov_type in ("full", "tied"):
        L = pyro.param("scale_tril").detach()
        return L @ L.mT
    return pyro.param("scale").detach() ** 2


@pytest.mark.parametrize("reg_covar", [0.0, 1e-3])
@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_matches_sklearn_every_iteration(cov_type, reg_covar):
    X, weights, means = make_problem()
    cov = initial_covariances(cov_type)
    precisions = torch.linalg.inv(cov) if cov_type in ("full", "tied") else 1 / cov
    sk = GaussianMixture(
        K, covariance_type=cov_type, max_iter=1, tol=0, reg_covar=reg_covar, warm_start=True,
        weights_init=weights.numpy(), means_init=means.numpy(), precisions_init=precisions.numpy(),
    )
    em = EM(pyro_gmm(cov_type, weights, means, cov), m_step="closed_form", reg_covar=reg_covar)
    for _ in range(ITERS):
        loss = em.step(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SklearnConvergenceWarning)
            sk.fit(X.numpy())
        assert np.isfinite(loss)
        np.testing.assert_allclose(pyro.param("weights").detach(), sk.weights_, atol=1e-6, rtol=0)
        np.testing.assert_allclose(pyro.param("locs").detach(), sk.means_, atol=1e-6, rtol=0)
        np.testing.assert_allclose(pyro_covariances(cov_type), sk.covariances_, atol=1e-6, rtol=0)
        assert -em.evaluate_loss(X) / N == pytest.approx(sk.score(X.numpy()), abs=1e-6)
