"""Exactness on the ways people write models: masked latents under the gradient M-step, left-right
HMMs whose zeros stay exactly zero, integer counts and mixed precisions, per-datum weights."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hmmlearn import hmm
from pyro import poutine
from pyro.infer import config_enumerate
from torch.distributions import constraints

from pyro_em import EM


def categorical_hmm(init, param_space="simplex"):
    """Sequences along a plate, steps masked past each sequence's end, Categorical emissions:
    the layout of Pyro's examples/hmm.py, whose masked enumerated sites once met the gradient
    M-step with their packed dims in another order."""

    def model(X, lengths):
        kw = {"constraint": constraints.simplex} if param_space == "simplex" else {}
        start = pyro.param("start", init["start"].clone(), **kw)
        trans = pyro.param("trans", init["trans"].clone(), **kw)
        emit = pyro.param("emit", init["emit"].clone(), **kw)
        with pyro.plate("sequences", X.shape[0], dim=-1):
            z = None
            for t in pyro.markov(range(X.shape[1])):
                with poutine.mask(mask=t < lengths):
                    z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                    pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])

    return model


def reference_fit(init, seqs, iters, **kw):
    """hmmlearn's CategoricalHMM from the same start, one Baum-Welch iteration at a time."""
    ref = hmm.CategoricalHMM(len(init["start"]), n_iter=1, tol=0, init_params="", params="ste", **kw)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = (init[k].numpy() for k in ("start", "trans", "emit"))
    X, lengths = torch.cat(seqs).numpy().reshape(-1, 1), [len(s) for s in seqs]
    out = []
    for _ in range(iters):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.fit(X, lengths)
        out.append({"start": ref.startprob_.copy(), "trans": ref.transmat_.copy(), "emit": ref.emissionprob_.copy()})
    return out


def padded(seqs):
    T = max(len(s) for s in seqs)
    return torch.stack([torch.cat([s, s.new_zeros(T - len(s))]) for s in seqs]), torch.tensor([len(s) for s in seqs])


def test_masked_chain_gradient_m_step_equals_closed_form_and_hmmlearn():
    """As many sequences as states (3 and 3), so a position-based mix-up of the packed dims would
    go unnoticed by shapes; every param takes the gradient M-step."""
    g = torch.Generator().manual_seed(0)
    K, M = 3, 4
    init = {
        "start": torch.tensor([0.5, 0.3, 0.2]),
        "trans": torch.softmax(torch.randn(K, K, generator=g), -1),
        "emit": torch.softmax(torch.randn(K, M, generator=g), -1),
    }
    seqs = [torch.randint(M, (n,), generator=g) for n in (9, 6, 8)]
    X, lengths = padded(seqs)
    expected = reference_fit(init, seqs, iters=3)
    for m_step in ("gradient", "closed_form"):
        pyro.clear_param_store()
        em = EM(categorical_hmm(init), m_step=m_step)
        for it in range(3):
            em.step(X, lengths)
            for name in ("start", "trans", "emit"):
                np.testing.assert_allclose(pyro.param(name).detach().numpy(), expected[it][name], atol=1e-8, rtol=0, err_msg=f"{m_step} {name}")


LEFT_RIGHT = {
    "start": torch.tensor([1.0, 0.0, 0.0, 0.0]),
    "trans": torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.7, 0.3, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]]),
    "emit": torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]]),
}


@pytest.mark.jit_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("param_space", ["simplex", "real"])
@pytest.mark.parametrize("path", ["fused", "traced"])
def test_left_right_hmm_zeros_stay_exactly_zero(path, param_space, dtype, monkeypatch):
    """hmmlearn's test_fit_left_right: a left-right chain's zero start and transition
    probabilities stay exactly zero, and the fit equals hmmlearn's."""
    if path == "traced":
        monkeypatch.setattr("pyro_em.planner.fuse_chain", lambda *args: None)
    torch.set_default_dtype(dtype)
    init = {k: v.to(dtype) for k, v in LEFT_RIGHT.items()}
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n in (12, 9, 15):
        z, xs = 0, []
        for _ in range(n):
            xs.append(int(torch.multinomial(init["emit"][z].double(), 1, generator=g)))
            z = int(torch.multinomial(init["trans"][z].double(), 1, generator=g))
        seqs.append(torch.tensor(xs))
    X, lengths = padded(seqs)
    em = EM(categorical_hmm(init, param_space), m_step="closed_form")
    expected = reference_fit({k: v.double() for k, v in init.items()}, seqs, iters=5)
    for it in range(5):
        em.step(X, lengths)
        assert (em.fused_chain is not None) == (path == "fused")
        for name in ("start", "trans"):
            ours = pyro.param(name).detach()
            assert bool((ours[init[name] == 0] == 0).all()), name
            atol = 1e-8 if dtype == torch.float64 else 1e-5
            np.testing.assert_allclose(ours.double().numpy(), expected[it][name], atol=atol, rtol=0, err_msg=name)


