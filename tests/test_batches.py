"""Streaming EM over batches equals full-batch EM; online (stepwise) EM reaches its optimum."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints
from torch.utils.data import DataLoader, TensorDataset

from pyro_em import EM, ConvergenceWarning, OnlineEM
from pyro_models import capture_history, cjs_1, gmm_tutorial, hmm_1, polyphonic
from test_errors import mixture


def _iterates(make_em, step, steps):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    em = make_em()
    out = []
    for _ in range(steps):
        loss = step(em)
        out.append((loss, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}))
    return out


def assert_same_iterates(model, full, batches, steps=4, tol=1e-8, **em_kwargs):
    """``steps`` EM steps on ``full`` (model arguments) and on ``batches`` give the same losses
    and params (``tol``), and the params move."""
    a = _iterates(lambda: EM(model, **em_kwargs), lambda em: em.step(*full), steps)
    b = _iterates(lambda: EM(model, **em_kwargs), lambda em: em.step_batches(batches), steps)
    for (la, pa), (lb, pb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-10, abs=1e-8)
        assert pa.keys() == pb.keys()
        for name in pa:
            assert torch.allclose(pa[name], pb[name], rtol=tol, atol=tol), name
    assert any(not torch.allclose(a[0][1][n], a[-1][1][n]) for n in a[0][1])


@pyro.infer.config_enumerate
def regression_mixture(t, x, K=3):
    """A mixture of linear regressions: intercepts and slopes take the gradient M-step, the
    weights and scales the closed form."""
    w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
    a = pyro.param("a", torch.linspace(-2.0, 2.0, K))
    b = pyro.param("b", torch.linspace(1.0, -1.0, K))
    s = pyro.param("s", torch.ones(K), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w))
        pyro.sample("x", dist.Normal(a[z] + b[z] * t, s[z]), obs=x)


def regression_data(N=600):
    t = torch.randn(N)
    z = torch.randint(3, (N,))
    x = torch.tensor([-2.0, 0.0, 2.0])[z] + torch.tensor([1.0, -1.0, 0.5])[z] * t + 0.3 * torch.randn(N)
    return t, x


def test_gradient_and_closed_form_params_over_batches_of_unequal_size():
    t, x = regression_data()
    assert_same_iterates(regression_mixture, (t, x), list(zip(t.split(250), x.split(250))))


def test_a_dataloader_is_a_re_iterable_of_batches():
    t, x = regression_data(300)
    loader = DataLoader(TensorDataset(t, x), batch_size=128)
    assert_same_iterates(regression_mixture, (t, x), loader, steps=2)


def test_map_priors_count_once_over_batches():
    """The GMM tutorial (Dirichlet weights, LogNormal scale, Normal locs under a components
    plate, all MAP sites): their prior densities belong to no batch."""
    data = torch.cat([torch.randn(40), torch.randn(30) + 6])
    assert_same_iterates(gmm_tutorial, (data,), [(d,) for d in data.split(25)], steps=3)


def test_pyro_hmm_example_over_batches_of_sequences():
    """examples/hmm.py model 1: Dirichlet and Beta priors (MAP, conjugate: closed form; their
    concentrations below 1 need the unconstrained MAP objective to be bounded),
    masks for lengths; batches have different maximal lengths, hence different sites."""
    sequences, lengths, args = polyphonic(num_sequences=8, max_length=9)
    batches = [(sequences[i : i + 3], lengths[i : i + 3], args) for i in range(0, 8, 3)]
    assert_same_iterates(hmm_1, (sequences, lengths, args), batches, steps=3, map_space="unconstrained")


def test_capture_recapture_over_batches_of_animals():
    """examples/capture_recapture/cjs.py model 1: survival and recapture MAP sites with
    Uniform priors take the gradient M-step, summed over batches. The model computes
    ``mask.float() * phi`` in float32 (a 0-dim float64 param does not promote a float32
    tensor), so Q's gradient in phi sums float32 round-off in an order that depends on the
    batches: 1e-6, not 1e-8."""
    history, sex = capture_history(N=30, T=5)
    batches = [(h, sex) for h in history.split(11)]
    assert_same_iterates(cjs_1, (history, sex), batches, steps=2, tol=1e-6)


def test_discrete_hmm_over_a_dataloader():
    K, M, S, T = 3, 4, 10, 20
    X = torch.randint(M, (S, T))
    emit0 = torch.rand(K, M) + 0.5

    def model(X):
        start = pyro.param("start", torch.ones(K) / K, constraint=constraints.simplex)
        trans = pyro.param("trans", torch.full((K, K), 0.1) + 0.7 * torch.eye(K), constraint=constraints.simplex)
        emit = pyro.param("emit", emit0, constraint=constraints.simplex)
        with pyro.plate("seqs", X.shape[0]):
            pyro.sample("x", dist.DiscreteHMM(start.log(), trans.log(), dist.Categorical(emit)), obs=X)

    assert_same_iterates(model, (X,), DataLoader(TensorDataset(X), batch_size=4), steps=3)


def test_batches_must_be_re_iterable_and_not_empty():
    t, x = regression_data(100)
    em = EM(regression_mixture)
    with pytest.raises(ValueError, match="re-iterable"):
        em.step_batches(iter([(t, x)]))
    with pytest.raises(ValueError, match="empty"):
        em.step_batches([])
    with pytest.raises(TypeError, match="split"):
        em.step_batches(x)
    store = pyro.get_param_store()
    assert "w" not in store  # the failed steps left nothing behind


def test_fit_batches_logs_each_iteration(caplog):
    t, x = regression_data(200)
    em = EM(regression_mixture)
    with caplog.at_level(logging.INFO, logger="pyro_em"), pytest.warns(ConvergenceWarning):
        result = em.fit_batches([(t[:120], x[:120]), (t[120:], x[120:])], max_iter=3, tol=0)
    lines = [r.getMessage() for r in caplog.records if "iteration" in r.getMessage()]
    assert len(lines) == result.n_iter == 3
    assert "data points/s" in lines[0] and f"loss {result.losses[0]:.10g}" in lines[0]


def test_online_em_reaches_the_batch_optimum():
    """Stepwise EM with (t + 2)^-0.7 steps over shuffled batches ends within 1e-3 nats per
    datum of batch EM's optimum on a Gaussian mixture."""
    N = 3000
    data = torch.cat([torch.randn(N // 2) * 0.5 - 2, torch.randn(N // 2) + 2])

    @pyro.infer.config_enumerate
    def model(x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-0.5, 0.5]))
        scales = pyro.param("scales", torch.ones(2), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=x)

    em = EM(model)
    em.fit(data, max_iter=500, tol=1e-12)
    best = em.log_likelihood(data) / N
    pyro.clear_param_store()
    online = OnlineEM(model, decay=0.7)
    loader = DataLoader(TensorDataset(data), batch_size=100, shuffle=True)
    with pytest.warns(ConvergenceWarning):  # tol=0: all three epochs
        online.fit_batches(loader, max_iter=3, tol=0)
    assert online.n_steps == 3 * N // 100
    reached = online.log_likelihood(data) / N
    assert best - 1e-3 < reached <= best + 1e-9


def test_online_em_needs_closed_forms():
    t, x = regression_data(100)
    em = OnlineEM(regression_mixture)
    with pytest.raises(ValueError, match="param 'a' has no closed-form update"):
        em.step(t, x)
    with pytest.raises(ValueError, match="decay"):
        OnlineEM(regression_mixture, decay=0.5)


def test_online_em_on_a_subsampling_plate():
    """``pyro.plate("data", N, subsample_size=B)``: each step draws its own batch, scaled by
    N / B, so the loss and the statistics estimate the whole data's."""
    N = 2000
    data = torch.cat([torch.randn(N // 2) - 3, torch.randn(N // 2) + 3])

    @pyro.infer.config_enumerate
    def model(x, batch_size=None):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-0.5, 0.5]))
        with pyro.plate("data", len(x), subsample_size=batch_size) as idx:
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x[idx])

    em = OnlineEM(model, decay=0.8)
    losses = [em.step(data, batch_size=100) for _ in range(200)]
    assert torch.allclose(pyro.param("locs").detach(), torch.tensor([-3.0, 3.0]), atol=0.15)
    assert losses[-1] == pytest.approx(em.evaluate_loss(data), rel=0.1)  # scaled to all of the data
    with pytest.raises(ValueError, match="OnlineEM"):
        EM(model).step(data, batch_size=100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_and_online_on_device_and_dtype(device, dtype):
    data = torch.cat([torch.randn(300, 2) - 2, torch.randn(200, 2) + 2]).to(device, dtype)

    @pyro.infer.config_enumerate
    def model(x):
        w = pyro.param("w", torch.ones(2, device=x.device, dtype=x.dtype) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[-1.0, 0.0], [1.0, 0.0]], device=x.device, dtype=x.dtype))
        L = pyro.param("L", torch.eye(2, device=x.device, dtype=x.dtype).expand(2, 2, 2).clone(),
                       constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=x)

    tol = 1e-4 if dtype == torch.float32 else 1e-8
    full = _iterates(lambda: EM(model), lambda em: em.step(data), 3)
    streamed = _iterates(lambda: EM(model), lambda em: em.step_batches(data.split(128)), 3)
    for (_, a), (_, b) in zip(full, streamed):
        for name in a:
            assert a[name].device.type == device.type and a[name].dtype == dtype
            assert torch.allclose(a[name], b[name], rtol=tol, atol=tol), name
    pyro.clear_param_store()
    online = OnlineEM(model)
    online.step_batches(data[torch.randperm(len(data), device=device)].split(50))
    assert pyro.param("locs").device.type == device.type


