"""MAP-EM: continuous global latents of a model written for SVI + AutoDelta + TraceEnum_ELBO."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_value

from pyro_em import EM

K, ALPHA, TAU, SIGMA = 2, 3.0, 4.0, 0.8


@config_enumerate
def model(data):
    """The Pyro GMM tutorial's model, with a fixed component scale."""
    weights = pyro.sample("weights", dist.Dirichlet(ALPHA * torch.ones(K)))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, TAU))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], SIGMA), obs=data)


DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0, -0.5, 9.5], dtype=torch.float64)
INIT = {
    "weights": torch.tensor([0.4, 0.6], dtype=torch.float64),
    "locs": torch.tensor([0.5, 8.0], dtype=torch.float64),
}


def test_one_step_is_the_closed_form_map_update():
    em = EM(model, init_loc_fn=init_to_value(values=INIT))
    w0, m0 = INIT["weights"], INIT["locs"]
    log_joint = w0.log() + dist.Normal(m0, SIGMA).log_prob(DATA[:, None])
    r = (log_joint - log_joint.logsumexp(-1, keepdim=True)).exp()
    nk = r.sum(0)
    # Dirichlet mode with pseudo-counts; Normal-Normal posterior mode.
    weights = (nk + ALPHA - 1) / (len(DATA) + K * ALPHA - K)
    locs = ((r * DATA[:, None]).sum(0) / SIGMA**2) / (nk / SIGMA**2 + 1 / TAU**2)
    log_prior = dist.Dirichlet(ALPHA * torch.ones(K)).log_prob(w0) + dist.Normal(0, TAU).log_prob(m0).sum()

    loss = em.step(DATA)
    assert loss == pytest.approx(-(log_joint.logsumexp(-1).sum() + log_prior).item(), rel=1e-12)
    store = pyro.get_param_store()
    torch.testing.assert_close(store["AutoDelta.weights"], weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(store["AutoDelta.locs"], locs, atol=1e-6, rtol=0)


def test_loss_equals_traceenum_elbo_with_autodelta_guide():
    """With a point-mass guide, TraceEnum_ELBO's loss is exactly the MAP-EM loss."""
    em = EM(model, init_loc_fn=init_to_value(values=INIT))
    em.fit(DATA, max_iter=5)
    guide = AutoDelta(poutine.block(model, expose=["weights", "locs"]))
    elbo = TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, DATA)
    # The guide reads the values EM left in the param store.
    torch.testing.assert_close(guide.median()["locs"], pyro.param("AutoDelta.locs"))
    assert em.evaluate_loss(DATA) == pytest.approx(elbo, rel=1e-10)


def test_map_em_fits_and_fitted_model_exposes_point_values():
    em = EM(model)  # default init_to_median
    result = em.fit(DATA, max_iter=200, tol=1e-12)
    assert result.converged
    locs = pyro.param("AutoDelta.locs").detach().sort().values
    assert locs[0] == pytest.approx(DATA[DATA < 5].mean().item(), abs=0.2)
    assert locs[1] == pytest.approx(DATA[DATA > 5].mean().item(), abs=0.2)
    trace = poutine.trace(em.fitted_model).get_trace(DATA)
    assert torch.equal(trace.nodes["locs"]["value"], pyro.param("AutoDelta.locs"))
