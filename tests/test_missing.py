"""EM(model, nan_policy="omit"): NaN entries of observed Normal and MultivariateNormal sites
integrated out exactly, against the classic EM of the normal model with missing values
(Little and Rubin), independent observed-data likelihoods and an optimizer."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_em import EM


def data_with_holes(N, D, K=1, rate=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [-0.3, 0.4, 0.7]])[:D, :D]
    centers = torch.tensor([[1.0, -1.0, 2.0], [-3.0, 2.0, 0.0], [3.0, 3.0, -2.0]])[:K, :D]
    X = torch.randn(N, D, generator=g) @ A.T + centers[torch.randint(K, (N,), generator=g)]
    X[torch.rand(N, D, generator=g) < rate] = float("nan")
    X[0] = float("nan")  # (a row with nothing observed)
    return X


def observed_loglik(X, weights, locs, covs):
    """sum over rows of log sum_k w_k N(x_o | mu_ko, S_koo), one row at a time."""
    total = 0.0
    for x in X:
        o = ~torch.isnan(x)
        if o.any():
            comps = torch.stack([w.log() + dist.MultivariateNormal(m[o], S[o][:, o]).log_prob(x[o])
                                 for w, m, S in zip(weights, locs, covs)])
            total = total + torch.logsumexp(comps, 0)
    return total


def little_rubin_step(X, mu, S):
    """One step of the EM of the normal model with missing values, row by row."""
    means, covs = [], []
    for x in X:
        o, m = ~torch.isnan(x), torch.isnan(x)
        xh, C = x.clone(), torch.zeros_like(S)
        if not o.any():
            xh, C = mu.clone(), S.clone()
        elif m.any():
            gain = S[m][:, o] @ torch.linalg.inv(S[o][:, o])
            xh[m] = mu[m] + gain @ (x[o] - mu[o])
            idx = m.nonzero()[:, 0]
            C[idx.unsqueeze(-1), idx] = S[m][:, m] - gain @ S[o][:, m]
        means.append(xh)
        covs.append(C)
    xh = torch.stack(means)
    mu = xh.mean(0)
    return mu, ((xh - mu).T @ (xh - mu) + torch.stack(covs).sum(0)) / len(X)


@pytest.mark.parametrize("arg", ["scale_tril", "covariance_matrix", "precision_matrix"])
def test_one_multivariate_normal_is_little_and_rubins_em(arg):
    """A single MVN with 25% of its coordinates missing (and a row with none): every step's
    loss is minus the observed-data log likelihood and its params those of the classic EM of
    the normal model, to round-off, whichever matrix the model gives."""
    X = data_with_holes(200, 3)
    D = 3
    to_matrix = {"scale_tril": torch.linalg.cholesky, "covariance_matrix": lambda S: S,
                 "precision_matrix": torch.linalg.inv}[arg]
    constraint = constraints.lower_cholesky if arg == "scale_tril" else constraints.positive_definite

    def model(X):
        loc = pyro.param("loc", torch.zeros(D))
        M = pyro.param("M", torch.eye(D), constraint=constraint)
        with pyro.plate("data", len(X)):
            pyro.sample("x", dist.MultivariateNormal(loc, **{arg: M}), obs=X)

    em = EM(model, nan_policy="omit")
    mu, S = torch.zeros(D), torch.eye(D)
    for _ in range(6):
        loss = em.step(X)
        assert loss == pytest.approx(-float(observed_loglik(X, [torch.tensor(1.0)], [mu], [S])), rel=1e-12)
        mu, S = little_rubin_step(X, mu, S)
        torch.testing.assert_close(pyro.param("loc").detach(), mu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pyro.param("M").detach(), to_matrix(S), rtol=1e-10, atol=1e-12)
    assert "M: closed form" in str(em.plan)


def test_gaussian_mixture_with_missing_coordinates_reaches_the_observed_data_maximum():
    """A full-covariance mixture of three in 3-D with 20% of the coordinates missing: the loss
    is minus the observed-data log likelihood (an explicit one, row by row) at every step, and
    at convergence L-BFGS on that likelihood finds nothing better."""
    X = data_with_holes(240, 3, K=3, rate=0.2, seed=1)

    @pyro.infer.config_enumerate
    def model(X):
        w = pyro.param("w", torch.ones(3) / 3, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[0.0, -1.0, 1.0], [-2.0, 1.0, 0.0], [2.0, 2.0, -1.0]]))
        L = pyro.param("L", torch.eye(3).expand(3, 3, 3).clone(), constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=X)

    def params():
        w, locs, L = (pyro.param(n).detach().clone() for n in ("w", "locs", "L"))
        return w, locs, L @ L.mT

    em = EM(model, nan_policy="omit")
    em.step(X)
    for _ in range(3):
        before = params()
        assert em.step(X) == pytest.approx(-float(observed_loglik(X, *before)), rel=1e-10)
    result = em.fit(X, tol=1e-12, max_iter=2000)
    assert result.converged
    w, locs, S = params()
    best = float(observed_loglik(X, w, locs, S))
    assert -result.loss == pytest.approx(best, rel=1e-10)

    # L-BFGS from EM's optimum, in unconstrained coordinates.
    logits = w.log().clone().requires_grad_()
    mu = locs.clone().requires_grad_()
    raw = torch.linalg.cholesky(S).clone(memory_format=torch.contiguous_format).requires_grad_()
    opt = torch.optim.LBFGS([logits, mu, raw], max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        L = raw.tril()
        loss = -observed_loglik(X, logits.softmax(0), mu, L @ L.mT)
        loss.backward()
        return loss

    opt.step(closure)
    L = raw.detach().tril()
    assert float(observed_loglik(X, logits.detach().softmax(0), mu.detach(), L @ L.mT)) <= best + 1e-7


def test_entries_of_elementwise_families_drop_out():
    """A diagonal Normal mixture (Normal(...).to_event(1)) and a Poisson mixture with NaN
    entries: the loss is the likelihood of the observed entries alone, at every step."""
    X = data_with_holes(150, 3, K=2, rate=0.3, seed=2)

    @pyro.infer.config_enumerate
    def diagonal(X):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[0.0, 0.0, 1.0], [-1.0, 1.0, 0.0]]))
        scales = pyro.param("scales", torch.ones(2, 3), constraint=constraints.positive)
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], scales[z]).to_event(1), obs=X)

    def explicit(X):
        w, locs, scales = (pyro.param(n).detach() for n in ("w", "locs", "scales"))
        lp = dist.Normal(locs, scales).log_prob(X.nan_to_num().unsqueeze(1)) * ~torch.isnan(X).unsqueeze(1)
        return float(torch.logsumexp(lp.sum(-1) + w.log(), -1).sum())

    em = EM(diagonal, nan_policy="omit")
    em.step(X)
    for _ in range(4):
        expected = -explicit(X)
        assert em.step(X) == pytest.approx(expected, rel=1e-12)

    pyro.clear_param_store()
    counts = torch.poisson(torch.full((100,), 3.0), generator=torch.Generator().manual_seed(3))
    counts[::7] = float("nan")

    @pyro.infer.config_enumerate
    def poisson(y):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        rate = pyro.param("rate", torch.tensor([1.0, 5.0]), constraint=constraints.positive)
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("y", dist.Poisson(rate[z]), obs=y)

    em = EM(poisson, nan_policy="omit")
    seen = counts[~torch.isnan(counts)]
    w, rate = torch.ones(2) / 2, torch.tensor([1.0, 5.0])
    for _ in range(3):
        expected = -float(torch.logsumexp(dist.Poisson(rate).log_prob(seen.unsqueeze(-1)) + w.log(), -1).sum())
        assert em.step(counts) == pytest.approx(expected, rel=1e-12)
        w, rate = pyro.param("w").detach().clone(), pyro.param("rate").detach().clone()


def test_nan_is_an_error_by_default_and_for_families_without_a_marginal():
    X = data_with_holes(30, 2)

    def mvn(X):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", len(X)):
            pyro.sample("x", dist.MultivariateNormal(loc, torch.eye(2)), obs=X)

    with pytest.raises(ValueError, match="Observed site 'x' has NaN.*nan_policy='omit'"):
        EM(mvn).step(X)
    P = torch.full((10, 3), 1 / 3)
    P[2, 1] = float("nan")

    def dirichlet(P):
        c = pyro.param("c", torch.ones(3), constraint=constraints.positive)
        with pyro.plate("data", len(P)):
            pyro.sample("p", dist.Dirichlet(c), obs=P)

    with pytest.raises(ValueError, match="site 'p' has NaN entries.*not Dirichlet"):
        EM(dirichlet, nan_policy="omit").step(P)
    with pytest.raises(ValueError, match="nan_policy must be"):
        EM(mvn, nan_policy="drop")


def test_the_gradient_m_step_maximizes_the_same_marginal_likelihood():
    """m_step='gradient' on the mixture with missing coordinates: the same observed-data
    optimum as the closed form."""
    X = data_with_holes(120, 2, K=2, rate=0.2, seed=4)

    @pyro.infer.config_enumerate
    def model(X):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[0.0, 0.0], [-2.0, 1.0]]))
        L = pyro.param("L", torch.eye(2).expand(2, 2, 2).clone(), constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=X)

    losses = {}
    for m_step in ("auto", "gradient"):
        pyro.clear_param_store()
        losses[m_step] = EM(model, m_step=m_step, nan_policy="omit").fit(X, tol=1e-12, max_iter=1000).loss
    assert losses["gradient"] == pytest.approx(losses["auto"], rel=1e-8)
