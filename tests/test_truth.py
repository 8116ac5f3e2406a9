"""Right, or a clear error, on the models people bring. Each test reproduces a silent wrong
answer, a false alarm or an unhelpful error seen on such models: constraints the closed form
cannot keep, maxima on a boundary against collapses (both M-steps), fits whose loss rose, the
user's tensors, observed values outside their support, warnings about empty and symmetric
components, ``obs_mask`` integrated out, models from outside Pyro's repository that failed,
errors that keep their cause, and what later steps run (``jit``)."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_em import EM, ConvergenceWarning


def two_clusters(seed=0, spread=0.5):
    pyro.set_rng_seed(seed)
    return torch.cat([torch.randn(300) - 2, spread * torch.randn(200) + 3])


def normal_mixture(loc_constraint=constraints.real, scale_constraint=constraints.positive, K=2):
    def model(data):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.linspace(-1.0, 1.0, K), constraint=loc_constraint)
        scales = pyro.param("scales", torch.ones(K), constraint=scale_constraint)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=data)

    return model


def _monotone(losses):
    return all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:]))


def test_interval_constraint_is_kept_and_the_loss_falls():
    """locs under interval(-1.5, 1.5): the closed form's weighted means (-2, 3) leave it; the
    constrained maximum sits on the bounds (a 1-D unimodal Q per slot)."""
    data = two_clusters()
    em = EM(normal_mixture(constraints.interval(-1.5, 1.5)))
    result = em.fit(data, max_iter=200, tol=1e-10)
    assert "locs: gradient" in str(em.plan) and "Interval" in str(em.plan)
    assert _monotone(result.losses) and result.converged
    locs = pyro.param("locs").detach()
    assert ((locs >= -1.5) & (locs <= 1.5)).all()
    assert torch.allclose(locs, torch.tensor([-1.5, 1.5]), atol=1e-6)


@pytest.mark.parametrize("m_step", ["auto", "gradient"])
@pytest.mark.parametrize("seed", [0, 3])
def test_scale_on_its_lower_bound_is_a_maximum(seed, m_step):
    """scales under greater_than(0.8) where one cluster's spread is 0.3: the maximum is on the
    bound, Q finite. No 'not finite' error, no collapse alarm; both M-steps agree."""
    data = two_clusters(seed, spread=0.3)
    em = EM(normal_mixture(scale_constraint=constraints.greater_than(0.8)), m_step=m_step)
    result = em.fit(data, max_iter=200, tol=1e-10)
    assert result.converged and _monotone(result.losses)
    scales = pyro.param("scales").detach()
    assert abs(float(scales[1]) - 0.8) < 1e-6 and float(scales[0]) > 0.8


def test_unconstrained_scale_takes_the_closed_form_still():
    """A narrower constraint sends a param to the gradient; the ordinary ones do not."""
    em = EM(normal_mixture())
    em.step(two_clusters())
    assert "gradient" not in str(em.plan)


@pytest.mark.parametrize("seed", [0, 3])
def test_variance_term_tending_to_zero_is_a_maximum_not_a_collapse(seed):
    """An observation variance ``sample_var + bin_var`` (research code's binned measurements):
    ``bin_var -> 0`` has a finite limit. The fit's loss is the profile likelihood's minimum
    over ``bin_var >= 0`` (scipy's bounded search), on the boundary (seed 0) or inside it."""
    from scipy.optimize import minimize_scalar

    def model(x, sample_var):
        bin_var = pyro.param("bin_var", torch.tensor(1.0), constraint=constraints.positive)
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, (sample_var + bin_var).sqrt()), obs=x)

    pyro.set_rng_seed(seed)
    sv = torch.rand(50) + 0.5
    x = torch.randn(50) * (0.7 * sv).sqrt()
    result = EM(model).fit(x, sv, max_iter=200, tol=1e-12)
    assert result.converged and _monotone(result.losses)

    def profile(v):
        s = sv + v
        loc = (x / s).sum() / (1 / s).sum()
        return -float(dist.Normal(loc, s.sqrt()).log_prob(x).sum())

    best = minimize_scalar(profile, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12}).fun
    assert abs(result.loss - best) < 1e-9 * abs(best)


