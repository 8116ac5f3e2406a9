"""Initialization and restarts: EM finds local optima; restarts keep the best run, reproducibly,
and a collapsed component is reported."""

import sys
import warnings
from pathlib import Path

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


# ---- runs stepped together (pyro_em.batched) ----------------------------------------------


def _random_tables(data):
    """Each run's tables of the enumeration tutorial's HMM, drawn."""
    for name, shape in (("transition", (3, 3)), ("emission", (3, 4))):
        pyro.param(name, dist.Dirichlet(torch.ones(shape)).sample(), constraint=constraints.simplex)


def _earthquakes():
    """Zucchini and MacDonald's earthquake counts and 3-state Poisson HMM, as benchmarks/
    bench_small.py fits them; each run draws its rates."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from bench_small import EARTHQUAKES, poisson_hmm
    finally:
        sys.path.pop(0)

    def init(counts):
        pyro.param("rates", 5 + 30 * torch.rand(3), constraint=constraints.positive)

    return poisson_hmm, (torch.tensor(EARTHQUAKES, dtype=torch.float64),), {}, init


def _together_cases():
    from pyro.infer.autoguide import init_to_sample

    import pyro_models as pm

    sequences, lengths, args = pm.polyphonic()
    hmm_data = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(1))
    return {
        # (model, args, EM options, init)
        "full-covariance mixture": (model, (data(),), {"reg_covar": 1e-6}, None),
        "full-covariance mixture, traced (jit=False)": (model, (data(),), {"reg_covar": 1e-6, "jit": False}, None),
        "earthquake Poisson HMM": _earthquakes(),
        "examples/hmm.py model 3 (factorial, traced)": (pm.hmm_3, (sequences, lengths, args), {"init_loc_fn": init_to_sample, "map_space": "unconstrained"}, None),
        "enumeration tutorial HMM (MAP Dirichlet)": (pm.enumeration_hmm, (hmm_data, 4), {"init_loc_fn": init_to_sample, "map_space": "unconstrained"}, None),
        "examples/hmm.py model 1 (sequences that end)": (pm.hmm_1, (sequences, lengths, args), {"init_loc_fn": init_to_sample, "map_space": "unconstrained"}, None),
        "enumeration tutorial HMM (params)": (pm.param_hmm, (hmm_data,), {}, _random_tables),
    }


@pytest.mark.jit_only  # (the cases say how they step: fused, traced, jit=False)
@pytest.mark.parametrize("case", sorted(_together_cases()))
def test_runs_stepped_together_are_the_runs_one_after_another(case):
    """fit(n_init=5) steps the runs together (one program over a leading run dim, fused or
    traced E-steps): every run's final loss, the best run, its losses and the fitted params
    equal those of the runs one after another (a callback makes them so) to round-off."""
    fitted, args, options, init = _together_cases()[case]
    out = {}
    for apart in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = EM(fitted, **options).fit(*args, n_init=5, init=init, max_iter=60, tol=1e-9,
                                              callback=(lambda i, loss: None) if apart else None)
        out[apart] = result, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    (together, params), (alone, reference) = out[False], out[True]
    assert together.restarts == "stepped together" and alone.restarts.startswith("one after another")
    assert len(set(alone.run_losses)) > 1  # (the starts differ)
    assert together.run_losses == pytest.approx(alone.run_losses, rel=1e-10)
    first, second = sorted(alone.run_losses)[:2]
    if second - first <= 1e-9 * abs(first):
        return  # (two runs reached the same optimum: which is best is round-off's choice)
    assert together.best_run == alone.best_run and together.n_iter == together.n_e_steps == alone.n_iter
    assert together.losses == pytest.approx(alone.losses, rel=1e-10)
    assert together.converged == alone.converged
    for name, value in reference.items():
        torch.testing.assert_close(params[name], value, rtol=1e-8, atol=1e-10)


def test_a_run_that_fails_stepped_together_fails_as_it_would_alone():
    """A run whose component collapses onto one point (no reg_covar) fails at the step where
    it would alone, with the same warning, and the others go on: the runs' steps differ in what
    Python reads, so that step runs each run on its own."""
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(30, generator=g), 5 + torch.randn(30, generator=g), torch.tensor([40.0])])
    starts = iter([[-0.5, 5.5], [0.0, 40.0], [0.5, 4.5]] * 2)

    def mixture(X):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.zeros(2))
        scale = pyro.param("scale", torch.ones(2), constraint=constraints.positive)
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], scale[z]), obs=X)

    def init(X):
        pyro.param("locs", torch.tensor(next(starts)))

    out = {}
    for apart in (False, True):
        pyro.clear_param_store()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[apart] = EM(mixture).fit(X, n_init=3, init=init, max_iter=50,
                                         callback=(lambda i, loss: None) if apart else None)
        failures = [str(w.message) for w in caught if "failed" in str(w.message)]
        assert failures == ["EM run 1 of 3 failed: The closed-form update of param 'scale' collapsed at slot(s) [1]: "
                            "a variance is zero up to round-off" + failures[0].split("round-off", 1)[1]]
    assert out[False].restarts == "stepped together"
    assert out[False].run_losses[1] == out[True].run_losses[1] == float("inf")
    assert out[False].run_losses == pytest.approx(out[True].run_losses, rel=1e-10)


def test_reads_of_runs_stepped_together():
    """Python's reads inside the runs' step: the value where the runs agree, Diverged where
    they differ."""
    from pyro_em.batched import Diverged, _Reads

    def branch(x):
        with _Reads():
            return x * 2 if bool((x > 0).all()) else x - float(x.sum() * 0)

    torch.testing.assert_close(torch.func.vmap(branch)(torch.ones(3, 2)), 2 * torch.ones(3, 2))
    with pytest.raises(Diverged, match="different values"):
        torch.func.vmap(branch)(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))


def test_runs_that_cannot_step_together_say_why():
    """A param without a closed form: the runs run one after another, and the result says why."""

    def softplus_scale(X):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", lambda: torch.randn(2))
        raw = pyro.param("raw", torch.zeros(()))
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z], torch.nn.functional.softplus(raw)), obs=X)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = EM(softplus_scale).fit(torch.randn(40), n_init=3, max_iter=5)
    assert result.restarts == "one after another: param 'raw' takes the gradient M-step"
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two = EM(model).fit(data(), n_init=2, max_iter=5)
    assert two.restarts == "one after another: 2 runs cost less one after another than stepped together"


def test_runs_on_large_data_step_in_groups(monkeypatch):
    """The runs step together in groups whose data elements stay under MAX_TOGETHER_ELEMENTS
    (here 3 runs of 240), with the results of the runs one after another; where a group would
    be smaller than MIN_TOGETHER, one after another, saying why."""
    from pyro_em import batched

    monkeypatch.setattr(batched, "MAX_TOGETHER_ELEMENTS", 3 * data().numel())
    sizes, call = [], batched.RunsStep.__call__
    monkeypatch.setattr(batched.RunsStep, "__call__", lambda self, values: sizes.append(len(values[0])) or call(self, values))
    _, grouped = fit_restarts(3, n_init=6)
    _, apart = fit_restarts(3, n_init=6, callback=lambda i, loss: None)
    assert grouped.restarts == "stepped together" and sizes and max(sizes) == 3
    assert grouped.run_losses == pytest.approx(apart.run_losses, rel=1e-10)
    monkeypatch.setattr(batched, "MAX_TOGETHER_ELEMENTS", data().numel())
    _, large = fit_restarts(3, n_init=6)
    assert large.restarts.startswith("one after another: the data are large")
