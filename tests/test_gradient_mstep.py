"""The gradient M-step reaches the known maximizers of Q and of the likelihood."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_em import EM


def responsibilities(log_joint):
    return (log_joint - log_joint.logsumexp(-1, keepdim=True)).exp()


def test_normal_mixture_one_step_matches_closed_form():
    data = torch.cat([torch.randn(60) - 2, torch.randn(40) * 0.5 + 2])
    w0, m0, s0 = torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 2.0])

    def model(data):
        w = pyro.param("w", w0, constraint=constraints.simplex)
        locs = pyro.param("locs", m0)
        scales = pyro.param("scales", s0, constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=data)

    r = responsibilities(w0.log() + dist.Normal(m0, s0).log_prob(data[:, None]))
    nk = r.sum(0)
    locs = (r * data[:, None]).sum(0) / nk
    scales = ((r * (data[:, None] - locs) ** 2).sum(0) / nk).sqrt()

    EM(model, m_step="gradient").step(data)
    store = pyro.get_param_store()
    torch.testing.assert_close(store["w"], nk / len(data), atol=1e-6, rtol=0)
    torch.testing.assert_close(store["locs"], locs, atol=1e-6, rtol=0)
    torch.testing.assert_close(store["scales"], scales, atol=1e-6, rtol=0)


def test_bernoulli_mixture_one_step_matches_closed_form():
    K, D, N = 3, 5, 80
    data = (torch.rand(N, D) < torch.rand(K, D)[torch.randint(K, (N,))]).double()
    w0 = torch.tensor([0.3, 0.3, 0.4])
    p0 = torch.rand(K, D) * 0.8 + 0.1

    def model(data):
        w = pyro.param("w", w0, constraint=constraints.simplex)
        probs = pyro.param("probs", p0, constraint=constraints.unit_interval)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=data)

    r = responsibilities(w0.log() + dist.Bernoulli(p0).log_prob(data[:, None]).sum(-1))
    EM(model, m_step="gradient").step(data)
    store = pyro.get_param_store()
    torch.testing.assert_close(store["w"], r.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(store["probs"], (r.T @ data) / r.sum(0)[:, None], atol=1e-6, rtol=0)


def test_poisson_mixture_one_step_matches_closed_form():
    data = torch.cat([torch.poisson(torch.full((50,), 2.0)), torch.poisson(torch.full((50,), 9.0))])
    w0, rate0 = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 5.0])

    def model(data):
        w = pyro.param("w", w0, constraint=constraints.simplex)
        rate = pyro.param("rate", rate0, constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Poisson(rate[z]), obs=data)

    r = responsibilities(w0.log() + dist.Poisson(rate0).log_prob(data[:, None]))
    EM(model, m_step="gradient").step(data)
    store = pyro.get_param_store()
    torch.testing.assert_close(store["w"], r.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(store["rate"], (r * data[:, None]).sum(0) / r.sum(0), atol=1e-6, rtol=0)


def test_genetic_linkage_nonlinear_parameter():
    """Dempster, Laird & Rubin (1977), section 1: 197 animals in 4 cells with probabilities
    (1/2 + t/4, (1-t)/4, (1-t)/4, t/4). The first cell is split into two latent cells
    (1/2 and t/4); the observation is a deterministic map of the latent cell (a Delta, whose
    log density is -inf off the map: structural zeros). The MLE solves 197 t^2 - 15 t - 68 = 0.
    """
    counts = torch.tensor([125, 18, 20, 34])
    data = torch.repeat_interleave(torch.arange(4), counts).double()
    cell_of = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])  # latent cell -> observed cell

    def model(data):
        t = pyro.param("theta", torch.tensor(0.5), constraint=constraints.unit_interval)
        probs = torch.stack([0.5 + 0 * t, t / 4, (1 - t) / 4, (1 - t) / 4, t / 4])
        with pyro.plate("animals", len(data)):
            z = pyro.sample("z", dist.Categorical(probs))
            pyro.sample("x", dist.Delta(cell_of[z]), obs=data)

    em = EM(model)
    losses = [em.step(data) for _ in range(30)]  # EM's rate here is 0.13 per step
    theta = pyro.param("theta").item()
    # Each gradient M-step is solved to round-off (L-BFGS, then Newton on the exact Hessian),
    # so EM reaches the known fixed point, not a point near it.
    assert theta == pytest.approx((15 + math.sqrt(53809)) / 394, abs=1e-10)
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(losses, losses[1:]))
