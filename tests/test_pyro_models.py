"""Models written the way Pyro's examples and tutorials write them (see ``pyro_models.py``):
the loss equals TraceEnum_ELBO with an AutoDelta guide at the same params, ten EM steps never
increase it, and a MAP objective without a maximum either runs in unconstrained coordinates or
stops with an error naming the site."""

import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta

import pyro_models as M
from pyro_em import EM
from test_hmm import assert_fused_equals_traced


def traceenum_loss(model, args, kwargs, max_plate_nesting):
    """TraceEnum_ELBO's loss with an AutoDelta guide over the MAP sites EM estimated, reading
    the values EM left in the param store."""
    names = [k[len("AutoDelta.") :] for k in pyro.get_param_store().keys() if k.startswith("AutoDelta.")]
    guide = AutoDelta(poutine.block(model, expose=names)) if names else (lambda *a, **k: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pyro's own notes on guides without enumerated sites
        return TraceEnum_ELBO(max_plate_nesting=max_plate_nesting).loss(model, guide, *args, **kwargs)


def _cases():
    seq, lengths, args = M.polyphonic()
    yield "hmm_0", M.hmm_0, (seq, lengths, args), 1
    yield "hmm_1", M.hmm_1, (seq, lengths, args), 2
    yield "hmm_2", M.hmm_2, (seq, lengths, args), 2
    yield "hmm_3", M.hmm_3, (seq, lengths, args), 2
    yield "hmm_4", M.hmm_4, (seq, lengths, args), 2
    yield "hmm_6", M.hmm_6, (seq, lengths, args), 2
    yield "hmm_7", M.neural_hmms(seq.shape[-1], args)[1], (seq, lengths, args), 1
    yield "cjs_1", M.cjs_1, M.capture_history(), 1
    yield "cjs_2", M.cjs_2, M.capture_history(), 1
    yield "gmm_tutorial", M.gmm_tutorial, (M.GMM_DATA.float(),), 1  # float32 data, float64 params
    yield "enumeration_hmm", M.enumeration_hmm, (torch.tensor([0, 1, 2, 3, 1, 0, 2, 2, 3, 1]), 4), 1
    yield "gmm_params", M.gmm_params, (M.GMM_DATA,), 1
    mixed = torch.randn(40, generator=torch.Generator().manual_seed(0)) + torch.arange(40) % 2 * 2 - 1
    yield "gmm_batch", M.gmm_batch, (mixed,), 1
    yield "param_hmm", M.param_hmm, (torch.tensor([0, 1, 2, 3, 1, 0, 2, 2, 3, 1]),), 0
    yield "lda", M.lda, M.lda_data(), 2
    data = torch.randn(15, 2, generator=torch.Generator().manual_seed(0)) + torch.arange(3.0).repeat(5)[:, None] * 3
    yield "masked_mixture", M.masked_mixture, (data,), 1


PRIOR_SWITCH = ("hmm_0", "hmm_1", "hmm_2", "hmm_3", "hmm_4", "hmm_7")  # examples/hmm.py's include_prior
VARIANTS = [
    (case[0], include_prior)
    for case in _cases()
    for include_prior in ((True, False) if case[0] in PRIOR_SWITCH else (None,))
]


@pytest.mark.parametrize("map_space", ["constrained", "unconstrained"])
@pytest.mark.parametrize("name,include_prior", VARIANTS)
def test_pyro_model_runs_exactly(name, include_prior, map_space):
    # Made inside the test, under the float64 default the suite runs with.
    model, args, nest = next(case[1:] for case in _cases() if case[0] == name)
    kwargs = {} if include_prior is None else {"include_prior": include_prior}
    em = EM(model, map_space=map_space, max_plate_nesting=nest)
    try:
        losses = [em.step(*args, **kwargs) for _ in range(10)]
    except ValueError as e:
        # Only the constrained MAP objective of a prior with concentration < 1 may be unbounded.
        assert map_space == "constrained" and include_prior is not False
        assert "has no maximum" in str(e) and "map_space='unconstrained'" in str(e)
        return
    for before, after in zip(losses, losses[1:]):
        assert after <= before + 1e-10 * abs(before)
    # The loss a step returns (by a fused chain where EM recognized one) is TraceEnum_ELBO's
    # at the params the step started from.
    if map_space == "constrained":
        expected = traceenum_loss(model, args, kwargs, nest)
        assert em.step(*args, **kwargs) == pytest.approx(expected, rel=1e-9)
    # The loss (the constrained MAP objective) equals TraceEnum_ELBO's at the fitted params.
    loss = EM(model, max_plate_nesting=nest).evaluate_loss(*args, **kwargs)
    assert loss == pytest.approx(traceenum_loss(model, args, kwargs, nest), rel=1e-9)


@pytest.mark.jit_only
@pytest.mark.parametrize("name,include_prior", [("hmm_1", True), ("hmm_1", False), ("enumeration_hmm", None)])
def test_fused_chain_equals_the_traced_path(name, include_prior, monkeypatch):
    """examples/hmm.py's model 1 (a tones plate under each step, Dirichlet and Beta MAP priors
    switched by include_prior, sequences that end) and the enumeration tutorial's HMM (MAP
    priors in a plate of their own, one unplated sequence) step as one fused DiscreteHMM,
    without tracing the model; losses and iterates equal the general traced path's."""
    model, args, nest = next(case[1:] for case in _cases() if case[0] == name)
    kwargs = {} if include_prior is None else {"include_prior": include_prior}
    assert_fused_equals_traced(model, args, monkeypatch, kwargs=kwargs, m_step="auto", map_space="unconstrained",
                               max_plate_nesting=nest)


def test_unbounded_map_objective_is_an_error_that_writes_nothing():
    seq, lengths, args = M.polyphonic()
    em = EM(M.hmm_1, max_plate_nesting=2)
    em.evaluate_loss(seq, lengths, args)  # creates the params
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(ValueError, match="site 'probs_(x|y)'.*(Dirichlet|Beta) prior.*map_space='unconstrained'"):
        for _ in range(10):
            em.step(seq, lengths, args)
            before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k])


