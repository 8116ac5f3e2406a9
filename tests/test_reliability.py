"""Bad input, degenerate data and odd models: a clear error naming the culprit, or the right
answer; never a silent stall, never a raw error from inside torch or Pyro."""

import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoDelta
from torch.distributions import constraints

from pyro_em import EM, ConvergenceWarning, MStepWarning


from test_errors import mixture


def two_state_hmm(X):
    start = pyro.param("start", torch.ones(2) / 2, constraint=constraints.simplex)
    trans = pyro.param("trans", torch.tensor([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex)
    emit = pyro.param("emit", torch.tensor([[0.9, 0.1], [0.2, 0.8]]), constraint=constraints.simplex)
    with pyro.plate("seqs", X.shape[0]):
        z = None
        for t in pyro.markov(range(X.shape[1])):
            z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
            pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])


def store():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


# ---- 1. the gradient M-step hides nothing -------------------------------------------------


def test_rejected_trial_points_do_not_stall_the_gradient_m_step():
    """A real-valued scale: Normal rejects every trial point below zero. The fit still reaches
    the maximum-likelihood scale (0.001 here), where a stalled line search once stopped at 0.09."""
    data = 0.001 * torch.randn(40, generator=torch.Generator().manual_seed(0))

    def model(data):
        loc = pyro.param("loc", torch.tensor(0.5))
        s = pyro.param("s", torch.tensor(1.0))  # no constraint
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(loc, s), obs=data)

    result = EM(model, m_step="gradient").fit(data, max_iter=50, tol=1e-12)
    assert result.converged
    assert pyro.param("s").item() == pytest.approx(data.std(unbiased=False).item(), rel=1e-6)
    assert pyro.param("loc").item() == pytest.approx(data.mean().item(), abs=1e-9)


def test_a_stalled_m_step_is_visible_and_not_convergence():
    """A model that rejects every value but the one it starts from: the step changes nothing,
    says so, and fit does not call that convergence."""

    def model(data):
        loc = pyro.param("loc", torch.tensor(0.0))
        if loc.item() != 0.0:
            raise ValueError("loc must stay 0")
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(2 * loc, 1.0), obs=data)  # 2 * loc: the gradient M-step

    em = EM(model)
    with pytest.warns(MStepWarning, match="'loc'"), pytest.warns(ConvergenceWarning, match="without converging"):
        result = em.fit(torch.full((5,), 3.0), max_iter=5)
    assert not result.converged
    assert em.stalled == ["loc"]


@pytest.mark.parametrize("n", [1, 3])
def test_collapse_under_the_gradient_m_step_is_a_clear_error(n):
    @config_enumerate
    def model(data):
        w = pyro.param("w", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        s = pyro.param("s", torch.tensor([1.0, 1.0]), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], s[z]), obs=data)

    em = EM(model, m_step="gradient")
    data = torch.tensor([0.3, 0.5, 2.0])[:n]
    with pytest.raises(ValueError, match="found no maximum: param 's' \\(slot\\(s\\) \\[1\\]\\).*reg_covar"):
        for _ in range(30):
            em.step(data)
            before = store()
    after = store()
    for k in after:  # the failed step left the store as it was
        assert torch.equal(after[k], before[k])


# ---- 2-5. models that cannot be fitted say so --------------------------------------------------


def test_subsampled_plate_is_refused():
    def model(data):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(data), subsample_size=4) as idx:
            pyro.sample("x", dist.Normal(loc, 1.0), obs=data[idx])

    with pytest.raises(ValueError, match="Plate 'data' subsamples 4 of 10"):
        EM(model).step(torch.zeros(10))


def test_structure_that_depends_on_params_is_refused():
    def model(data):
        locs = pyro.param("locs", torch.tensor([0.0, 0.5]))
        n = 3 if locs[0] < 1 else 5
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z.long()], 1.0), obs=data[:n])

    em, data = EM(model), torch.full((6,), 3.0)
    em.step(data)
    with pytest.raises(RuntimeError, match="structure changed between EM steps.*site 'z'"):
        em.step(data)


def test_a_guide_is_not_a_model():
    def guide(data):
        loc = pyro.param("loc_q", torch.tensor(0.0))
        pyro.sample("loc", dist.Delta(loc))

    with pytest.raises(ValueError, match="no observed site.*guide"):
        EM(guide).step(torch.zeros(3))
    with pytest.raises(TypeError, match="without a guide"):
        EM(mixture, guide)
    with pytest.raises(TypeError, match="without a guide"):
        EM(mixture, guide=guide)
    with pytest.raises(TypeError, match="without a guide"):
        EM(AutoDelta(mixture))
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) 'optimizer'"):
        EM(mixture, optimizer=None)


def test_data_contradicting_a_structural_zero_is_an_error():
    @config_enumerate
    def model(data):
        w = pyro.param("w", torch.tensor([0.5, 0.5, 0.0]), constraint=constraints.simplex)
        emit = pyro.param("emit", torch.tensor([[0.5, 0.5, 0.0], [0.3, 0.7, 0.0], [0.2, 0.2, 0.6]]), constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Categorical(emit[z]), obs=data)

    with pytest.raises(ValueError, match="-inf.*'x'.*exactly 0 stays 0"):
        EM(model).step(torch.tensor([0, 1, 2, 1]))


# ---- 6-7. what users pass ---------------------------------------------------------------------


def test_numpy_data_work_as_tensors():
    data = np.array([-1.5, -0.5, 0.7, 1.9])
    losses = [EM(mixture).step(data)]
    pyro.clear_param_store()
    losses.append(EM(mixture).step(torch.as_tensor(data)))
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    "data, match",
    [
        ([0.0, 1.0], "raised AttributeError after site 'x'.*pass data as torch tensors"),
        (torch.zeros(0), "ZeroDivisionError.*plate has size 0"),
    ],
)
def test_raw_errors_from_the_model_are_explained(data, match):
    with pytest.raises(ValueError, match=match):
        EM(mixture).step(data)