def weighted_mixture(data, weight=None):
    probs = pyro.param("probs", torch.ones(2) / 2, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", len(data)), poutine.scale(scale=1.0 if weight is None else weight):
        z = pyro.sample("z", dist.Categorical(probs), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z], s * s), obs=data)  # s takes the gradient M-step


@pytest.mark.parametrize("m_step", ["auto", "gradient"])
def test_per_datum_weights_equal_repeated_rows(m_step):
    """poutine.scale with a tensor over the data plate (pomegranate's sample_weight)."""
    g = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(6, generator=g) - 2, torch.randn(5, generator=g) + 2])
    weight = torch.tensor([1, 2, 3, 1, 1, 2, 1, 4, 1, 2, 1])
    runs = []
    for args in ((data, weight.double()), (data.repeat_interleave(weight),)):
        pyro.clear_param_store()
        em = EM(weighted_mixture, m_step=m_step)
        losses = [em.step(*args) for _ in range(4)]
        runs.append((losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(v, runs[1][1][k], atol=1e-10, rtol=0)
    torch.testing.assert_close(em.posterior(data, weight.double())["z"].sum(-1), torch.ones(len(data)))


def test_per_datum_weight_with_a_global_latent_is_an_error():
    def model(data, weight):
        z = pyro.sample("z", dist.Bernoulli(pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)))
        with pyro.plate("data", len(data)), poutine.scale(scale=weight):
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    with pytest.raises(ValueError, match="must share one poutine.scale, but .z. has 1, .x. has a tensor"):
        EM(config_enumerate(model)).step(torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_integer_counts_give_the_float_result(family):
    g = torch.Generator().manual_seed(0)
    counts = torch.cat([torch.poisson(torch.full((20,), 2.0), generator=g), torch.poisson(torch.full((20,), 9.0), generator=g)])
    counts = counts.clamp(max=12)

    @config_enumerate
    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            if family == "poisson":
                rate = pyro.param("rate", torch.tensor([1.0, 5.0]), constraint=constraints.positive)
                pyro.sample("x", dist.Poisson(rate[z]), obs=x)
            else:
                p = pyro.param("p", torch.tensor([0.3, 0.6]), constraint=constraints.unit_interval)
                pyro.sample("x", dist.Binomial(torch.tensor(12), p[z]), obs=x)

    results = []
    for x in (counts, counts.long()):
        pyro.clear_param_store()
        em = EM(model, m_step="closed_form")
        losses = [em.step(x) for _ in range(3)]
        results.append((losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}))
    assert results[0][0] == results[1][0]
    for k, v in results[0][1].items():
        assert torch.equal(v, results[1][1][k])


def test_float32_data_in_a_float64_model_equals_float64_data():
    g = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(8, generator=g) - 2, torch.randn(8, generator=g) + 2]).float()
    results = []
    for x in (data, data.double()):
        pyro.clear_param_store()
        em = EM(weighted_mixture)
        results.append([em.step(x) for _ in range(3)])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)


@pytest.mark.jit_only
def test_plan_groups_the_steps_of_a_chain():
    init = {"start": torch.ones(2) / 2, "trans": torch.full((2, 2), 0.5), "emit": torch.tensor([[0.7, 0.3], [0.2, 0.8]])}
    X = torch.randint(2, (1, 200), generator=torch.Generator().manual_seed(0))
    em, lengths = EM(categorical_hmm(init)), torch.tensor([200])
    em.step(X, lengths)
    text = str(em.plan)
    assert len(text.splitlines()) == 3 + 2  # three params, then how the steps run
    assert "CategoricalRule at 'z_{t}' for t in 1..199 (199 sites)" in text
    assert text.splitlines()[3:] == ["E-step: fused chain, forward-backward", "closed-form stage: Python (not captured yet)"]
    em.step(X, lengths)
    assert str(em.plan).splitlines()[-1].startswith("closed-form stage: captured graph (")


def _mixture_runs(models, data, steps=3):
    runs = []
    for model in models:
        pyro.clear_param_store()
        em = EM(model, m_step="closed_form")
        runs.append([em.step(data) for _ in range(steps)])
    return runs