def test_unconstrained_map_is_closed_form_and_equals_the_gradient_m_step():
    """Dirichlet and Beta priors with concentration < 1, unconstrained coordinates: the closed
    form (pseudo-counts alpha, not alpha - 1) equals the gradient M-step of the same objective."""
    from pyro.infer.autoguide.initialization import init_to_mean

    seq, lengths, args = M.polyphonic()
    values = {}
    for m_step in ("auto", "gradient"):
        pyro.clear_param_store()
        em = EM(M.hmm_1, m_step=m_step, map_space="unconstrained", init_loc_fn=init_to_mean, max_plate_nesting=2)
        for _ in range(2):
            em.step(seq, lengths, args)
        if m_step == "auto":
            assert not em.plan.gradient
        values[m_step] = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    for k in values["auto"]:
        torch.testing.assert_close(values["auto"][k], values["gradient"][k], atol=1e-9, rtol=0)


def test_unconstrained_beta_mode_is_pseudo_counts_plus_one():
    """Beta(a, b) prior on a Bernoulli probability: the mode of the logit's density is
    (successes + a) / (n + a + b)."""
    data = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    a, b = 0.3, 0.6

    def model(data):
        p = pyro.sample("p", pyro.distributions.Beta(a, b))
        with pyro.plate("data", len(data)):
            pyro.sample("x", pyro.distributions.Bernoulli(p), obs=data)

    EM(model, map_space="unconstrained").step(data)
    assert pyro.param("AutoDelta.p").item() == pytest.approx((3 + a) / (7 + a + b), abs=1e-12)


@pytest.mark.slow
def test_mixed_hmm():
    """examples/mixed_hmm: discrete random effects at two plate levels, a masked individual
    plate, zero-inflated Gamma and Beta observations through MaskedMixture, VonMises angles;
    most params take the gradient M-step (about 3.5 s a step here: L-BFGS re-runs the model)."""
    config = M.mixed_hmm_config(N_s=2, N_t=4)
    em = EM(M.mixed_hmm, max_plate_nesting=2)
    losses = [em.step(config) for _ in range(10)]
    for before, after in zip(losses, losses[1:]):
        assert after <= before + 1e-10 * abs(before)
    assert em.plan.closed_form and em.plan.gradient
    assert em.evaluate_loss(config) == pytest.approx(traceenum_loss(M.mixed_hmm, (config,), {}, 2), rel=1e-9)


def test_unbounded_map_objective_on_the_gradient_path():
    """A Beta(0.1, 0.9) MAP site reaching the likelihood through a computation: all-zero data
    drive it onto 0, where the prior density is infinite. Constrained: the clear error, and the
    param created in the step is gone again. Unconstrained: the bounded mode, found exactly."""

    def model(data):
        p = pyro.sample("p", pyro.distributions.Beta(0.1, 0.9))
        with pyro.plate("data", len(data)):
            pyro.sample("x", pyro.distributions.Bernoulli(0.5 * p), obs=data)

    data = torch.zeros(5)
    with pytest.raises(ValueError, match="site 'p' \\(param 'AutoDelta.p'\\) has no maximum: its Beta prior"):
        EM(model).step(data)
    assert "AutoDelta.p" not in pyro.get_param_store()
    em = EM(model, map_space="unconstrained")
    for _ in range(3):
        em.step(data)
    # The mode of 5 log(1 - p/2) + 0.1 log p + 0.9 log(1 - p) (prior times Jacobian p (1 - p)).
    p = pyro.param("AutoDelta.p").detach()
    assert float(-5 / (2 - p) + 0.1 / p - 0.9 / (1 - p)) == pytest.approx(0, abs=1e-9)


@pytest.mark.slow
def test_neural_hmm():
    """examples/hmm.py's model 5: a network's emissions (gradient M-step, L-BFGS) beside a
    Dirichlet(0.1)-prior transition table (closed form, unconstrained coordinates)."""
    seq, lengths, args = M.polyphonic()
    model = M.neural_hmms(seq.shape[-1], args)[0]
    em = EM(model, map_space="unconstrained", max_plate_nesting=2)
    losses = [em.step(seq, lengths, args) for _ in range(10)]
    for before, after in zip(losses, losses[1:]):
        assert after <= before + 1e-10 * abs(before)
    assert list(em.plan.closed_form) == ["AutoDelta.probs_x"]
    loss = EM(model, max_plate_nesting=2).evaluate_loss(seq, lengths, args)
    assert loss == pytest.approx(traceenum_loss(model, (seq, lengths, args), {}, 2), rel=1e-9)
