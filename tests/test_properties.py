"""Invariants over randomly generated models and data."""

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.distributions import constraints

from pyro_em import EM


@pytest.mark.parametrize("m_step", ["auto", "gradient"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    K=st.integers(1, 3),
    N=st.integers(1, 12),
    D=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
    nested=st.booleans(),
)
@pytest.mark.slow
def test_exact_em_never_increases_the_loss(m_step, K, N, D, seed, nested):
    """Exact EM on random Gaussian mixtures (optionally with a per-datum second latent):
    the loss is monotone, params stay on their constraints, posteriors are distributions.
    The shared variance is a MAP site with an InverseGamma prior, which keeps the likelihood
    bounded (a free per-component scale can collapse onto one data point)."""
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(N, D, generator=g, dtype=torch.float64) * 3
    w0 = torch.rand(K, generator=g, dtype=torch.float64) + 0.05
    locs0 = torch.randn(K, D, generator=g, dtype=torch.float64)

    def model(data):
        w = pyro.param("w", w0 / w0.sum(), constraint=constraints.simplex)
        locs = pyro.param("locs", locs0)
        var = pyro.sample("var", dist.InverseGamma(torch.tensor(2.0, dtype=torch.float64), 1.0))
        flip = pyro.param("flip", torch.tensor(0.3, dtype=torch.float64), constraint=constraints.unit_interval)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            sign = 1.0
            if nested:
                sign = 1.0 - 2.0 * pyro.sample("s", dist.Bernoulli(flip))[..., None]
            pyro.sample("x", dist.Normal(sign * locs[z], var.sqrt()).to_event(1), obs=data)

    em = EM(model, m_step=m_step, max_plate_nesting=1)
    losses = [em.step(data) for _ in range(4)]
    losses.append(em.evaluate_loss(data))
    for before, after in zip(losses, losses[1:]):
        assert after <= before + 1e-9 * max(1.0, abs(before))
    w = pyro.param("w").detach()
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-12
    for probs in em.posterior(data).values():
        torch.testing.assert_close(probs.sum(-1), torch.ones(N, dtype=torch.float64))


CLEAR_ERRORS = "found no maximum|collapsed|\\+inf.*reg_covar|could not be initialized"


@settings(max_examples=25, deadline=None, derandomize=True)
@example(K=2, N=2, seed=0, duplicates=False)  # each component collapses onto one point
@given(
    K=st.integers(1, 3),
    N=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    duplicates=st.booleans(),
)
@pytest.mark.slow
def test_gradient_m_step_on_degenerate_mixtures(K, N, seed, duplicates):
    """Tiny, possibly repeated data and per-component scales, all by the gradient M-step:
    each step is monotone with finite params, or the fit stops with one of the clear errors
    (a collapse), the store untouched by the failed step; a step that cannot move says so."""
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(N, generator=g, dtype=torch.float64) * 2
    if duplicates:
        data[N // 2 :] = data[0]
    locs0 = torch.randn(K, generator=g, dtype=torch.float64)

    def model(data):
        w = pyro.param("w", torch.ones(K, dtype=torch.float64) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", locs0)
        scales = pyro.param("scales", torch.ones(K, dtype=torch.float64), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=data)

    em = EM(model, m_step="gradient", max_plate_nesting=1)
    losses = []
    try:
        for _ in range(6):
            losses.append(em.step(data))
            before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
            assert not em.stalled
    except ValueError as e:
        assert re.search(CLEAR_ERRORS, str(e)), str(e)
        for k, v in pyro.get_param_store().items():
            assert torch.equal(v.detach(), before[k]) if losses else True
    for before_loss, after_loss in zip(losses, losses[1:]):
        assert after_loss <= before_loss + 1e-9 * max(1.0, abs(before_loss))
    for v in pyro.get_param_store().values():
        assert bool(torch.isfinite(v).all())