@pytest.mark.parametrize("validate", [True, False])
def test_value_outside_the_support_names_index_and_value(validate):
    @config_enumerate
    def model(data):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        emit = pyro.param("emit", torch.ones(2, 3) / 3, constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Categorical(emit[z]), obs=data)

    data = torch.tensor([0, 1, 7, 2] + [1] * 500)
    pyro.enable_validation(validate)
    try:
        with pytest.raises(ValueError, match=r"Site 'x' has the value 7 at index \(2,\), outside the support") as info:
            EM(model).step(data)
    finally:
        pyro.enable_validation(True)
    assert len(str(info.value)) < 400  # not the whole data tensor


def test_prior_that_cannot_be_sampled_asks_for_an_init_value():
    def model(data):
        m = pyro.sample("m", dist.ImproperUniform(constraints.real, (), ()))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(m, 1.0), obs=data)

    with pytest.raises(ValueError, match="site 'm' could not be initialized.*init_to_value"):
        EM(model).step(torch.zeros(3))


def test_fit_takes_any_number_type_and_no_stderr(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)
    result = EM(mixture).fit(torch.tensor([-1.0, 1.0, 1.2]), max_iter=np.int64(500), tol=np.float32(1e-4), progress=True)
    assert result.converged


# ---- 8-10. state and numerics -------------------------------------------------------------------


@pytest.mark.jit_only
def test_fused_chain_survives_a_cleared_param_store():
    X = torch.randint(2, (3, 6), generator=torch.Generator().manual_seed(0))
    em = EM(two_state_hmm)
    first = [em.step(X) for _ in range(2)]
    assert em.fused_chain is not None
    pyro.clear_param_store()
    assert [em.step(X) for _ in range(2)] == first


@pytest.mark.parametrize("kind", ["full", "diag", "scalar"])
def test_collapse_in_closed_form_names_param_slot_and_reg_covar(kind):
    data = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 1.0], [5.0, -2.0], [4.0, 0.5]])

    @config_enumerate
    def model(data):
        w = pyro.param("w", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            if kind == "full":
                L = pyro.param("scale_tril", torch.eye(2).expand(2, 2, 2).clone() * 0.05, constraint=constraints.lower_cholesky)
                pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=data)
            elif kind == "diag":
                s = pyro.param("scales", torch.full((2, 2), 0.05), constraint=constraints.positive)
                pyro.sample("x", dist.Normal(locs[z], s[z]).to_event(1), obs=data)
            else:
                s = pyro.param("scales", torch.full((2,), 0.05), constraint=constraints.positive)
                pyro.sample("x", dist.Normal(locs[z, 0], s[z]), obs=data[:, 0])

    name = "scale_tril" if kind == "full" else "scales"
    with pytest.raises(ValueError, match=f"param '{name}' collapsed at slot\\(s\\) \\[0.*reg_covar"):
        EM(model).step(data)
    EM(model, reg_covar=1e-6).step(data)  # the advertised fix works


def test_overflow_is_called_overflow():
    with pytest.raises(ValueError, match="site 'x' overflowed.*1e\\+200.*Rescale"):
        EM(mixture).step(torch.tensor([1e200, 0.0]))


def test_a_latent_with_many_categories_pools_without_a_one_hot():
    K = 100_000

    def model(data):
        probs = pyro.param("probs", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.linspace(-5, 5, K))
        z = pyro.sample("z", dist.Categorical(probs), infer={"enumerate": "parallel"})
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

    em = EM(model)
    losses = [em.step(torch.randn(10, generator=torch.Generator().manual_seed(0))) for _ in range(2)]
    assert losses[1] <= losses[0]
    torch.testing.assert_close(pyro.param("probs").sum(), torch.tensor(1.0))


# ---- 12. planning costs no more memory than a step -------------------------------------------


def test_planning_computes_no_log_density_under_autograd(monkeypatch):
    """The first step of a DiscreteHMM model once ran Pyro's parallel-scan log_prob under
    autograd to plan (14.8 GiB at K=64, 100 x 1000): planning now reads shapes and the
    distributions' tensors only."""
    calls = []
    original = dist.DiscreteHMM.log_prob

    def spy(self, value):
        calls.append(torch.is_grad_enabled())
        return original(self, value)

    monkeypatch.setattr(dist.DiscreteHMM, "log_prob", spy)
    K, T = 3, 20

    def model(X):
        start = pyro.param("start", torch.ones(K) / K, constraint=constraints.simplex)
        trans = pyro.param("trans", torch.full((K, K), 1.0 / K) + 0.1 * torch.eye(K), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.arange(K) * 1.0)
        with pyro.plate("seqs", X.shape[0]):
            pyro.sample("x", dist.DiscreteHMM(start.log(), trans.log(), dist.Normal(locs, 1.0)), obs=X)

    EM(model).step(torch.randn(4, T))
    assert not any(calls)


@pytest.mark.jit_only
def test_a_markov_chain_is_fused_from_its_first_step(monkeypatch):
    """The plan comes first, so a recognized pyro.markov chain never takes the traced E-step
    (whose memory grows with every time step's factors)."""
    calls = []
    monkeypatch.setattr("pyro_em.planner.e_step", lambda *a, **k: calls.append(1) / 0)

    em = EM(two_state_hmm)
    em.step(torch.randint(2, (3, 50), generator=torch.Generator().manual_seed(0)))
    assert em.fused_chain is not None and not calls