def test_one_hot_probs_by_gradient_fit_as_the_closed_form():
    """Categorical probs fitted to identical data: the MLE is one-hot, on the simplex's
    boundary, with Q finite (0)."""

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        probs = pyro.param("probs", torch.tensor([[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]), constraint=constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Categorical(probs[z]), obs=x)

    from pyro_em import SymmetryWarning

    x = torch.zeros(30, dtype=torch.long)
    with pytest.warns(SymmetryWarning, match="fit fewer"):  # (identical data: the components agree)
        result = EM(model, m_step="gradient").fit(x, max_iter=100)
    assert result.converged and result.loss < 1e-5
    assert (pyro.param("probs")[:, 0] > 1 - 1e-6).all()


def _collapsing(x, K):
    w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", x[:K].clone())
    scales = pyro.param("scales", torch.ones(K), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=x)


@pytest.mark.parametrize("m_step", ["auto", "gradient"])
def test_gradual_collapse_is_an_error_on_both_paths(m_step):
    """K=4 components on 25 points: one scale falls 1e-6 -> 1e-15 over a few steps onto one
    datum (the likelihood is unbounded). The closed form used to go on silently."""
    pyro.set_rng_seed(17)
    x = torch.randn(25) * 20
    with pytest.raises(ValueError, match="(no maximum: param|param 'scales' collapsed)"):
        EM(_collapsing, m_step=m_step).fit(x, 4, max_iter=100)


def test_hierarchical_scale_written_as_a_param_is_an_error():
    """A group scale written as a pyro.param over MAP-estimated group means: the MAP
    objective grows without bound as the scale goes to 0 (the means onto their prior's),
    whatever the data: refused when the model is planned."""

    def model(y):
        m = pyro.param("m", torch.tensor(0.0))
        tau = pyro.param("tau", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("groups", 8):
            mu = pyro.sample("mu", dist.Normal(m, tau))
            with pyro.plate("obs", 5, dim=-2):
                pyro.sample("y", dist.Normal(mu, 3.0), obs=y)

    y = torch.randn(5, 8) * 3 + 2
    with pytest.raises(ValueError, match="Param 'tau' is the scale of the prior of MAP-estimated site 'mu' \\(a hierarchical scale\\)"):
        EM(model).fit(y, max_iter=500)
    assert "tau" not in pyro.get_param_store()  # (refused at the first step, which made it)


def test_fit_whose_loss_rose_is_not_converged(monkeypatch):
    """A fit whose loss rose is never reported as converged (an exact EM step cannot)."""
    data = two_clusters()
    em = EM(normal_mixture())
    losses = iter([10.0, 9.0, 9.5, 9.5, 9.5])
    monkeypatch.setattr(em, "_fit_once", lambda args, kwargs, **kw: em._fit_loop(lambda: (next(losses), 1), **kw))
    with pytest.warns(ConvergenceWarning, match="loss rose at iteration 2"):
        result = em.fit(data, max_iter=5)
    assert not result.converged


# ---- the user's tensors -------------------------------------------------------------------


def test_param_initialized_as_a_view_of_the_data_leaves_the_data_alone():
    """``pyro.param("locs", data[:2])``, as tutorials write it: Pyro keeps the view, and the
    M-step writes params in place; the data must not change."""

    def model(data):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", data[:2])
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

    data = two_clusters()
    before = data.clone()
    EM(model).fit(data, max_iter=20)
    assert torch.equal(data, before)
    assert not torch.equal(pyro.param("locs").detach(), before[:2])  # (the fit moved them)


@pytest.mark.parametrize("bad", [2.0, 0.5])
def test_out_of_support_observation_raises_as_pyro_would(bad):
    """A Bernoulli observation of 2 (or 0.5) in a mixture that steps as a fused chain (no
    model run after planning): Pyro's validation rejects it, so must EM, naming the site."""

    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        p = pyro.param("p", torch.tensor([0.3, 0.6]), constraint=constraints.unit_interval)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Bernoulli(p[z]), obs=x)

    x = torch.tensor([0.0, 1.0, bad, 1.0])
    with pytest.raises(ValueError, match=rf"Site 'x' has the value {bad} at index \(2,\), outside the support"):
        EM(model).fit(x, max_iter=3)
    assert set(pyro.get_param_store().keys()) == set()  # (a failed first step leaves no params)
    with pyro.validation_enabled(False):  # Pyro's switch off: neither checks
        EM(model).step(torch.tensor([0.0, 1.0, 1.0]))


# ---- warnings that tell the truth ---------------------------------------------------------

# Annual counts of major earthquakes (magnitude 7 and above), 1900-2006: Zucchini and MacDonald,
# "Hidden Markov Models for Time Series" (2009), Table 1.1.
EARTHQUAKES = [
    13, 14, 8, 10, 16, 26, 32, 27, 18, 32, 36, 24, 22, 23, 22, 18, 25, 21, 21, 14, 8, 11, 14, 23, 18, 17,
    19, 20, 22, 19, 13, 26, 13, 14, 22, 24, 21, 22, 26, 21, 23, 24, 27, 41, 31, 27, 35, 26, 28, 36, 39, 21,
    17, 22, 17, 19, 15, 34, 10, 15, 22, 18, 15, 20, 15, 22, 19, 16, 30, 27, 29, 23, 20, 16, 21, 21, 25, 16,
    18, 15, 18, 14, 10, 15, 8, 15, 6, 11, 8, 7, 18, 16, 13, 12, 13, 20, 15, 16, 12, 18, 15, 16, 13, 15,
    16, 11, 11,
]


def poisson_hmm(counts):
    start = pyro.param("start", torch.ones(3) / 3, constraint=constraints.simplex)
    trans = pyro.param("trans", torch.full((3, 3), 0.1) + 0.7 * torch.eye(3), constraint=constraints.simplex)
    rates = pyro.param("rates", torch.tensor([10.0, 20.0, 30.0]), constraint=constraints.positive)
    z = None
    for t in pyro.markov(range(len(counts))):
        z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]), infer={"enumerate": "parallel"})
        pyro.sample(f"x_{t}", dist.Poisson(rates[z]), obs=counts[t])


