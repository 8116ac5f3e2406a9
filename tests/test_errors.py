"""Bad input gets a clear error naming the culprit, and a failed step loses nothing."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_em import EM


def mixture(data):
    w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(w))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_observation_names_the_site(bad):
    data = torch.tensor([0.0, bad, 1.0])
    with pytest.raises(ValueError, match="Observed site 'x' has NaN or inf"):
        EM(mixture).step(data)
    assert not list(pyro.get_param_store().keys())  # params created by the failed step are gone


@pytest.mark.parametrize("latent", [dist.Poisson(3.0), dist.Geometric(0.3)])
def test_unbounded_discrete_latent_names_the_site(latent):
    def model(data):
        rate = pyro.param("rate", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            n = pyro.sample("n", latent)
            pyro.sample("x", dist.Normal(n * rate, 1.0), obs=data)

    with pytest.raises(ValueError, match="Latent site 'n' .*unbounded support.*Truncate"):
        EM(model).step(torch.zeros(3))


def test_sequential_enumeration_mark_is_refused():
    def model(data):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "sequential"})
            pyro.sample("x", dist.Normal(z.double(), 1.0), obs=data)

    with pytest.raises(ValueError, match="Latent site 'z' is marked.*'sequential'.*parallel"):
        EM(model).step(torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter must be an integer >= 1"),
        ({"tol": -1e-3}, "tol must be a number >= 0"),
        ({"tol": float("nan")}, "tol must be a number >= 0"),
    ],
)
def test_bad_fit_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EM(mixture).fit(torch.zeros(3), **kwargs)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="m_step must be one of"):
        EM(mixture, m_step="newton")
    with pytest.raises(ValueError, match="max_plate_nesting"):
        EM(mixture, max_plate_nesting=-1)
    with pytest.raises(TypeError, match="optim must be None or a pyro.optim.PyroOptim"):
        EM(mixture, optim=torch.optim.Adam)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        EM(mixture, num_steps=0)


def test_nothing_to_fit():
    def no_params(data):
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    with pytest.raises(ValueError, match="nothing for EM to fit"):
        EM(no_params).step(torch.zeros(3))
    with pytest.raises(ValueError, match="no pyro.sample sites"):
        EM(lambda: pyro.param("a", torch.ones(1))).step()


def test_impossible_data_is_an_error_not_nan():
    def model(data):
        p = pyro.param("p", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(p))
            pyro.sample("x", dist.Delta(z.double()), obs=data)

    with pytest.raises(ValueError, match="-inf.*'x'"):
        EM(model).step(torch.tensor([0.0, 5.0]))


def test_nan_param_is_named():
    """(A probability of exactly 0 in a simplex is a structural zero, allowed: see
    test_structural_zeros.py.)"""

    def model(data):
        locs = pyro.param("locs", torch.tensor([0.0, float("nan")]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

    with pytest.raises(ValueError, match="Param 'locs' has a NaN"):
        EM(model).step(torch.ones(2))


def test_failed_m_step_restores_the_param_store():
    """A model that breaks during the M-step: the step raises and every value is restored.
    (The model must run at every evaluation of Q: jit=False.)"""
    calls = {"n": 0, "limit": 100}

    def flaky(data):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise RuntimeError("boom")
        mixture(data)

    data = torch.tensor([-2.0, -1.0, 1.0, 2.0])
    em = EM(flaky, m_step="gradient", optim=pyro.optim.Adam({"lr": 0.1}), num_steps=3, max_plate_nesting=1,
            jit=False)
    em.step(data)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    calls.update(n=0, limit=3)
    with pytest.raises(RuntimeError, match="boom"):
        em.step(data)  # the E-step, two Adam steps that move the params, then boom
    after = dict(pyro.get_param_store().items())
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name].detach()), name
