"""The SVI-shaped API: step / evaluate_loss / fit / posterior, devices, dtypes, infer_discrete."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate, infer_discrete
from pyro import poutine
from torch.distributions import constraints

from pyro_em import EM, ConvergenceWarning


def mixture(data):
    w = pyro.param("w", torch.ones(2, dtype=data.dtype, device=data.device) / 2, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=data.dtype, device=data.device))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(w))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


def make_data(n=200, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(n // 2, generator=g) - 2.5, torch.randn(n - n // 2, generator=g) + 2.0])
    return x.to(dtype=dtype, device=device)


def test_step_returns_the_loss_before_the_update(device):
    data = make_data(device=device)
    em = EM(mixture)
    before = em.evaluate_loss(data)
    # (A mixture steps as a fused one-step chain: the same sum, in another order.)
    assert em.step(data) == pytest.approx(before, rel=1e-13)
    assert em.evaluate_loss(data) < before
    assert pyro.param("locs").device.type == device.type


def test_evaluate_loss_does_not_update():
    data = make_data()
    em = EM(mixture)
    em.evaluate_loss(data)
    locs = pyro.param("locs").detach().clone()
    em.evaluate_loss(data)
    assert torch.equal(locs, pyro.param("locs"))


def test_fit_converges_and_reports():
    data = make_data()
    result = EM(mixture).fit(data, max_iter=500, tol=1e-10)
    assert result.converged and 1 < result.n_iter < 500
    assert result.loss == result.losses[-1]
    torch.testing.assert_close(pyro.param("locs").detach(), torch.tensor([-2.5, 2.0]), atol=0.3, rtol=0)


def test_fit_warns_on_max_iter():
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        result = EM(mixture).fit(make_data(), max_iter=2, tol=0)
    assert result.n_iter == 2 and not result.converged


def test_fit_callback_can_stop_and_progress_bar_shows_loss(capsys):
    seen = []
    result = EM(mixture).fit(make_data(), max_iter=50, tol=0, progress=True,
                             callback=lambda i, loss: seen.append((i, loss)) or i == 2)
    assert [i for i, _ in seen] == [0, 1, 2] and result.n_iter == 3
    assert [loss for _, loss in seen] == result.losses
    assert "loss=" in capsys.readouterr().err


def test_float32_matches_float64():
    losses = {}
    for dtype in (torch.float32, torch.float64):
        pyro.clear_param_store()
        data = make_data(dtype=dtype)
        em = EM(mixture)
        for _ in range(5):
            em.step(data)
        losses[dtype] = em.evaluate_loss(data)
        assert pyro.param("locs").dtype == dtype
        assert em.posterior(data)["z"].dtype == dtype
    assert losses[torch.float32] == pytest.approx(losses[torch.float64], rel=1e-5)


def test_infer_discrete_gives_map_assignments():
    data = make_data()
    em = EM(mixture)
    em.fit(data, max_iter=20, tol=1e-8)
    decoder = infer_discrete(config_enumerate(em.fitted_model), temperature=0, first_available_dim=-2)
    z = poutine.trace(decoder).get_trace(data).nodes["z"]["value"]
    assert torch.equal(z, em.posterior(data)["z"].argmax(-1))


def test_user_optimizer_runs_generalized_em():
    data = make_data()
    em = EM(mixture, optim=pyro.optim.Adam({"lr": 0.05}), num_steps=5)
    start = em.evaluate_loss(data)
    losses = [em.step(data) for _ in range(20)]
    assert losses[0] == pytest.approx(start, rel=1e-13) and em.evaluate_loss(data) < start - 1.0


def test_obs_mask_missing_discrete_observations_are_summed_out():
    """A discrete observation missing in some rows (obs_mask) becomes an enumerated latent."""
    a_data = torch.tensor([0, 1, 1, 0, 1, 1])
    b_data = torch.tensor([1, 0, 1, 1, 0, 0])
    observed = torch.tensor([True, True, False, True, False, True])
    pa, cpt = torch.tensor([0.3, 0.7]), torch.tensor([[0.8, 0.2], [0.4, 0.6]])

    def model():
        pyro.param("cpt", cpt, constraint=constraints.simplex)
        with pyro.plate("rows", len(a_data)):
            a = pyro.sample("a", dist.Categorical(pa), obs=a_data)
            pyro.sample("b", dist.Categorical(pyro.param("cpt")[a]), obs=b_data, obs_mask=observed)

    expected = pa.log()[a_data].sum() + cpt.log()[a_data, b_data][observed].sum()
    em = EM(model)
    assert em.evaluate_loss() == pytest.approx(-expected.item(), rel=1e-12)
    # The missing b's posterior is its conditional given a; where b was observed, it is absent.
    post = em.posterior()["b_unobserved"]
    torch.testing.assert_close(post[~observed], cpt[a_data][~observed])
    assert not bool(post[observed].any())


def test_progress_bar_ends_complete_at_convergence(capsys):
    result = EM(mixture).fit(make_data(), max_iter=500, tol=1e-6, progress=True)
    assert result.converged and result.n_iter < 500
    err = capsys.readouterr().err
    final = err.strip().split("\r")[-1]
    assert f"{result.n_iter}/{result.n_iter}" in final and "100%" in final
    assert "rel_change=" in final