def test_hmm_initial_distribution_on_one_state_is_no_collapse():
    """One sequence: the maximum-likelihood initial distribution is a unit vector (hmmlearn
    agrees). Its zeros are no empty components: every state is visited later."""
    counts = torch.tensor(EARTHQUAKES, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = EM(poisson_hmm).fit(counts, max_iter=500, tol=1e-10)
    assert result.converged
    assert float(pyro.param("start").detach().max()) > 1 - 1e-8


def test_genuinely_empty_component_warns():
    """Three components on two clusters, one started far away: its weight becomes exactly 0
    (underflow), which used to pass as a structural zero."""
    from pyro_em import CollapseWarning

    data = two_clusters()
    pyro.param("locs", torch.tensor([-2.0, 3.0, 80.0]))
    with pytest.warns(CollapseWarning, match=r"Param 'w' has a weight near 0 .* at slot\(s\) \[2\]"):
        EM(normal_mixture(K=3)).fit(data, max_iter=50)
    assert float(pyro.param("w").detach()[2]) < 1e-8


def test_symmetric_start_warns_with_the_param_and_the_fix():
    """Components started equal (as init_to_median gives, or a careless init) stay equal: EM
    reports convergence in a few steps at the symmetric fixed point. It must say so."""
    from pyro_em import SymmetryWarning

    data = two_clusters()
    pyro.param("locs", torch.zeros(2))
    with pytest.warns(SymmetryWarning, match=r"symmetric point: values 0 and 1 .* 'locs'.* equal across components.*n_init"):
        result = EM(normal_mixture()).fit(data, max_iter=50)
    assert result.n_iter < 5


# ---- obs_mask: missing observations are integrated out -------------------------------------


def _traceenum_loss(model, args, max_plate_nesting=1):
    from test_pyro_models import traceenum_loss

    return traceenum_loss(model, args, {}, max_plate_nesting)


def test_obs_mask_is_integrated_out_not_point_estimated():
    """Pyro's missing-data idiom, 3 features, 30% missing: the scale is the observed-data MLE
    (a MAP value for the missing entries used to bias it: 1.70 against 2.04), and the loss is
    the observed data's negative log likelihood, TraceEnum_ELBO's for the same model written
    with poutine.mask."""
    N, D = 200, 3
    x = torch.randn(N, D) * 2 + torch.tensor([1.0, -1.0, 0.5])
    mask = torch.rand(N, D) > 0.3
    x = torch.where(mask, x, torch.full((), 1e6))  # a placeholder far off: never read

    def model(x, mask):
        loc = pyro.param("loc", torch.zeros(D))
        scale = pyro.param("scale", torch.ones(()), constraint=constraints.positive)
        with pyro.plate("f", D, dim=-1), pyro.plate("n", N, dim=-2):
            pyro.sample("x", dist.Normal(loc, scale), obs=x, obs_mask=mask)

    def masked(x, mask):
        loc = pyro.param("loc", torch.zeros(D))
        scale = pyro.param("scale", torch.ones(()), constraint=constraints.positive)
        with pyro.plate("f", D, dim=-1), pyro.plate("n", N, dim=-2), pyro.poutine.mask(mask=mask):
            pyro.sample("x", dist.Normal(loc, scale), obs=x)

    em = EM(model)
    result = em.fit(x, mask, max_iter=50, tol=1e-12)
    assert "'x_unobserved': integrated out" in str(em.plan)
    assert not [k for k in pyro.get_param_store().keys() if k.startswith("AutoDelta")]
    loc = torch.where(mask, x, torch.zeros(())).sum(0) / mask.sum(0)
    mle = (torch.where(mask, x - loc, torch.zeros(())).square().sum() / mask.sum()).sqrt()
    assert torch.allclose(pyro.param("loc").detach(), loc, rtol=1e-10)
    assert abs(float(pyro.param("scale").detach()) - float(mle)) < 1e-10
    assert result.loss == pytest.approx(_traceenum_loss(masked, (x, mask), 2), rel=1e-12)


def test_obs_mask_in_a_mixture_gives_the_masked_model_iterates():
    x = torch.cat([torch.randn(100) - 2, torch.randn(100) + 2])
    mask = torch.rand(200) > 0.3

    def mixture(masked):
        def model(x, mask):
            w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
            locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
            with pyro.plate("n", len(x)):
                z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
                if masked:
                    with pyro.poutine.mask(mask=mask):
                        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)
                else:
                    pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x, obs_mask=mask)

        return model

    losses = {}
    for masked in (False, True):
        pyro.clear_param_store()
        em = EM(mixture(masked))
        losses[masked] = [em.step(x, mask) for _ in range(10)] + [em.evaluate_loss(x, mask)]
        assert losses[masked][-1] == pytest.approx(_traceenum_loss(mixture(True), (x, mask)), rel=1e-12)
    assert losses[False] == pytest.approx(losses[True], rel=1e-12)