def test_params_through_bijections_keep_the_closed_form():
    """softmax weights, a variance used through sqrt, a rate through exp: the same iterates as
    the plain spelling, in closed form."""
    g = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(10, generator=g) - 2, 0.5 * torch.randn(10, generator=g) + 2]).abs().round()

    @config_enumerate
    def plain(x):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        loc = pyro.param("loc", torch.tensor([0.5, 2.5]))
        s = pyro.param("s", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
        rate = pyro.param("rate", torch.tensor([1.0, 3.0]), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(loc[z], s[z]), obs=x)
            pyro.sample("n", dist.Poisson(rate[z]), obs=x)

    @config_enumerate
    def mapped(x):
        logits = pyro.param("logits", torch.tensor([0.3, 0.7]).log())
        loc = pyro.param("loc", torch.tensor([0.5, 2.5]))
        var = pyro.param("var", torch.tensor([1.0, 4.0]), constraint=constraints.positive)
        log_rate = pyro.param("log_rate", torch.tensor([1.0, 3.0]).log())
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(logits.softmax(-1)))
            pyro.sample("x", dist.Normal(loc[z], var.sqrt()[z]), obs=x)
            pyro.sample("n", dist.Poisson(log_rate.exp()[z]), obs=x)

    a, b = _mixture_runs([plain, mapped], data)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    var = pyro.param("var").detach().clone()
    _mixture_runs([plain], data)
    torch.testing.assert_close(var, pyro.param("s").detach() ** 2)


def test_discrete_hmm_with_log_of_simplex_params_is_baum_welch():
    """DiscreteHMM(start.log(), trans.log(), Categorical(emit)) with simplex params: closed
    form, equal to hmmlearn (whose first state is drawn from start: an identity first step)."""
    g = torch.Generator().manual_seed(0)
    K, M, S, T = 3, 4, 4, 30
    init = {k: torch.softmax(torch.randn(*shape, generator=g), -1) for k, shape in
            (("start", (K,)), ("trans", (K, K)), ("emit", (K, M)))}
    X = torch.randint(M, (S, T), generator=g)

    def model(X):
        start = pyro.param("start", init["start"].clone(), constraint=constraints.simplex)
        trans = pyro.param("trans", init["trans"].clone(), constraint=constraints.simplex)
        emit = pyro.param("emit", init["emit"].clone(), constraint=constraints.simplex)
        steps = torch.cat([torch.eye(K).log().expand(1, K, K), trans.log().expand(T - 1, K, K)])
        with pyro.plate("seqs", S):
            pyro.sample("x", dist.DiscreteHMM(start.log(), steps, dist.Categorical(emit)), obs=X)

    em = EM(model, m_step="closed_form")
    expected = reference_fit(init, list(X), iters=3)
    for it in range(3):
        em.step(X)
        for name in ("start", "trans", "emit"):
            np.testing.assert_allclose(pyro.param(name).detach().numpy(), expected[it][name], atol=1e-12, rtol=0)


def test_multinomial_emissions_closed_form():
    """Multinomial counts: expected counts are the weighted count vectors."""
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), 10, True, generator=g) for _ in range(8)]).reshape(8, 10)
    counts = torch.stack([torch.bincount(r, minlength=3) for r in X])  # integer counts

    @config_enumerate
    def model(c):
        w = pyro.param("w", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        probs = pyro.param("probs", torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]), constraint=constraints.simplex)
        with pyro.plate("data", len(c)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("c", dist.Multinomial(10, probs[z]), obs=c)

    em = EM(model, m_step="closed_form")
    em.step(counts)
    w0 = torch.tensor([0.5, 0.5])
    p0 = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    log_joint = w0.log() + (counts.double() @ p0.log().T)
    r = (log_joint - log_joint.logsumexp(-1, keepdim=True)).exp()
    expected = r.T @ counts.double()
    torch.testing.assert_close(pyro.param("probs").detach(), expected / expected.sum(-1, keepdim=True))


def test_weights_padded_with_a_constant_keep_their_loss():
    """``torch.cat([w, zeros])``: the last component's weight is a constant 0, not a slot of
    the param. Such a mixture is stepped by the traced path (a fused chain rebuilds its tables
    from param slots alone) and its loss is TraceEnum_ELBO's; the padded component stays empty."""
    from test_pyro_models import traceenum_loss

    data = torch.cat([torch.randn(30) - 2, torch.randn(30) + 2])

    @config_enumerate
    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0, 5.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.cat([w, torch.zeros(1)])))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    em = EM(model)
    for _ in range(3):
        expected = traceenum_loss(model, (data,), {}, 1)
        assert em.step(data) == pytest.approx(expected, rel=1e-12)
    assert em.fused_chain is None
    assert float(pyro.param("locs").detach()[2]) == 5.0