class _FreshBatches:
    """New tensors at every pass, as a DataLoader gives."""

    def __init__(self, *tensors, size):
        self.tensors, self.size = tensors, size

    def __iter__(self):
        for parts in zip(*(t.split(self.size) for t in self.tensors)):
            yield tuple(p.clone() for p in parts)


@pytest.mark.jit_only
def test_batches_of_one_signature_share_a_plan_unless_it_is_tied_to_the_data(monkeypatch):
    """A mixture's plan serves every batch of its shapes (planned once, not at every pass);
    a param indexed by the data (a mean per component and group, the group given with the
    batch) ties the plan to its batch, which is planned anew, and streaming still equals full
    batch."""
    import pyro_em.planner

    plans = []
    original = pyro_em.planner.analysis_traces
    monkeypatch.setattr(pyro_em.planner, "analysis_traces", lambda *a, **k: plans.append(1) or original(*a, **k))
    t, x = regression_data(400)
    em = EM(regression_mixture)
    for _ in range(2):
        em.step_batches(_FreshBatches(t, x, size=100))
    assert len(plans) == 1
    # A plain mixture steps as a fused one-step chain (which holds its batch's data); its model
    # plan still serves the other batches, by the traced path.
    plans.clear()
    pyro.clear_param_store()
    em = EM(mixture)
    em.step(x)
    assert em.fused_chain is not None
    plans.clear()
    for _ in range(2):
        em.step_batches(_FreshBatches(x, size=100))
    assert not plans  # the whole data's plan serves its batches too

    group = torch.randint(4, (400,))

    @pyro.infer.config_enumerate
    def grouped(g, x):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[-1.0], [1.0]]) + torch.linspace(0, 1, 4))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z, g], 1.0), obs=x)

    plans.clear()
    assert_same_iterates(grouped, (group, x), _FreshBatches(group, x, size=100), steps=2)
    assert len(plans) > 2 * 4