def test_obs_mask_read_by_a_later_site_is_a_continuous_latent():
    """An autoregressive series with gaps: the unobserved value at t feeds step t + 1, so it is
    a continuous latent (MAP); the plan says so, and the loss is TraceEnum_ELBO's with an
    AutoDelta guide over those values."""
    T = 30
    series = torch.cumsum(torch.randn(T), 0)
    observed = torch.rand(T) > 0.3
    observed[-1] = True  # (TraceEnum_ELBO would count a last unobserved value, read by none)

    def ar(series, observed):
        a = pyro.param("a", torch.tensor(0.5))
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        prev = torch.tensor(0.0)
        for t in range(T):
            prev = pyro.sample(f"x_{t}", dist.Normal(a * prev, s), obs=series[t], obs_mask=observed[t])

    em = EM(ar)
    em.fit(series, observed, max_iter=20)
    plan = str(em.plan)
    assert f"'x_{T - 1}_unobserved': integrated out" in plan
    assert "'x_{t}_unobserved' for t in 0..28" in plan and "continuous latents, read by a later site" in plan
    assert em.evaluate_loss(series, observed) == pytest.approx(_traceenum_loss(ar, (series, observed), 0), rel=1e-9)


# ---- models from outside Pyro's repository that failed -------------------------------------


@pytest.mark.jit_only
def test_emission_computed_from_the_state_fuses_and_equals_traceenum():
    """An urn HMM (course material's classic: the hidden number of red balls, 10 draws a
    step): ``Binomial(10, urn / 10)``, an argument computed from the enumerated state, in a
    chain that fuses. Rebuilding the emission took both of Binomial's lazy arguments."""

    def model(draws):
        start = pyro.param("start", torch.ones(11) / 11, constraint=constraints.simplex)
        trans = pyro.param("trans", torch.eye(11) * 0.8 + 0.2 / 11, constraint=constraints.simplex)
        z = None
        for t in pyro.markov(range(len(draws))):
            z = pyro.sample(f"urn_{t}", dist.Categorical(start if z is None else trans[z]), infer={"enumerate": "parallel"})
            pyro.sample(f"draw_{t}", dist.Binomial(10, z / 10), obs=draws[t])

    draws = torch.tensor([3.0, 4.0, 2.0, 8.0, 9.0, 7.0, 8.0, 3.0, 2.0, 3.0])
    em = EM(model)
    from pyro_em import CollapseWarning

    with pytest.warns(CollapseWarning, match=r"'start'.*slot\(s\) \[0, 5, 6, 10\]"):  # (no draw of 0 or 10)
        result = em.fit(draws, max_iter=500)
    assert em.fused_chain is not None and _monotone(result.losses)
    assert em.evaluate_loss(draws) == pytest.approx(_traceenum_loss(model, (draws,), 0), rel=1e-9)


