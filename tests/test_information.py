"""Standard errors from the observed information (pyro_em.information), against published
numbers, independent explicit likelihoods and finite differences."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_em import EM


def linkage(cells):
    """Dempster, Laird and Rubin's (1977) genetic linkage example: 197 animals in 4 cells with
    probabilities (1/2 + t/4, (1 - t)/4, (1 - t)/4, t/4); EM splits the first cell into its
    1/2 and t/4 parts (the latent z, 5 augmented cells)."""
    t = pyro.param("theta", torch.tensor(0.5), constraint=constraints.unit_interval)
    probs = torch.stack([0.5 + 0 * t, t / 4, (1 - t) / 4, (1 - t) / 4, t / 4])
    with pyro.plate("animals", len(cells)):
        z = pyro.sample("z", dist.Categorical(probs))
        pyro.sample("cell", dist.Delta(torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])[z]), obs=cells)


def test_genetic_linkage_information_is_dempster_laird_rubins():
    """The paper's observed information at the MLE, 377.5, and the closed form
    125/(2+t)^2 + 38/(1-t)^2 + 34/t^2 to round-off."""
    cells = torch.repeat_interleave(torch.arange(4.0), torch.tensor([125, 18, 20, 34]))
    em = EM(linkage)
    em.fit(cells, tol=1e-14, max_iter=1000)
    t = pyro.param("theta").item()
    assert t == pytest.approx(0.6268214980, abs=1e-8)
    exact = 125 / (2 + t) ** 2 + 38 / (1 - t) ** 2 + 34 / t**2
    cov = em.covariance(cells)
    assert cov.information.item() == pytest.approx(exact, rel=1e-10)
    assert round(cov.information.item(), 1) == 377.5
    assert em.standard_errors(cells)["theta"].item() == pytest.approx(exact**-0.5, rel=1e-10)


def _free_hessian(log_likelihood, phi):
    return torch.autograd.functional.hessian(log_likelihood, phi)


def test_gaussian_mixture_against_an_explicit_likelihood():
    """A 2-D full-covariance mixture of three: the covariance of every param equals the
    inverse Hessian of the explicitly written log likelihood in the same free coordinates (two
    weights, the means, the lower triangles of the Cholesky factors), mapped to every entry."""
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[-3.0, 0.0], [0.0, 3.0], [3.0, -1.0]])
    X = centers[torch.randint(3, (300,), generator=g)] + torch.randn(300, 2, generator=g) @ torch.tensor([[1.0, 0.3], [0.0, 0.7]])

    @pyro.infer.config_enumerate
    def model(X):
        w = pyro.param("w", torch.ones(3) / 3, constraint=constraints.simplex)
        locs = pyro.param("locs", centers + 0.5)
        L = pyro.param("L", torch.eye(2).expand(3, 2, 2).clone(), constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=X)

    em = EM(model)
    em.fit(X, tol=1e-13, max_iter=2000)
    w0, locs0, L0 = (pyro.param(n).detach() for n in ("w", "locs", "L"))
    rows, cols = torch.tril_indices(2, 2)

    def unpack(phi):
        w = torch.cat([phi[:2], 1 - phi[:2].sum(0, keepdim=True)])
        locs = phi[2:8].reshape(3, 2)
        L = torch.zeros(3, 2, 2, dtype=phi.dtype)
        L[:, rows, cols] = phi[8:].reshape(3, 3)
        return w, locs, L

    def log_likelihood(phi):
        w, locs, L = unpack(phi)
        comp = dist.MultivariateNormal(locs, scale_tril=L).log_prob(X.unsqueeze(1))
        return torch.logsumexp(comp + w.log(), -1).sum()

    phi0 = torch.cat([w0[:2], locs0.reshape(-1), L0[:, rows, cols].reshape(-1)])
    cov_free = torch.linalg.inv(-_free_hessian(log_likelihood, phi0))
    J = torch.autograd.functional.jacobian(lambda p: torch.cat([t.reshape(-1) for t in unpack(p)]), phi0)
    expected = J @ cov_free @ J.T
    cov = em.covariance(X)
    assert list(cov.params) == ["w", "locs", "L"]
    torch.testing.assert_close(cov.matrix, expected, rtol=1e-7, atol=1e-12)
    se = em.standard_errors(X)
    assert se["L"].shape == (3, 2, 2) and bool((se["L"][:, 0, 1] == 0).all())  # (held at 0)
    torch.testing.assert_close(cov.block("w"), expected[:3, :3])


@pytest.mark.slow
@pytest.mark.jit_only  # (the information runs no EM step)
def test_hmm_information_against_finite_differences():
    """A 3-state categorical HMM (pyro.markov) on sequences it simulated, whose transitions
    have structural zeros (a cycle): the observed information equals central second
    differences of EM's own log likelihood along the free coordinates, and the zeros are
    held fixed (standard error 0)."""
    trans0 = torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.7, 0.3], [0.25, 0.0, 0.75]])
    emit0 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]])
    model, X = categorical_hmm(trans0, emit0, torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.6, 0.4], [0.4, 0.0, 0.6]]), 10, 60)

    em = EM(model)
    em.fit(X, tol=1e-13, max_iter=3000)
    cov = em.covariance(X)
    # The free coordinates as information.py takes them: each simplex row's nonzero entries
    # but the last.
    store = pyro.get_param_store()
    directions = []
    for name in cov.params:
        value = store[name].detach()
        K = value.shape[-1]
        for r, row in enumerate(value.reshape(-1, K)):
            nz = [k for k in range(K) if row[k] > 0]
            for k in nz[:-1]:
                directions.append((name, r * K + k, r * K + nz[-1]))
    assert len(directions) == cov.information.shape[0]

    def loglik(steps):
        saved = {n: store[n].detach().clone() for n in cov.params}
        moved = {n: v.clone().reshape(-1) for n, v in saved.items()}
        for (name, i, j), h in zip(directions, steps):
            moved[name][i] += h
            moved[name][j] -= h
        for n in cov.params:
            store[n] = moved[n].reshape(saved[n].shape)
        try:
            return em.log_likelihood(X)
        finally:
            for n in cov.params:
                store[n] = saved[n]

    h, p = 1e-4, len(directions)
    H = torch.zeros(p, p)
    for a in range(p):
        for b in range(a, p):
            def at(sa, sb):
                steps = [0.0] * p
                steps[a] += sa * h
                steps[b] += sb * h
                return loglik(steps)
            H[a, b] = H[b, a] = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / (4 * h * h)
    torch.testing.assert_close(cov.information, -H, rtol=1e-5, atol=1e-4)
    se = em.standard_errors(X)
    zero = trans0 == 0
    assert bool((se["trans"][zero] == 0).all()) and bool((se["trans"][~zero] > 0).all())


def categorical_hmm(trans0, emit0, trans_init, S, T, seed=0):
    """A pyro.markov categorical HMM (its first state drawn from ``trans[0]``) and ``S``
    sequences of ``T`` symbols simulated from ``trans0`` and ``emit0``; the fit starts from
    ``trans_init`` (its zeros are structural) and emissions near uniform."""
    g = torch.Generator().manual_seed(seed)
    K, M = emit0.shape
    z, X = torch.zeros(S, dtype=torch.long), torch.zeros(S, T, dtype=torch.long)
    for t in range(T):
        z = torch.multinomial(trans0[z], 1, generator=g).squeeze(-1) if t else z
        X[:, t] = torch.multinomial(emit0[z], 1, generator=g).squeeze(-1)
    emit_init = (1 + torch.eye(K, M)) / (M + 1)

    def model(X):
        trans = pyro.param("trans", trans_init.clone(), constraint=constraints.simplex)
        emit = pyro.param("emit", emit_init, constraint=constraints.simplex)
        with pyro.plate("seqs", S):
            z = 0
            for t in pyro.markov(range(T)):
                z = pyro.sample(f"z_{t}", dist.Categorical(trans[z]))
                pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])

    return model, X


def test_unidentified_params_are_named():
    """Two means that enter the model only as their sum: the information is singular, and the
    error names both."""
    x = torch.randn(50)

    @pyro.infer.config_enumerate
    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        a = pyro.param("a", torch.tensor([-1.0, 1.0]))
        b = pyro.param("b", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(a[z] + b, 1.0), obs=x)

    em = EM(model)
    em.fit(x, max_iter=200)
    with pytest.raises(ValueError, match="singular along params 'a', 'b'"):
        em.standard_errors(x)


def test_unsupported_constraint_is_named():
    def model(x):
        c = pyro.param("c", torch.eye(2), constraint=constraints.corr_cholesky)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(2) + z.unsqueeze(-1), scale_tril=c), obs=x)

    x = torch.randn(20, 2)
    with pytest.raises(ValueError, match="param 'c'.*corr_cholesky|param 'c'.*constraint"):
        EM(model).covariance(x)


def test_a_map_site_counts_its_log_prior():
    """A Dirichlet prior on the weights (a MAP site, AutoDelta.w): the information is that of
    the log likelihood plus the log prior, written out explicitly."""
    x = torch.cat([torch.randn(60, generator=torch.Generator().manual_seed(2)) - 2, torch.randn(40) + 2])

    @pyro.infer.config_enumerate
    def model(x):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(2) * 2))
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    em = EM(model)
    em.fit(x, tol=1e-13)

    def log_posterior(phi):
        w, locs = torch.stack([phi[0], 1 - phi[0]]), phi[1:]
        mixture = torch.logsumexp(dist.Normal(locs, 1.0).log_prob(x.unsqueeze(-1)) + w.log(), -1).sum()
        return mixture + dist.Dirichlet(torch.ones(2) * 2).log_prob(w)

    phi0 = torch.cat([pyro.param("AutoDelta.w").detach()[:1], pyro.param("locs").detach()])
    cov = em.covariance(x)
    assert list(cov.params) == ["AutoDelta.w", "locs"]
    torch.testing.assert_close(cov.information, -_free_hessian(log_posterior, phi0), rtol=1e-9, atol=1e-9)


def test_entries_that_em_drove_to_a_boundary_are_held_fixed_with_a_warning():
    """A DiscreteHMM on five short sequences: EM drives the initial distribution towards a
    corner (1, 6.6e-8), a maximum on the boundary, not a stationary point, whose Hessian would
    give a standard error of 3.6 for a probability. It is held fixed (standard error 0) with a
    BoundaryWarning naming it; the other params keep theirs."""
    from pyro_em import BoundaryWarning

    X = torch.randint(3, (5, 50), generator=torch.Generator().manual_seed(0))

    def model(X):
        start = pyro.param("start", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        trans = pyro.param("trans", torch.tensor([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex)
        emit = pyro.param("emit", torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]), constraint=constraints.simplex)
        with pyro.plate("seqs", X.shape[0]):
            pyro.sample("x", dist.DiscreteHMM(start.log(), trans.log(), dist.Categorical(emit)), obs=X)

    em = EM(model)
    em.fit(X, tol=1e-12, max_iter=2000)
    assert float(pyro.param("start").detach()[1]) < 1e-6
    with pytest.warns(BoundaryWarning, match="'start' have entries within 1e-06"):
        se = em.standard_errors(X)
    assert bool((se["start"] == 0).all())
    assert bool((se["trans"] > 0).all()) and bool((se["trans"] < 1).all()) and bool((se["emit"] > 0).all())
