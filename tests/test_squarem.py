"""SQUAREM (EM(model, accelerate="squarem")): the published Poisson mixture, fewer E-steps than
plain EM, never a rising loss, constraints and structural zeros kept."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_em import EM, ConvergenceWarning

# Hasselblad (1969): deaths of women over 80 per day in The Times, 1910-1912, 0..9 deaths;
# the test data of Varadhan and Roland's SQUAREM package.
FREQ = torch.tensor([162, 267, 271, 185, 111, 61, 27, 8, 3, 1])


@pyro.infer.config_enumerate
def poisson_mixture(y):
    w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
    rate = pyro.param("rate", torch.tensor([1.0, 2.5]), constraint=constraints.positive)
    with pyro.plate("days", len(y)):
        z = pyro.sample("z", dist.Categorical(w))
        pyro.sample("y", dist.Poisson(rate[z]), obs=y)


def _mle():
    """The maximum of the explicit log likelihood, by Newton's method (to round-off)."""
    k = torch.arange(10.0)

    def loglik(theta):
        p, l1, l2 = theta
        mix = torch.logsumexp(torch.stack([p.log() + dist.Poisson(l1).log_prob(k),
                                           (1 - p).log() + dist.Poisson(l2).log_prob(k)]), 0)
        return (FREQ * mix).sum()

    theta = torch.tensor([0.36, 1.26, 2.66])
    for _ in range(20):
        g = torch.autograd.functional.jacobian(loglik, theta)
        H = torch.autograd.functional.hessian(loglik, theta)
        theta = theta - torch.linalg.solve(H, g)
    return theta, float(loglik(theta))


def test_hasselblad_deaths_reach_the_mle_in_a_few_dozen_e_steps():
    """The published -log L 1989.946; the MLE to 1e-6 in the params within 300 E-steps, where
    2,000 plain EM steps leave the mixing weight more than 1e-5 from it; every cycle's loss at
    most the previous one's."""
    deaths = torch.repeat_interleave(torch.arange(10.0), FREQ)
    mle, loglik = _mle()
    assert round(-loglik, 3) == 1989.946
    em = EM(poisson_mixture, accelerate="squarem")

    def reached(i, loss):
        fitted = torch.stack([pyro.param("w")[0], *pyro.param("rate")]).detach()
        return bool((fitted - mle).abs().max() < 1e-6)

    result = em.fit(deaths, tol=0.0, max_iter=300, callback=reached)
    assert reached(None, None) and result.n_e_steps <= 300
    assert result.loss == pytest.approx(-loglik, abs=1e-8)
    assert all(b <= a + 1e-9 for a, b in zip(result.losses, result.losses[1:]))

    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = EM(poisson_mixture).fit(deaths, tol=0.0, max_iter=2000)
    assert plain.n_e_steps == plain.n_iter == 2000
    assert abs(float(pyro.param("w").detach()[0]) - float(mle[0])) > 1e-5


@pytest.mark.slow
def test_structural_zeros_and_constraints_hold_under_extrapolation():
    """An HMM with a structural zero in its transitions (an unconstrained -inf): extrapolated
    points keep it at exactly 0 and every row on the simplex; the accelerated fit ends at a
    loss no higher than plain EM's, in fewer E-steps."""
    from test_information import categorical_hmm

    trans0 = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.1, 0.0, 0.9]])
    emit0 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.3, 0.2, 0.5]])
    model, X = categorical_hmm(trans0, emit0, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]), 8, 80)
    runs = {}
    for accelerate in (None, "squarem"):
        pyro.clear_param_store()
        result = EM(model, accelerate=accelerate).fit(X, tol=1e-10, max_iter=3000)
        trans = pyro.param("trans").detach()
        assert bool((trans[trans0 == 0] == 0).all()) and torch.allclose(trans.sum(-1), torch.ones(3))
        runs[accelerate] = result
    assert runs["squarem"].loss <= runs[None].loss + 1e-7 * abs(runs[None].loss)
    assert runs["squarem"].n_e_steps < runs[None].n_e_steps


def test_options_are_checked():
    with pytest.raises(ValueError, match="accelerate must be"):
        EM(poisson_mixture, accelerate="anderson")
    from pyro_em import OnlineEM

    with pytest.raises(ValueError, match="OnlineEM takes no accelerate"):
        OnlineEM(poisson_mixture, accelerate="squarem")


def test_gradient_m_steps_batches_and_restarts_accelerate_too():
    """A mixture of regressions (slopes and intercepts by the gradient M-step), fitted over
    batches, and a fit with restarts: SQUAREM ends no higher than plain EM, in no more E-steps
    (plain EM is quick here: 16)."""
    from test_batches import regression_data, regression_mixture

    torch.manual_seed(0)
    t, x = regression_data(600)
    batches = [(t[i:i + 200], x[i:i + 200]) for i in range(0, 600, 200)]
    runs = {}
    for accelerate in (None, "squarem"):
        pyro.clear_param_store()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            runs[accelerate] = EM(regression_mixture, accelerate=accelerate).fit_batches(batches, tol=1e-10, max_iter=500)
    assert runs["squarem"].loss <= runs[None].loss + 1e-8 * abs(runs[None].loss)
    assert runs["squarem"].n_e_steps <= runs[None].n_e_steps
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    result = EM(poisson_mixture, accelerate="squarem").fit(
        torch.repeat_interleave(torch.arange(10.0), FREQ), n_init=3, tol=1e-10, max_iter=300)
    assert len(result.run_losses) == 3 and result.n_e_steps >= 2 * result.n_iter