def test_map_concentration_with_a_normal_prior_stays_where_beta_accepts_it():
    """Beta concentrations as MAP sites under Normal priors (real-valued coordinates): a
    replayed Q evaluated without Pyro's checks accepted negative values, and the next E-step
    died in Pyro's validation. The fit must stay where the Beta accepts its arguments."""

    def model(x):
        a = pyro.sample("a", dist.Normal(1.0, 1.0))
        b = pyro.sample("b", dist.Normal(1.0, 1.0))
        with pyro.plate("n", len(x)):
            pyro.sample("x", dist.Beta(a, b), obs=x)

    x = torch.distributions.Beta(0.02, 0.02).sample((200,)).clamp(1e-300, 1 - 1e-16)
    em = EM(model)
    result = em.fit(x, max_iter=50)
    assert _monotone(result.losses)
    assert float(pyro.param("AutoDelta.a").detach()) > 0 and float(pyro.param("AutoDelta.b").detach()) > 0
    assert em.evaluate_loss(x) == pytest.approx(_traceenum_loss(model, (x,), 1), rel=1e-9)


def test_subsampled_plate_with_a_per_datum_map_site_names_the_plate_first():
    """A local continuous latent in a plate that subsamples: the plate's error, not Pyro's
    internal one about the MAP param's shape or index."""

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("n", len(x), subsample_size=10) as idx:
            mu = pyro.sample("mu", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])

    with pytest.raises(ValueError, match="Plate 'n' subsamples 10 of 50 .* site 'mu' .* Remove the subsampling"):
        EM(model).step(torch.randn(50))
    assert "loc" not in pyro.get_param_store()


def test_structure_that_depends_on_a_param_is_named_as_such():
    """Sites that appear when a param crosses a value, under the gradient M-step: a bare
    KeyError from inside used to end it."""

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        for i in range(3 if float(loc.detach()) > 1 else 2):
            z = pyro.sample(f"z{i}", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample(f"x{i}", dist.Normal(loc * z, 1.0), obs=x[i])

    with pytest.raises(RuntimeError, match="structure changed .* new site\\(s\\) 'x2', 'z2'"):
        EM(model, m_step="gradient").fit(torch.tensor([3.0, 3.5, 4.0]), max_iter=5)


@pytest.mark.jit_only
def test_error_inside_a_fused_chain_keeps_its_cause(monkeypatch):
    import pyro_em.iteration

    def boom(*args, **kwargs):
        raise RuntimeError("boom in the forward pass")

    data = two_clusters()
    em = EM(normal_mixture())
    em.step(data)
    assert em.fused_chain is not None
    monkeypatch.setattr(pyro_em.iteration, "hmm_log_prob", boom)
    with pytest.raises(ValueError, match="undefined \\(RuntimeError: boom in the forward pass\\)") as info:
        em.step(data)
    assert isinstance(info.value.__cause__, RuntimeError)


# ---- the contract of later steps ----------------------------------------------------------


def _side_effect_mixture(calls):
    def model(data):
        calls.append(1)
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

    return model


def test_jit_false_runs_the_model_at_every_step_with_the_same_iterates():
    data = two_clusters()
    runs, losses = {}, {}
    for jit in (True, False):
        pyro.clear_param_store()
        calls = []
        em = EM(_side_effect_mixture(calls), jit=jit)
        losses[jit] = [em.step(data) for _ in range(30)]
        runs[jit] = len(calls)
        assert (em.fused_chain is not None) == jit
    assert runs[False] >= 30 > runs[True]
    assert losses[False] == pytest.approx(losses[True], rel=1e-12)
    with pytest.raises(ValueError, match="jit must be True or False"):
        EM(_side_effect_mixture([]), jit=1)


def _switching_model(state):
    """A model whose structure depends on a flag outside it (a global a user script flips)."""

    def model(data):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)
        if state["extra"]:
            pyro.sample("extra", dist.Normal(locs[0], 1.0), obs=torch.tensor(0.0))

    return model


@pytest.mark.parametrize("jit", [True, False])
def test_structure_change_is_an_error(jit):
    """Planned, then the structure changes: a fused chain never runs the model again, so the
    fit's end says so; with jit=False the step where it changes does."""
    state, data = {"extra": False}, two_clusters()
    em = EM(_switching_model(state), jit=jit)
    em.step(data)
    state["extra"] = True
    match = "structure changed during the fit \\(site 'extra'.*jit=False" if jit else "structure changed between EM steps"
    with pytest.raises(RuntimeError, match=match):
        em.fit(data, max_iter=20)
