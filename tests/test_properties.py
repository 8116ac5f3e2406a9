"""Invariants over randomly generated models and data."""

import re
import warnings

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
        data[N // 2 :] = data[0].clone()
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


def _emission(family, params, z, data, D):
    """The observation ``data`` under ``family`` given state ``z``; every family here has a
    bounded likelihood (discrete, or a scale kept away from 0)."""
    if family == "categorical":
        return dist.Categorical(params[z])
    if family == "bernoulli":
        return dist.Bernoulli(params[z]).to_event(1)
    if family == "poisson":
        return dist.Poisson(params[z]).to_event(1)
    loc, scale = params
    return dist.Normal(loc[z], scale if scale.dim() == 0 else scale[z].unsqueeze(-1)).to_event(1)


def _bounded_model(family, K, D, hmm, prior, g):
    """A mixture (or, ``hmm``, a pyro.markov chain) of K states whose likelihood is bounded:
    discrete emissions, or Normals whose scales have a lower bound or an InverseGamma prior."""
    w0 = torch.rand(K, generator=g) + 0.05
    trans0 = torch.rand(K, K, generator=g) + 0.05
    table0 = torch.rand(K, 3, generator=g) + 0.05
    p0 = torch.rand(K, D, generator=g) * 0.8 + 0.1
    rate0 = torch.rand(K, D, generator=g) * 3 + 0.2
    loc0 = torch.randn(K, D, generator=g)

    def emission_params():
        if family == "categorical":
            return pyro.param("table", table0 / table0.sum(-1, keepdim=True), constraint=constraints.simplex)
        if family == "bernoulli":
            if prior:
                return pyro.sample("p", dist.Beta(2.0, 2.0).expand([K, D]).to_event(2))
            return pyro.param("p", p0, constraint=constraints.unit_interval)
        if family == "poisson":
            if prior:
                return pyro.sample("rate", dist.Gamma(2.0, 1.0).expand([K, D]).to_event(2))
            return pyro.param("rate", rate0, constraint=constraints.positive)
        loc = pyro.param("loc", loc0)
        if prior:  # a shared variance, MAP under an InverseGamma prior (density 0 at 0)
            return loc, pyro.sample("var", dist.InverseGamma(2.0, 1.0)).sqrt()
        return loc, pyro.param("scale", torch.ones(K), constraint=constraints.greater_than(0.3))

    def model(data):
        w = pyro.param("w", w0 / w0.sum(), constraint=constraints.simplex)
        params = emission_params()
        if hmm:
            trans = pyro.param("trans", trans0 / trans0.sum(-1, keepdim=True), constraint=constraints.simplex)
            z = None
            for t in pyro.markov(range(len(data))):
                z = pyro.sample(f"z_{t}", dist.Categorical(w if z is None else trans[z]),
                                infer={"enumerate": "parallel"})
                pyro.sample(f"x_{t}", _emission(family, params, z, data, D), obs=data[t])
            return
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", _emission(family, params, z, data, D), obs=data)

    return model


def _bounded_data(family, N, D, g):
    if family == "categorical":
        return torch.randint(3, (N,), generator=g)
    if family == "bernoulli":
        return (torch.rand(N, D, generator=g) < 0.5).double()
    if family == "poisson":
        return torch.poisson(torch.full((N, D), 2.0), generator=g)
    return torch.randn(N, D, generator=g) * 2


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    family=st.sampled_from(["categorical", "bernoulli", "poisson", "normal"]),
    K=st.integers(1, 4),
    N=st.integers(1, 8),
    D=st.integers(1, 2),
    hmm=st.booleans(),
    prior=st.booleans(),
    m_step=st.sampled_from(["auto", "gradient"]),
    duplicates=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.slow
def test_no_false_alarm_where_the_likelihood_is_bounded(family, K, N, D, hmm, prior, m_step, duplicates, seed):
    """Small mixtures and HMMs (down to one or two points, repeated ones too) whose
    likelihood is bounded by construction: discrete emissions (log pmf <= 0), Normals whose
    scales have a lower bound or an InverseGamma prior, weights and tables that the data
    leave empty heading to 0. EM must never say "no maximum" or "collapsed" there."""
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(seed)
    data = _bounded_data(family, N, D, g)
    if duplicates:
        data[N // 2 :] = data[0].clone()
    em = EM(_bounded_model(family, K, D, hmm, prior, g), m_step=m_step, max_plate_nesting=0 if hmm else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a stalled gradient M-step, symmetric starts: not the point)
        try:
            for _ in range(4):
                em.step(data)
        except ValueError as e:
            assert not re.search("no maximum|collapsed", str(e)), str(e)
            raise


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    N=st.integers(1, 4),
    m_step=st.sampled_from(["auto", "gradient"]),
    kind=st.sampled_from(["component", "prior_scale"]),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.slow
def test_every_constructed_collapse_is_caught(N, m_step, kind, seed):
    """Unbounded by construction: as many Normal components as distinct points, each started
    on its own point with a scale of its own (each collapses onto its point); or a param that
    is the scale of the Normal prior of MAP-estimated values (they approach their mean, the
    scale goes to 0). Each stops with a clear error naming the param within 60 steps."""
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(N, generator=g) * 3 + torch.arange(N) * 10.0

    def components(data):
        w = pyro.param("w", torch.ones(N) / N, constraint=constraints.simplex)
        locs = pyro.param("locs", data.clone())
        scales = pyro.param("scales", torch.ones(N), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=data)

    def prior_scale(data):
        m = pyro.param("m", torch.tensor(0.0))
        scales = pyro.param("scales", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            mu = pyro.sample("mu", dist.Normal(m, scales))
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data)

    em = EM(components if kind == "component" else prior_scale, m_step=m_step)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="(no maximum|collapsed|hierarchical scale).*"):
        warnings.simplefilter("ignore")
        for _ in range(60):
            em.step(data)
